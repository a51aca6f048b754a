#!/usr/bin/env bash
# Static checks: ruff, then the import layering (scripts/check_layers.py). Exits non-zero when
# either fails. Needs the .venv that scripts/test.sh installs; scripts/test.sh runs this after the
# install and before pytest when it runs the whole suite (no pytest arguments), as CI does.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "scripts/checks.sh: no .venv yet; run bash scripts/test.sh (it installs first)" >&2
    exit 2
fi
.venv/bin/python -m ruff check densessl tests scripts
.venv/bin/python scripts/check_layers.py
