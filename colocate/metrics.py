"""Per-step metrics: one JSON object per line in `metrics.jsonl`, TensorBoard events, and a reward-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSONL and the PNG still tell the story
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    return float(v) if hasattr(v, "item") else v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_rewards(metrics_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """Reward mean per step and held-out accuracy at validation steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["reward_mean"]) for r in rows if "reward_mean" in r]
    val = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train reward (mean)", color="tab:blue")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="held-out accuracy (greedy)", color="tab:green")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


STEP_PARTS = (("generation_s", "generation"), ("training_s", "training"), ("refit_ms", "refit"),
              ("sleep_wake_s", "sleep/wake"), ("offload_s", "policy offload"))


def plot_step_time(metrics_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """Where each GRPO step's wall time went: stacked bars, with the refit + sleep/wake share written on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "step_s" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(rows)
    for key, label in STEP_PARTS:
        seconds = [r.get(key, 0.0) / (1e3 if key.endswith("_ms") else 1) for r in rows]
        if any(seconds):
            ax.bar(steps, seconds, bottom=bottom, label=label)
            bottom = [b + s for b, s in zip(bottom, seconds, strict=True)]
    for step, r in zip(steps, rows, strict=True):
        ax.annotate(f"{r['refit_share'] * 100:.1f} %", (step, r["step_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("GRPO step (label: refit + sleep/wake share of the step)")
    ax.set_ylabel("seconds")
    ax.set_xticks(steps)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
