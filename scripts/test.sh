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
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ constraints.txt -nt "$stamp" ] || ! .venv/bin/python -c "import densessl" 2>/dev/null; then
    # pip's output (setuptools' build warnings included) goes to a log, shown only on failure
    log=.venv/install.log
    echo "installing densessl into .venv (log: $log)"
    if ! { .venv/bin/python -m pip install --quiet --upgrade pip \
            && .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"; } \
            >"$log" 2>&1; then
        cat "$log" >&2
        echo "scripts/test.sh: installing densessl failed (output above, also in $log)" >&2
        exit 1
    fi
    touch "$stamp"
fi
# The whole suite (no arguments: CI and the README's command) starts with the static checks.
if [ "$#" -eq 0 ]; then
    bash scripts/checks.sh
fi
exec .venv/bin/python -m pytest -q "$@"
