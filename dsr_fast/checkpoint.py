"""Atomic, resumable training checkpoints.

    out_dir/checkpoints/step_000040/   torch.distributed.checkpoint (DCP) files: policy + optimizer,
                                       each rank writing its own shards (so a 1.5B model saves
                                       without gathering); trainer.pt: step, data order and
                                       position, the data RNG
    out_dir/checkpoints/latest         the name of the newest complete checkpoint

A checkpoint is written to `step_N.tmp` and renamed after every rank finished, and `latest` is
replaced atomically after that: a run killed at any moment leaves the previous checkpoint intact.
Across nodes, out_dir must be on a shared file system. DCP reshards on load, so a run can resume
on a different number of GPUs.
"""

from __future__ import annotations

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


def save(world: World, out_dir, step: int, model, optimizer, trainer_state: dict, keep: int) -> Path:
    """Write the checkpoint taken after `step` RL steps; every rank must call this."""
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
    barrier(world)
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, root / "latest")
        for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


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
