"""The package as a user installs it: a wheel built from the source, installed (not editable)
into a fresh virtual environment outside the repository, under its distribution name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from modelscape._version import DISTRIBUTION, VERSION

REPO = Path(__file__).resolve().parents[2]


def run(*cmd: str | Path, cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_the_wheel_installs_by_its_name_and_runs_the_demo(tmp_path):
    # the sources a wheel is built from, copied so the build writes nothing into the repository
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "modelscape", src / "modelscape", ignore=shutil.ignore_patterns("__pycache__")
    )
    # the test environment's setuptools builds it: nothing to download
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", tmp_path / "dist", src, cwd=tmp_path)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == f"{DISTRIBUTION.replace('-', '_')}-{VERSION}-py3-none-any.whl"

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel,
        cwd=tmp_path)  # fmt: skip
    # the dependencies (torch, ...) come from the test environment, after the venv's own
    # packages, so the installed modelscape is found first
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv)})["purelib"])
    (purelib / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    where = run(
        python, "-c", "import modelscape; print(modelscape.__file__)", cwd=tmp_path, env=env
    )
    assert where.startswith(str(venv)), where
    metadata = f"import importlib.metadata as m; print(m.version({DISTRIBUTION!r}))"
    installed = run(python, "-c", metadata, cwd=tmp_path, env=env)
    assert installed.strip() == VERSION

    command = venv / "bin" / "modelscape"
    assert run(command, "--version", cwd=tmp_path, env=env) == f"modelscape {VERSION}\n"
    small = ["--NUM_TRIALS", "1", "--MAX_ITER", "20", "--N_SAMPLES", "32", "64", "--GAMMA", "1"]
    out = run(command, "run", *small, cwd=tmp_path, env=env)
    assert "2 jobs (2 ok)" in out
    assert (tmp_path / "runs" / "demo" / "learning_curve.png").is_file()
