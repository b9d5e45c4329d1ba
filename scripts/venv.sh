#!/usr/bin/env bash
# Install the tested dependency set into a venv: scripts/venv.sh VENV LOCK [EXTRA_SPEC]
#
#   VENV        the venv to create or update (e.g. .venv)
#   LOCK        the lock file, pinned versions the suite last passed with (e.g. locks/main.txt)
#   EXTRA_SPEC  what to install on top (default: -e .[dev], the project; none: nothing)
#
# Two cases:
# - torch already on the machine (a GPU image with its own CUDA torch, reached through
#   --system-site-packages): keep that torch and its triton, install the rest of the lock with pip
#   constraints (uv does not count system site-packages as installed and would fetch a second torch).
# - otherwise (CPU machines, CI): the venv becomes exactly the lock, with uv (measured on the
#   2-core machine: ~10 s against ~65 s for pip). torch is the CPU build, from pip's find-links
#   (a local wheel) when it has one, else from PyTorch's CPU index: never the multi-GB CUDA wheel.
set -euo pipefail

venv=$1
lock=$2
extra=${3:--e .[dev]}
py=$venv/bin/python
torch_cpu_index=https://download.pytorch.org/whl/cpu

[ -f "$lock" ] || { echo "scripts/venv.sh: lock file $lock not found" >&2; exit 2; }
echo "== $venv from the tested dependency set $lock ($(sed -n 's/^# refreshed: //p' "$lock"))"

if [ ! -x "$py" ]; then
  "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
fi

if "$py" -c "import torch" 2>/dev/null && ! grep -q "^torch==$("$py" -c 'import torch; print(torch.__version__)')\$" "$lock"; then
  echo "== keeping this machine's torch $("$py" -c 'import torch; print(torch.__version__)') and its triton"
  grep -vE '^(torch|triton|nvidia-[a-z0-9-]+|uv)==' "$lock" > "$venv/constraints.txt"
  # shellcheck disable=SC2086
  [ "$extra" = none ] || "$py" -m pip install -c "$venv/constraints.txt" $extra
  exit 0
fi

uv_pin=$(grep '^uv==' "$lock") || { echo "scripts/venv.sh: $lock pins no uv" >&2; exit 2; }
"$py" -m pip install -q "$uv_pin"
uv=$venv/bin/uv

# pip's find-links (environment or pip config) may hold the CPU torch wheel; uv reads neither.
find_links=()
for dir in ${PIP_FIND_LINKS:-} $("$py" -m pip config get global.find-links 2>/dev/null || true); do
  [ -d "$dir" ] && find_links+=(--find-links "$dir")
done

# The venv has system site-packages (a machine's own torch); uv manages the venv's own packages.
if ! "$uv" pip sync --python "$py" "${find_links[@]}" "$lock"; then
  echo "== no local CPU torch wheel: taking torch from PyTorch's CPU index"
  "$uv" pip sync --python "$py" --extra-index-url "$torch_cpu_index" --index-strategy unsafe-best-match "$lock"
fi
# The project itself, its dependencies held to the lock: anything the lock lacks would show here
# as a new "+ package" line (a lock to refresh: make lock).
# shellcheck disable=SC2086
[ "$extra" = none ] || "$uv" pip install --python "$py" -c "$lock" $extra
