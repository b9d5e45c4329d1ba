"""Atomic, resumable training checkpoints, each with a Hugging Face export beside it.

    out_dir/checkpoints/step_000040/   torch.distributed.checkpoint (DCP) files: policy + optimizer,
                                       each rank writing its own shards (so a 1.5B model saves
                                       without gathering); trainer.pt: step, data order and
                                       position, the data RNG; config.json + tokenizer/: what
                                       `python -m dsr_fast.export` needs to turn it into an HF model
    out_dir/checkpoints/latest         the name of the newest complete checkpoint
    out_dir/hf/step_000040/            the policy at that step as a Hugging Face directory (weights in
                                       the master dtype, tokenizer): usable as --model, e.g. to start
                                       the next stage from any saved step
    out_dir/final/                     the same for the end of the run

Keep policy: the newest `keep` DCP states (what --resume needs; model + optimizer, ~3x the model's
bytes) and the newest `keep_exports` HF exports, 0 = every one (DeepScaleR's 8K→16K hand-off was
chosen after the run, at step 1040 of ~1,600; at fp32 an export of the 1.5B model is 7 GB).
A DCP state whose export was pruned can still be exported: `python -m dsr_fast.export`.

A checkpoint is written to `step_N.tmp` and renamed after every rank finished, and `latest` is
replaced atomically after that: a run killed at any moment leaves the previous checkpoint intact.
An export is written to `hf/step_N.tmp` and renamed the same way. Across nodes, out_dir must be on
a shared file system. DCP reshards on load, so a run can resume on a different number of GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .distributed import World, barrier
from .errors import InputError


def _root(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def latest(out_dir) -> Path | None:
    pointer = _root(out_dir) / "latest"
    if not pointer.exists():
        return None
    path = _root(out_dir) / pointer.read_text().strip()
    if not (path / "trainer.pt").exists():
        raise InputError(f"{pointer}: points to {path}, which is not a complete checkpoint")
    return path


def save(world: World, out_dir, step: int, model, optimizer, trainer_state: dict, keep: int,
         tokenizer=None, keep_exports: int = 0) -> Path:
    """Write the checkpoint taken after `step` RL steps, and (with a tokenizer) its Hugging Face
    export; every rank must call this."""
    root = _root(out_dir)
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f"{name}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_is_fine():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    if world.is_main:
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(_master_dtype(model)), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
    barrier(world)
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, root / "latest")
        _prune(root, keep)
    barrier(world)
    if tokenizer is not None:
        export_hf(world, model, tokenizer, Path(out_dir) / "hf" / name)
        if world.is_main and keep_exports > 0:
            _prune(Path(out_dir) / "hf", keep_exports)
    return final


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete step_* directories under root."""
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _master_dtype(model) -> torch.dtype:
    return next(iter(model.parameters())).dtype


def export_hf(world: World, model, tokenizer, out_dir) -> Path:
    """The model as a Hugging Face directory (gathered from the shards onto rank 0), written to
    `out_dir.tmp` and renamed; every rank must call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if not world.distributed:
        plain = model
    else:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        plain = _plain_model(model.config, state) if world.is_main else None
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    barrier(world)
    return out_dir


def _plain_model(config, state: dict):
    from .model import Qwen2

    with torch.device("meta"):
        plain = Qwen2(config)
    plain.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        plain.lm_head.weight = plain.embed_tokens.weight
    return plain


def load_model_only(path: Path):
    """The policy of a DCP checkpoint written by `save`, on the CPU, without its optimizer."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from .model import Qwen2, Qwen2Config

    path = Path(path)
    if not (path / "trainer.pt").is_file() or not (path / "config.json").is_file():
        raise InputError(f"{path}: not a complete dsr_fast checkpoint (needs trainer.pt and config.json)")
    config = Qwen2Config.from_json_file(path / "config.json")
    dtype = getattr(torch, json.loads((path / "config.json").read_text()).get("dtype", "float32"))
    with torch.device("meta"):  # no random init of weights that are read next
        model = Qwen2(config)
    model = model.to_empty(device="cpu").to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    state = {"model": get_model_state_dict(model)}
    with _single_process_is_fine():
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    return model


def load(path: Path, model, optimizer) -> dict:
    """Restore model and optimizer in place (any world size); returns the trainer state."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _single_process_is_fine():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(path / "trainer.pt", weights_only=False)



@contextmanager
def _single_process_is_fine():
    # DCP warns when no process group exists; a one-process run is a supported case, not a mistake
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield
