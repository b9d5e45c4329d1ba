"""Turn a training checkpoint into a Hugging Face model directory, usable as --model.

    python -m dsr_fast.export runs/deepscaler-8k/checkpoints/step_001040 runs/deepscaler-8k/step_1040-hf
    python -m dsr_fast.export runs/deepscaler-8k runs/latest-hf        # a run directory: its latest checkpoint

The trainer already writes such a directory beside every checkpoint (out_dir/hf/step_N, see
checkpoint.py); this command is for the DCP states whose export was pruned (--keep-exports) or
deleted. Only the policy is read, not the optimizer state, on one process and the CPU, in the
dtype it was trained in (fp32 master weights in the presets; --dtype bfloat16 halves the size).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import checkpoint
from .errors import InputError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dsr_fast.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory (out_dir/checkpoints/step_N), or a run directory for its latest")
    parser.add_argument("out_dir", help="where the Hugging Face directory is written (config.json, safetensors, tokenizer)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="weights' dtype on disk; auto = the dtype they were trained in (default: auto)")
    return parser.parse_args(argv)


def resolve_checkpoint(path: Path) -> Path:
    if (path / "trainer.pt").is_file():
        return path
    if (path / "checkpoints").is_dir():
        latest = checkpoint.latest(path)
        if latest is None:
            raise InputError(f"{path}: run directory without a complete checkpoint (no checkpoints/latest)")
        return latest
    raise InputError(f"{path}: neither a checkpoint (no trainer.pt) nor a run directory (no checkpoints/)")


def export(checkpoint_dir: str | Path, out_dir: str | Path, dtype: str = "auto") -> Path:
    import torch

    source = resolve_checkpoint(Path(checkpoint_dir))
    tokenizer_dir = source / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise InputError(f"{source}: has no tokenizer/ (written by dsr_fast since checkpoints carry their export)")
    from transformers import AutoTokenizer

    model = checkpoint.load_model_only(source)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, dtype=None if dtype == "auto" else getattr(torch, dtype))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir, args.dtype)
    except InputError as error:
        print(f"dsr_fast.export: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
