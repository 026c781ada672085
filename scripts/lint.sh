#!/usr/bin/env bash
# One-command lint: ruff check, ruff format --check, and no outputs stored in notebooks.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
ruff check .
ruff format --check .
shopt -s nullglob
nbs=(notebooks/*.ipynb)
if [ ${#nbs[@]} -gt 0 ]; then nbstripout --verify "${nbs[@]}"; fi
echo "lint: ok"
