#!/usr/bin/env bash
# The project's test command: installs modelscape with its test and docs dependencies into .venv,
# then lints (ruff), builds the docs site strictly (a broken link or anchor fails) and runs every
# test (pytest). Works on a fresh machine that has only Python.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Prefer the CPU build of torch where this machine has it on disk; a plain `pip install torch`
# would pull a multi-GB CUDA build.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install -q "torch==2.13.0" 2>/dev/null || "$VPY" -m pip install -q "torch>=2.4,<2.15"
fi
"$VPY" -m pip install -q -e ".[test,docs]" 2>&1 | grep -v -i "location\|warning" || true
"$VPY" -c "import modelscape, ray, nbclient, sklearn, mkdocs" # fail fast if an install step is missing

echo "== ruff =="
"$VPY" -m ruff check modelscape tests benchmarks examples tools
"$VPY" -m ruff format --check modelscape tests benchmarks examples tools

echo "== docs =="
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"

echo "== pytest =="
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$VPY" -m pytest -q "$@"
