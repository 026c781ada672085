#!/usr/bin/env bash
# README command B: set up (first run only) and run the lint and the tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/bootstrap.sh
venv="${DIFSTUDY_VENV:-$root/.venv}"
export PATH="$venv/bin:$PATH"
bash scripts/lint.sh
python -m pytest "$@"
