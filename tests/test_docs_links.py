"""The README and docs/ stay navigable: every relative link resolves, the README stays short, and its first
bash block is still the two commands CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" follows) or ")".
_LINK = re.compile(r'!?\[[^\]\n]*\]\(\s*(?:<([^>\n]+)>|([^)\s]+))(?:\s+"[^"]*")?\s*\)')


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def relative_targets(text: str) -> list[str]:
    """Link targets outside code blocks and code spans, without web links, mail links or pure anchors."""
    prose = _CODE_SPAN.sub("", _FENCE.sub("", text))
    targets = []
    for bracketed, bare in _LINK.findall(prose):
        target = bracketed or bare
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_link_parser_sees_links_and_skips_code():
    text = (
        "[a](x.md) ![img](../img/p.png) [web](https://e.org) [anchor](#top) [b](y.md#sec)\n"
        "`[not](code.md)`\n```\n[also not](fenced.md)\n```\n[c](<z dir/w.md>)"
    )
    assert relative_targets(text) == ["x.md", "../img/p.png", "y.md", "z dir/w.md"]


def test_every_relative_link_resolves():
    broken = []
    for md in markdown_files():
        for target in relative_targets(md.read_text(encoding="utf-8")):
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "broken relative links (fix the path or create the file):\n" + "\n".join(broken)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 150, f"README.md has {len(lines)} lines; move detail to docs/guide/"


def test_readme_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block, "README.md has no ```bash block"
    lines = block.group(1).splitlines()
    assert len(lines) == 2, f"the first bash block has {len(lines)} lines, want the two install-and-run commands"
    assert all(line.startswith("python3 -m venv") for line in lines)
    assert "plan" in lines[0] and "pytest" in lines[1]
