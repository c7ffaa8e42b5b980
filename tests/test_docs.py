"""The README and docs/ stay true to the repository: CI runs the README's two commands as written,
and every relative link points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Pages written on other branches, linked from the README before they land. Each must exist once
# merged: remove it from here then.
PENDING = {"docs/security.md", "docs/reliability-guarantees.md", "docs/gpu.md", "docs/batch-transforms.md",
           "docs/reader-performance.md", "docs/reinforced.md"}


def readme_commands() -> list[str]:
    """The command lines of the fenced blocks in the README's install section ('## Install ...')."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Install.*?$(.*?)^## ", text, re.M | re.S)
    assert section, "README.md has no '## Install' section"
    blocks = re.findall(r"^```(?:bash|sh|console)?\n(.*?)^```", section.group(1), re.M | re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def ci_commands() -> list[str]:
    """The lines .ci/run runs after each '# README, command N' comment."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [lines[i + 1] for i, line in enumerate(lines) if re.fullmatch(r"# README, command \d+", line)]


def test_ci_runs_the_readme_commands_as_written():
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert ci_commands() == commands
    assert "pip install" not in "\n".join(line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                                          if line not in commands and not line.startswith("#")), \
        ".ci/run installs something the README does not"


def test_readme_command_one_installs_the_core_and_builds():
    first, second = readme_commands()
    assert first.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "pip install -e . " in first and "[test]" not in first and "cachegen build" in first
    assert '".[test]"' in second and "pytest" in second


def relative_links(page: Path, *, anchors: bool = False) -> list[str]:
    """Targets of the page's Markdown links and images that are neither URLs nor anchors of the
    page itself (with `anchors`, each with its #anchor, where it has one)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # not inside code blocks
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [t if anchors else t.split("#")[0] for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        for target in relative_links(page):
            path = (page.parent / target).resolve()
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            if not path.exists() and rel not in PENDING:
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_every_anchor_into_another_page_names_one_of_its_headings():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in relative_links(page, anchors=True):
            path, _, anchor = target.partition("#")
            if anchor and (page.parent / path).exists() and anchor not in heading_anchors(page.parent / path):
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/x.md) [b](https://example.com) [c](#top) ![d](img.png \"t\")\n```\n[e](no.md)\n```\n")
    assert relative_links(page) == ["docs/x.md", "img.png"]
    page.write_text("# A page: its `title`\n## Build on the device\n")
    assert heading_anchors(page) == {"a-page-its-title", "build-on-the-device"}


def example_outputs() -> set[str]:
    """What the docs' example commands write into the current folder: each `--out`/`--plot`/`--json`
    path that is relative (a figure under docs/ is kept on purpose), and the defaults of `build`
    (./cache) and `preview` (./preview.png)."""
    outputs = {"cache", "preview.png"}
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        blocks = re.findall(r"^```[a-z]*\n(.*?)^```", page.read_text(), re.M | re.S)
        commands = [line.split(" #")[0] for block in blocks for line in block.splitlines()
                    if re.search(r"\bcachegen |scripts/", line)]
        for command in commands:
            for flag, path in re.findall(r"(--out|--plot|--json|--val|--cache)[ =]([^\s`)\]]+)", command):
                if not re.match(r"[a-z0-9]+://|/|\$|docs/|\.\.", path) and "{" not in path \
                        and not path.isupper():  # CACHE, DIR: a placeholder the reader fills in
                    outputs.add(path.rstrip("/"))
    return outputs


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether a .gitignore's `patterns` (no negations) ignore `path` or a folder above it."""
    from fnmatch import fnmatch

    parts = path.split("/")
    for pattern in patterns:
        anchored, body = pattern.startswith("/"), pattern.strip("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if fnmatch(prefix if anchored or "/" in body else parts[depth - 1], body):
                return True
    return False


def test_gitignore_covers_what_the_examples_write():
    patterns = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    outputs = example_outputs()
    assert {"cache", "cache-val", "preview.png"} <= outputs
    assert not [p for p in sorted(outputs) if not ignored(p, patterns)]
    assert not ignored("docs/bench.png", patterns) and not ignored("cachegen/cli.py", patterns)


def test_the_teacher_in_reinforced_md_runs_as_written(tmp_path, monkeypatch):
    """docs/reinforced.md's teacher.py, copied as a user copies it, with a checkpoint of its model."""
    import runpy

    import torch
    import torchvision

    text = (ROOT / "docs" / "reinforced.md").read_text()
    block = re.search(r"```python\n(\s*# teacher\.py\n.*?)```", text, re.S).group(1)
    code = "\n".join(line[3:] if line.startswith("   ") else line for line in block.splitlines())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.py").write_text(code)
    torch.save(torchvision.models.resnet50(num_classes=100).state_dict(), tmp_path / "teacher.pt")
    teacher = runpy.run_path(str(tmp_path / "teacher.py"))["make"]().eval()
    with torch.no_grad():
        assert teacher(torch.rand(2, 3, 32, 32)).shape == (2, 100)
