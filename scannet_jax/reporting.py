"""What a run reports: the metrics log, the code version, and the PNG plots of a workdir.

Host-side only (no JAX arrays): the loop hands over plain floats and NumPy arrays. Files are
written by process 0 of a multi-process run; the caller decides (``enabled``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

import scannet_jax
from scannet_jax import atomic

METRICS_FILE = "metrics.jsonl"
PARITY_PLOT = "parity_test.png"
CURVES_PLOT = "learning_curves.png"


class MetricsWriter:
    """Appends one JSON line per record to ``workdir/metrics.jsonl``.

    Args:
      workdir: the run's directory.
      enabled: False on every process but the first of a multi-process run.
    """

    def __init__(self, workdir: Path, enabled: bool = True):
        self.path = Path(workdir) / METRICS_FILE
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every record written so far (also by an earlier, resumed part of the run)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def code_version() -> dict[str, str]:
    """Package version and, when run from a git checkout, the commit (``+dirty`` if modified)."""
    version = {"package": scannet_jax.__version__}
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        version["git_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_parity(path: Path, predictions: np.ndarray, targets: np.ndarray, units: str, target: str) -> None:
    """Predicted against reference values of one split (NaN targets left out), as a PNG.

    Args:
      path: the PNG to write.
      predictions, targets: [S] in target units.
      units, target: axis labels.
    """
    plt = _pyplot()
    ok = np.isfinite(targets)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(targets[ok], predictions[ok], s=3, alpha=0.4)
    if ok.any():
        both = np.concatenate([targets[ok], predictions[ok]])
        ax.plot([both.min(), both.max()], [both.min(), both.max()], "k--", lw=1)
    mae = float(np.mean(np.abs(predictions[ok] - targets[ok]))) if ok.any() else float("nan")
    ax.set(xlabel=f"{target} reference ({units})", ylabel=f"{target} predicted ({units})",
           title=f"test set: MAE {mae:.4g} {units}, n = {int(ok.sum())}")
    fig.tight_layout()
    atomic.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def plot_learning_curves(path: Path, records: list[dict[str, Any]], units: str, target: str) -> None:
    """Training and validation MAE per epoch (and the running training MAE within epochs).

    Args:
      path: the PNG to write.
      records: the lines of ``metrics.jsonl`` (`MetricsWriter.read`).
      units, target: labels.
    """
    plt = _pyplot()
    intervals = [r for r in records if "epoch_progress" in r]
    epochs = [r for r in records if "val_mae" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if intervals:
        ax.plot([r["epoch_progress"] for r in intervals], [r["running_train_mae"] for r in intervals],
                lw=0.8, alpha=0.6, label="train MAE, running mean within the epoch")
    if epochs:
        # an epoch's record is drawn at its end
        ax.plot([r["epoch"] + 1 for r in epochs], [r["train_mae"] for r in epochs], "o-", label="train MAE")
        ax.plot([r["epoch"] + 1 for r in epochs], [r["val_mae"] for r in epochs], "s-", label="validation MAE")
    if intervals or epochs:
        ax.set_yscale("log")
        ax.legend()
    ax.set(xlabel="epoch", ylabel=f"MAE ({units})", title=f"{target} learning curves")
    fig.tight_layout()
    atomic.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
