#!/usr/bin/env bash
# Create .venv and install difstudy with its extras; a fast no-op when the
# environment already matches pyproject.toml. Sourced by the README's commands.
#   DIFSTUDY_VENV     where the environment lives (default: .venv)
#   DIFSTUDY_TORCH    pip spec for torch (default: torch==2.13.0 without a GPU,
#                     plain "torch" (a CUDA build) when nvidia-smi finds one)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DIFSTUDY_VENV:-$root/.venv}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "difstudy needs Python >= 3.10 (found $("$py" --version))" >&2; exit 1; }
if [ -z "${DIFSTUDY_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DIFSTUDY_TORCH="torch"; else DIFSTUDY_TORCH="torch==2.13.0"; fi
fi
stamp="$venv/.difstudy-stamp"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16) $DIFSTUDY_TORCH"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c 'import difstudy' 2>/dev/null; then
  return 0 2>/dev/null || exit 0
fi
echo "[difstudy] setting up $venv (torch: $DIFSTUDY_TORCH; log: $venv/install.log)"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
log="$venv/install.log"
t0=$SECONDS
{
  "$venv/bin/python" -m pip install --upgrade pip
  "$venv/bin/python" -m pip install "$DIFSTUDY_TORCH"
  "$venv/bin/python" -m pip install -e "$root[book,dev]"
} >"$log" 2>&1 || { echo "[difstudy] install failed; last lines of $log:" >&2; tail -n 30 "$log" >&2; exit 1; }
"$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null 2>&1 || true
echo "$want" > "$stamp"
echo "[difstudy] environment ready in $((SECONDS - t0)) s"
