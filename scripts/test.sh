#!/usr/bin/env bash
# Run the whole test suite, installing densessl into .venv first if needed.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Reinstall when the package metadata or the pinned stack changed since the last install.
stamp=.venv/.densessl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] \
    || ! .venv/bin/python -c "import densessl" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
    touch "$stamp"
fi
# The whole suite (no arguments: CI and the README's command) starts with the static checks.
if [ "$#" -eq 0 ]; then
    bash scripts/checks.sh
fi
exec .venv/bin/python -m pytest -q "$@"
