"""The outbound policy: allow-listed hosts only, and no way into the internal network by any spelling."""
from __future__ import annotations

import ipaddress

import pytest

from connectors.outbound import OutboundPolicy, OutboundRefused, literal_ip


@pytest.mark.parametrize("spelling", ["127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.1",
                                      "[::1]", "[::ffff:127.0.0.1]", "[0:0:0:0:0:ffff:7f00:1]"])
def test_every_spelling_of_loopback_is_refused_unless_loopback_is_listed(spelling):
    with pytest.raises(OutboundRefused, match="not on the allow-list|not a valid URL"):  # httpx rejects octal
        OutboundPolicy.parse("api.example.com").check(f"http://{spelling}:8080/x")


@pytest.mark.parametrize("spelling", ["127.0.0.1", "2130706433", "0x7f000001", "127.1", "[::ffff:127.0.0.1]"])
def test_a_listed_address_matches_in_any_spelling(spelling):
    assert OutboundPolicy.parse("127.0.0.1:8080").check(f"http://{spelling}:8080/x")


def test_literal_ips_are_read_the_way_a_resolver_reads_them():
    assert literal_ip("2130706433") == ipaddress.IPv4Address("127.0.0.1")
    assert literal_ip("0x7f.1") == ipaddress.IPv4Address("127.0.0.1")
    assert literal_ip("[::ffff:169.254.169.254]") == ipaddress.IPv4Address("169.254.169.254")
    assert literal_ip("api.example.com") is None


@pytest.mark.parametrize("resolved", ["10.0.0.5", "192.168.1.10", "169.254.169.254", "127.0.0.1", "::1",
                                      "fd00::1", "0.0.0.0",
                                      # security review L7: shared space, 6to4 and its relays, embedded IPv4
                                      "100.100.100.200", "100.64.0.1", "2002:a9fe:a9fe::", "2002:7f00:1::",
                                      "2002:808:808::", "192.88.99.1", "64:ff9b::a9fe:a9fe",
                                      "64:ff9b:1::7f00:1", "::a9fe:a9fe", "::ffff:10.0.0.1",
                                      "2001:0:4136:e378:8000:63bf:80ff:fefe"])
def test_an_allowed_name_that_resolves_inside_the_network_is_refused(resolved):
    policy = OutboundPolicy(("api.example.com",), resolve=lambda host: [ipaddress.ip_address(resolved)])
    with pytest.raises(OutboundRefused, match="resolves to an internal address"):
        policy.check("https://api.example.com/items")


@pytest.mark.parametrize("resolved", ["93.184.216.34", "8.8.8.8", "2606:4700::1111"])
def test_a_public_address_stays_allowed(resolved):
    policy = OutboundPolicy(("api.example.com",), resolve=lambda host: [ipaddress.ip_address(resolved)])
    assert policy.check("https://api.example.com/").host == "api.example.com"


def test_an_internal_address_is_allowed_when_it_is_listed_itself():
    policy = OutboundPolicy(("api.corp", "10.0.0.5:443"), resolve=lambda host: [ipaddress.ip_address("10.0.0.5")])
    assert policy.check("https://api.corp/items").host == "api.corp"
    public = OutboundPolicy(("api.example.com",), resolve=lambda host: [ipaddress.ip_address("93.184.216.34")])
    assert public.check("https://api.example.com/").host == "api.example.com"


def test_ports_on_the_list_are_enforced():
    policy = OutboundPolicy.parse("127.0.0.1:8080, [::1]:9000")
    assert policy.check("http://127.0.0.1:8080/")
    assert policy.check("http://[::1]:9000/")
    for url in ("http://127.0.0.1:8081/", "http://127.0.0.1/", "http://[::1]:9001/"):
        with pytest.raises(OutboundRefused):
            policy.check(url)
