"""dsr_fast: a small, fast GRPO trainer for reasoning LLMs (DeepScaleR-1.5B recipe)."""

from pathlib import Path

__version__ = "0.1.0"

# dsr_fast.kernels lives in the top-level kernels/ folder (kernels/dsr_fast/kernels), kept out of
# the repository root's import namespace so that it never shadows Hugging Face's `kernels`. An
# install maps it into place; a source checkout used without installing (a bare copy on a GPU
# machine, a git worktree) finds it through this package's search path.
_SOURCE_KERNELS = Path(__file__).resolve().parents[1] / "kernels" / "dsr_fast"
if (_SOURCE_KERNELS / "kernels" / "__init__.py").is_file():
    __path__.append(str(_SOURCE_KERNELS))
