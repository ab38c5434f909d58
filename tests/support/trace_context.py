"""The W3C trace context the tracing tests send as their caller's (the Trace Context specification's example)."""
from __future__ import annotations

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
