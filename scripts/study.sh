#!/usr/bin/env bash
# README command A: set up (first run only), execute the notebooks on the mini
# model with papermill and build the Jupyter Book into _build/html.
#   PARAMS=ci (default) | full
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/bootstrap.sh
venv="${DIFSTUDY_VENV:-$root/.venv}"
export PATH="$venv/bin:$PATH"
difstudy run --params "${PARAMS:-ci}" "$@"
