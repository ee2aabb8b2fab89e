"""The package's shape: no import cycles (imports inside functions count), no module over 500
lines, and ``import modelscape`` stays free of pandas, matplotlib and ray."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "modelscape"
MAX_LINES = 500


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its body (functions included).

    ``from a import b`` points at module ``a.b`` when that is a module, else at ``a``. The
    parent packages Python initialises on the way are not edges: every module would otherwise
    depend on the package root, which re-exports them all.
    """
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join(here + ([base] if base else []))
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycles():
    assert cycles(import_graph(ROOT, "modelscape")) == []


def test_the_cycle_check_sees_lazy_imports_inside_functions(tmp_path):
    # the two cycles the package once had: a module imported lazily inside a function
    # (engine -> batched), and a backend picked in an if-chain (executors -> ray_executor)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    sources = {
        "__init__.py": "",
        "engine.py": """
            def train_group(jobs):
                from pkg import batched
                return batched.run(jobs)
        """,
        "batched.py": "from pkg import engine\n",
        "executors.py": """
            def executor_for(name):
                if name == "ray":
                    from pkg.ray_executor import RayExecutor
                    return RayExecutor()
        """,
        "ray_executor.py": "from .executors import executor_for\n",
        "lone.py": "from pkg.engine import train_group\n",
    }
    for name, text in sources.items():
        (pkg / name).write_text(textwrap.dedent(text))
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.lone"] == {"pkg.engine"}
    assert cycles(graph) == [["pkg.batched", "pkg.engine"], ["pkg.executors", "pkg.ray_executor"]]


def test_no_module_is_over_500_lines():
    files = module_files(ROOT, "modelscape")
    sizes = {name: len(path.read_text().splitlines()) for name, path in files.items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_every_module_says_what_it_owns():
    missing = [
        name
        for name, path in module_files(ROOT, "modelscape").items()
        if path.stat().st_size and ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert missing == []


@pytest.mark.parametrize("heavy", ["pandas", "matplotlib", "ray", "xarray", "submitit"])
def test_importing_modelscape_does_not_import(heavy):
    code = f"import sys, modelscape; print({heavy!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_one_home_for_each_mechanism():
    """The atomic write (store/files.py) and the job label (sweep/jobs.py) exist once: no other
    module renames a file into place or formats a job's values itself."""
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        if path.relative_to(ROOT).as_posix() != "store/files.py":
            assert "os.replace(" not in text, f"{path}: use store.files.write_atomic"
        if path.relative_to(ROOT).as_posix() != "sweep/jobs.py":
            assert 'f"{a}={v}"' not in text, f"{path}: use sweep.jobs.job_label"


def _reexport_only(path: Path) -> bool:
    """A module of a docstring, imports and ``__all__`` only (an old path kept working)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == [
            "__all__"
        ]:
            continue
        return False
    return True


def test_the_top_level_is_short():
    """At most 8 modules directly under modelscape/ besides subpackages; re-exports of old
    paths do not count."""
    top = sorted(
        p.name for p in ROOT.glob("*.py") if p.name != "__init__.py" and not _reexport_only(p)
    )
    assert len(top) <= 8, top


def test_no_module_outside_execution_names_an_executor():
    """Executors extend through their class (``check``, ``collect``) and the registry: no
    module outside execution/ imports a backend or the cluster libraries."""
    words = ("slurm", "submitit", "ray")
    for path in ROOT.rglob("*.py"):
        if "execution" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(a.name for a in node.names)]
            hits = [n for n in names for w in words if w in n.lower().split(".")]
            assert not hits, f"{path} imports {hits}"
