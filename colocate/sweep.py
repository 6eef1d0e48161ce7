"""Buffer-size sweeps: `python -m colocate.run -m +recipe=refit_sweep refit.buffer_size_mb=16,64,256,1024`.

Each Hydra job runs the refit benchmark once with its buffer size and writes `refit.json` in its directory;
when the multirun ends, `SweepSummary` (a Hydra callback named in the recipe) collects them into
`summary.md` and `refit_vs_buffer.png` in the sweep directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from colocate.config import Config


def run_refit_bench(cfg: Config, out_dir: Path) -> dict[str, Any]:
    from colocate.bench.refit import main as bench

    device = cfg.placement.device
    return bench(["--device", device, "--model", cfg.bench.model, "--repeats", str(cfg.bench.repeats),
                  "--buffer-mb", str(cfg.refit.buffer_size_mb or 1024), "--methods", cfg.bench.methods,
                  "--json", str(out_dir / "refit.json")])


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(sweep_dir.glob("*/refit.json")):
        report = json.loads(path.read_text())
        by_method = {r["method"]: r for r in report["results"]}
        col = by_method.get("colocate", {})
        rows.append({"buffer_mb": report["buffer_bytes"] / (1 << 20), "median_ms": col.get("median_s", 0) * 1e3,
                     "correct": col.get("correct"), "floor_ms": by_method.get("floor", {}).get("median_s", 0) * 1e3,
                     "device": report["device"], "model": report["model"]})
    rows.sort(key=lambda r: r["buffer_mb"])
    if not rows:
        return rows
    lines = ["| buffer (MiB, each of two) | colocate median (ms) | floor (ms) | correct |", "|---|---|---|---|"]
    lines += [f"| {r['buffer_mb']:g} | {r['median_ms']:.2f} | {r['floor_ms']:.2f} | {r['correct']} |" for r in rows]
    (sweep_dir / "summary.md").write_text(f"Refit vs buffer size: {rows[0]['model']} on {rows[0]['device']}\n\n"
                                          + "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["buffer_mb"] for r in rows], [r["median_ms"] for r in rows], "o-", color="tab:green",
            label="colocate")
    ax.plot([r["buffer_mb"] for r in rows], [r["floor_ms"] for r in rows], "--", color="gray", label="floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("buffer size (MiB, each of two)")
    ax.set_ylabel("median refit time (ms)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(f"{rows[0]['model']} on {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(sweep_dir / "refit_vs_buffer.png", dpi=120)
    plt.close(fig)
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = summarize(Path(config.hydra.sweep.dir))
        for r in rows:
            print(f"buffer {r['buffer_mb']:>8g} MiB  refit {r['median_ms']:8.2f} ms  correct {r['correct']}")
