"""Per-step metrics: metrics.jsonl always, TensorBoard and Weights & Biases when installed, and PNG
curves at the end of a run. Only rank 0 logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

# the curves drawn at the end, in this order, when a run logged them
CURVES = ("reward", "accuracy", "response_len_mean", "truncated", "kl_mean", "entropy_mean",
          "clip_frac_low", "clip_frac_high", "grad_norm", "sync_drift", "train_tokens_per_s")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class RunLog:
    def __init__(self, out_dir, report_to: str, config: dict, resume_step: int = 0, enabled: bool = True):
        """resume_step: records of steps ≥ it are dropped from metrics.jsonl (they are redone)."""
        self.out_dir, self.enabled = Path(out_dir), enabled
        self.backends, self.records = [], []
        if not enabled:
            return
        wanted = {s.strip() for s in report_to.split(",") if s.strip()}
        if wanted == {"auto"}:
            wanted = {"jsonl"} | {name for name, mod in (("tensorboard", "tensorboard"), ("wandb", "wandb")) if _installed(mod)}
        unknown = wanted - {"jsonl", "tensorboard", "wandb", "none"}
        if unknown:
            raise ValueError(f"report_to: unknown backend(s) {sorted(unknown)}; use jsonl, tensorboard, wandb, auto or none")
        path = self.out_dir / "metrics.jsonl"
        if resume_step and path.exists():
            self.records = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] < resume_step]
        if "jsonl" in wanted:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            self.jsonl = open(path, "a")
            self.backends.append("jsonl")
        if "tensorboard" in wanted:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            self.backends.append("tensorboard")
        if "wandb" in wanted:
            import wandb

            self.wandb = wandb.init(project="dsr_fast", dir=str(self.out_dir), config=config, resume="allow")
            self.backends.append("wandb")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        if "jsonl" in self.backends:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        scalars = _flatten(record)
        if "tensorboard" in self.backends:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if "wandb" in self.backends:
            self.wandb.log(scalars, step=record["step"])

    def close(self, plot: bool = True) -> Path | None:
        """Flush and close; with plot, write curves.png (needs matplotlib) and return its path."""
        if not self.enabled:
            return None
        if "jsonl" in self.backends:
            self.jsonl.close()
        if "tensorboard" in self.backends:
            self.tb.close()
        if "wandb" in self.backends:
            self.wandb.finish()
        return plot_curves(self.records, self.out_dir / "curves.png") if plot else None


def _flatten(record: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            out[prefix + k] = float(v)
    return out


def plot_curves(records: list[dict], path: Path) -> Path | None:
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("curves.png skipped: pip install matplotlib to draw the metric curves")
        return None
    names = [n for n in CURVES if any(n in r for r in records)]
    evals = sorted({k for r in records for k in _flatten(r.get("eval", {}))})
    panels = names + [f"eval/{k}" for k in evals]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        if name.startswith("eval/"):
            pts = [(r["step"], _flatten(r["eval"])[name[5:]]) for r in records if "eval" in r and name[5:] in _flatten(r["eval"])]
        else:
            pts = [(r["step"], r[name]) for r in records if name in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
