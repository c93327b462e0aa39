"""Run logging: progress bar, JSON-lines metrics, TensorBoard events, sampled trajectories, curves.

Only the primary process (jax.process_index() == 0) writes; the others get a logger that does
nothing, so callers never branch on the process index.
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping, Sequence

import jax

_BAR_KEYS = (("reward", "R"), ("eval_accuracy", "acc"), ("kl", "KL"), ("step_s", "s/step"))


class RunLogger:
    """Writes one run's metrics and samples under `workdir`.

    Files: `metrics.jsonl` (one JSON object per logged step, `{"step": s, ...}`),
    `trajectories.jsonl` (sampled trajectories), `tensorboard/` (event files), `curves.png`.
    """

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0,
                 primary: bool | None = None, progress: bool = True, description: str = "Flow-GRPO"):
        self.workdir = workdir
        self.primary = jax.process_index() == 0 if primary is None else primary
        self._bar = self._writer = None
        if not self.primary:
            return
        os.makedirs(workdir, exist_ok=True)
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=initial_step, desc=description, disable=not progress,
                         dynamic_ncols=True)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")

    def log(self, step: int, metrics: Mapping[str, float], *, advance: bool = False) -> None:
        """Appends `metrics` for `step` to metrics.jsonl and TensorBoard; `advance` moves the bar one step."""
        if not self.primary:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        for key, value in clean.items():
            if math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()
        postfix = {short: f"{clean[key]:.3g}" for key, short in _BAR_KEYS if key in clean}
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        if advance:
            self._bar.update(1)

    def message(self, text: str) -> None:
        """A line above the progress bar (or plain print when there is none)."""
        if self.primary:
            self._bar.write(text)

    def log_trajectories(self, step: int, split: str, lines: Iterable[str]) -> None:
        """Appends JSON trajectory lines (from `Trajectory.to_json`) tagged with step and split."""
        if not self.primary:
            return
        with open(os.path.join(self.workdir, "trajectories.jsonl"), "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps({"step": step, "split": split, "trajectory": json.loads(line)},
                                   ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.primary:
            self._bar.close()
            self._writer.close()


def read_metrics(path: str) -> list[dict[str, float]]:
    """The records of a metrics.jsonl file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(metrics_path: str, out_path: str, *,
                keys: Sequence[str] = ("reward", "eval_accuracy"), title: str = "Flow-GRPO") -> str:
    """Plots the given metrics against step (one panel each) into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    present = [k for k in keys if any(k in r for r in records)]
    if not present:
        raise ValueError(f"{metrics_path} has none of the metrics {list(keys)} to plot")
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.6), squeeze=False)
    for ax, key in zip(axes[0], present):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
