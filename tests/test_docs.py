"""Docs that cannot rot: every Python block of the README and of docs/ runs, page by page.

The blocks of one page run in order in one namespace (a page builds on its earlier blocks), in
an empty folder, with an empty command line. A block that is only a fragment (it needs a GPU,
a cluster, or names defined elsewhere) starts with the comment ``# not run: <why>``, which a
reader sees too.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(
    r"^(?P<indent> *)```(?P<lang>\w*)[^\n]*\n(?P<code>.*?)^(?P=indent)```", re.M | re.S
)
NOT_RUN = "# not run"
# pages whose blocks start worker processes: with the real-process tests
PROCESSES = {"running-sweeps.md"}


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """``(line, code)`` of every ```python block of a page, its indentation removed."""
    text = page.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group("lang") != "python":
            continue
        indent = len(match.group("indent"))
        code = "\n".join(line[indent:] for line in match.group("code").splitlines())
        blocks.append((text.count("\n", 0, match.start()) + 2, code + "\n"))
    return blocks


def runs(code: str) -> bool:
    return not code.lstrip().startswith(NOT_RUN)


def page_params():
    for page in PAGES:
        if any(runs(code) for _, code in python_blocks(page)):
            marks = [pytest.mark.integration] if page.name in PROCESSES else []
            yield pytest.param(page, id=str(page.relative_to(REPO)), marks=marks)


@pytest.mark.parametrize("page", list(page_params()))
def test_every_python_block_of_a_page_runs(page, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [page.name])  # parse_args() reads no flags
    namespace = {"__name__": "__main__"}
    for line, code in python_blocks(page):
        if runs(code):
            exec(compile(code, f"{page.relative_to(REPO)}:{line}", "exec"), namespace)
    plt.close("all")


def test_every_block_that_does_not_run_says_why():
    blocks = [(p, line, code) for p in PAGES for line, code in python_blocks(p)]
    assert len(blocks) > 15 and python_blocks(REPO / "README.md")  # the collector finds them
    for page, line, code in blocks:
        if not runs(code):
            first = code.lstrip().splitlines()[0]
            assert re.match(r"# not run: \w", first), f"{page.name}:{line}: {first}"


def test_the_readme_stays_a_pitch_with_the_two_command_quickstart():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in quickstart.splitlines() if line.strip()]
    assert len(commands) == 2 and commands[1] == "bash tests/run_all_tests.sh"
    assert "modelscape run" in commands[0]
    assert "modelscape-sweeps" in readme and "`pip install modelscape` installs an" in readme


def test_every_test_the_docs_name_exists():
    """A row of the reliability table, or a claim that a test checks something, names a real
    test: its file, or the test function somewhere under tests/."""
    sources = "\n".join(p.read_text() for p in (REPO / "tests").rglob("*.py"))
    for page in PAGES:
        text = page.read_text()
        for path in re.findall(r"`(tests/[\w/]*(?:\.py)?)`", text):
            assert (REPO / path).exists(), f"{page.name} names {path}"
        for name in re.findall(r"`(test_[a-z0-9]+_[a-z0-9]+_\w+)`", text):  # not `test_loss`
            assert f"def {name}(" in sources, f"{page.name} names {name}"
