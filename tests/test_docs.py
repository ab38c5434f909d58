"""The documents cannot drift from the code: the configuration reference is the generator's output, and every
relative link in README.md and docs/*.md points at a file (and heading) that exists."""
from __future__ import annotations

import re
from pathlib import Path

from app.cli import main
from app.config import REFERENCE_BEGIN, REFERENCE_END, Settings, reference_table, with_reference_table

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ROOT / "docs" / "operations.md"

_FENCED = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.M)


def documents(root: Path) -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for heading in _HEADING.findall(_FENCED.sub("", markdown)):
        text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower())
        found.add(text.replace(" ", "-"))
    return found


def broken_links(root: Path) -> list[str]:
    """Every relative link that names a missing file or heading, as "<document>: <target>"."""
    broken = []
    for document in documents(root):
        text = _CODE_SPAN.sub("", _FENCED.sub("", document.read_text()))
        for target in _LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            if not linked.exists():
                broken.append(f"{document.relative_to(root)}: {target}")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked.read_text()):
                broken.append(f"{document.relative_to(root)}: {target} (no such heading)")
    return broken


def test_the_configuration_reference_is_what_the_settings_say():
    document = OPERATIONS.read_text()
    assert REFERENCE_BEGIN in document and REFERENCE_END in document
    assert with_reference_table(document, reference_table()) == document, (
        "docs/operations.md's settings table differs from Settings: run "
        "`python -m app settings reference --update docs/operations.md`")


def test_every_setting_is_in_the_reference_once():
    table = reference_table()
    for name, field in Settings.model_fields.items():
        assert table.count(f"| `{Settings.env_name(name)}` |") == 1
        assert field.description, f"{Settings.env_name(name)} has no description"


def test_the_command_line_prints_the_reference_and_writes_it_between_the_markers(tmp_path, capsys):
    assert main(["settings", "reference"]) == 0
    assert capsys.readouterr().out == reference_table()
    document = tmp_path / "operations.md"
    document.write_text(f"# Configuration\n\n{REFERENCE_BEGIN}\nstale\n{REFERENCE_END}\n\nafter\n")
    assert main(["settings", "reference", "--update", str(document)]) == 0
    expected = f"# Configuration\n\n{REFERENCE_BEGIN}\n{reference_table()}{REFERENCE_END}\n\nafter\n"
    assert document.read_text() == expected


def test_every_relative_link_points_at_a_file_that_exists():
    assert broken_links(ROOT) == []


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "api.md").write_text("# API\n\n## Cancelling\n\n```\n[not a link](nowhere.md)\n```\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/api.md#cancelling) [gone](docs/gone.md) [heading](docs/api.md#waiting) "
        "[web](https://example.com/x) `[code](nowhere.md)` [self](#api)\n")
    assert broken_links(tmp_path) == ["README.md: docs/gone.md", "README.md: docs/api.md#waiting (no such heading)",
                                      "README.md: #api (no such heading)"]
