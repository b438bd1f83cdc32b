"""The training loop's bookkeeping on the host: its settings, its position (checkpointed with
the state), the wall-time budget, stop signals and agreement between processes."""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np

# Time kept back for the final evaluation of every split, from the measured validation speed:
# the estimate times this margin, plus a fixed allowance for compiling and writing results.
FINAL_EVAL_MARGIN = 1.2
FINAL_EVAL_OVERHEAD_S = 30.0
# Before any validation pass is timed, a forward pass is taken to cost this fraction of a step,
# and the guess keeps back at most this fraction of the budget (a guess from a slow interval
# stopped 130-minute QM9 runs in their first epoch; the first validation pass measures it).
FORWARD_FRACTION_OF_STEP = 1.0 / 3.0
GUESS_MAX_FRACTION = 0.5
# optimizer.on_divergence = "reload_best" (MEGNet's ReduceLRUponNan, zoo-reference.md §2.7): an
# epoch diverged if a step was non-finite or its loss is over this factor times the previous
# epoch's; training stops once the halved rate falls below MIN_LR_AFTER_DIVERGENCE.
DIVERGENCE_LOSS_FACTOR = 100.0
MIN_LR_AFTER_DIVERGENCE = 1e-7
DIVERGENCE_MODES = ("skip", "reload_best")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The loop's settings, read once from the config (see ``configs/qm9.py`` for each key)."""

    seed: int
    num_epochs: int
    patience: int
    max_wall_time_s: float
    checkpoint_every_steps: int
    checkpoint_every_minutes: float
    log_every_steps: int
    prefetch: int
    target: str
    units: str
    on_divergence: str = "skip"
    prediction_floor: float | None = None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> RunSettings:
        return cls(seed=config.seed, num_epochs=config.num_epochs, patience=config.patience,
                   max_wall_time_s=config.max_wall_time_s, checkpoint_every_steps=config.checkpoint_every_steps,
                   checkpoint_every_minutes=config.checkpoint_every_minutes,
                   log_every_steps=max(config.log_every_steps, 1), prefetch=config.prefetch,
                   target=config.data.target, units=config.data.units,
                   on_divergence=check_divergence_mode(config.optimizer.on_divergence),
                   prediction_floor=config.prediction_floor)


def check_divergence_mode(mode: str) -> str:
    if mode not in DIVERGENCE_MODES:
        raise ValueError(f"config.optimizer.on_divergence={mode!r}: unknown; known: {', '.join(DIVERGENCE_MODES)}")
    return mode


def diverged(train_loss: float, nonfinite_steps: float, previous_loss: float | None) -> bool:
    """Whether an epoch diverged in MEGNet's sense: a non-finite step, a non-finite loss, or a
    loss over ``DIVERGENCE_LOSS_FACTOR`` times the previous epoch's."""
    if nonfinite_steps > 0 or not math.isfinite(train_loss):
        return True
    return previous_loss is not None and train_loss > DIVERGENCE_LOSS_FACTOR * previous_loss


@dataclasses.dataclass
class LoopState:
    """Where the loop is; checkpointed with the train state (as JSON meta) and restored on resume.

    Attributes:
      epoch: current epoch (0-based).
      batch_index: batches of ``epoch`` already taken.
      epoch_lr: the epoch schedule's rate for ``epoch`` (None until the epoch starts).
      lr_scale: product of the halvings after non-finite steps or diverged epochs.
      last_train_loss: the previous epoch's training loss (``diverged``), None before one.
      best_val_mae: best validation MAE so far (target units).
      best_epoch: its epoch (-1 before the first validation).
      epochs_since_best: epochs without improvement (early stopping).
      epoch_sums: summed metrics of the epoch so far (a mid-epoch checkpoint), or None.
      stop_reason: why the run stopped ("" while it goes on).
    """

    epoch: int = 0
    batch_index: int = 0
    epoch_lr: float | None = None
    lr_scale: float = 1.0
    last_train_loss: float | None = None
    best_val_mae: float = math.inf
    best_epoch: int = -1
    epochs_since_best: int = 0
    epoch_sums: dict[str, float] | None = None
    stop_reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> LoopState:
        return cls(**{f.name: value[f.name] for f in dataclasses.fields(cls) if f.name in value})


class WallClock:
    """The run's wall-time budget, keeping back time for the final evaluation of every split."""

    def __init__(self, limit_s: float, final_structures: int):
        self.start = time.time()
        self.limit_s = limit_s
        self.final_structures = final_structures
        self.final_eval_s = 0.0
        self.measured = False
        self.intervals = 0
        self.fastest = 0.0  # structures/s of the fastest log interval after the first
        self.last_save = self.start

    def train_speed(self, structures_per_s: float) -> None:
        """Guesses the final evaluation from the training speed of log intervals, until an
        evaluation speed is measured: from the fastest interval so far (compilations of later
        buckets and a busy machine only slow intervals down), never the run's first (it includes
        the first compilation), and at most ``GUESS_MAX_FRACTION`` of the budget."""
        self.intervals += 1
        if self.intervals > 1:
            self.fastest = max(self.fastest, structures_per_s)
        if not self.measured and self.fastest > 0:
            guess = (FINAL_EVAL_MARGIN * self.final_structures / (FORWARD_FRACTION_OF_STEP * self.fastest)
                     + FINAL_EVAL_OVERHEAD_S)
            self.final_eval_s = min(guess, GUESS_MAX_FRACTION * self.limit_s) if self.limit_s else guess

    def eval_speed(self, structures_per_s: float) -> None:
        """Sets the final evaluation time from a measured evaluation speed."""
        self.final_eval_s = FINAL_EVAL_MARGIN * self.final_structures / max(structures_per_s, 1e-9) + FINAL_EVAL_OVERHEAD_S
        self.measured = True

    def saved(self) -> None:
        """A checkpoint was just written."""
        self.last_save = time.time()

    def checkpoint_due(self, every_minutes: float) -> bool:
        """Whether ``every_minutes`` have passed since the last checkpoint (or the start)."""
        return every_minutes > 0 and time.time() - self.last_save >= 60.0 * every_minutes

    def out_of_time(self) -> bool:
        return bool(self.limit_s) and time.time() - self.start + self.final_eval_s > self.limit_s

    def elapsed(self) -> float:
        return time.time() - self.start



class StopSignals:
    """Turns SIGTERM and SIGINT into a request to checkpoint and stop (inside the ``with`` block;
    the previous handlers come back afterwards). Only the main thread can install handlers;
    elsewhere this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agreed(*flags: bool) -> list[bool]:
    """Host-side flags OR-ed over all processes (every process takes the same branch)."""
    values = np.array(flags, np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        values = np.asarray(multihost_utils.process_allgather(values)).reshape(-1, len(flags)).max(0)
    return [bool(v) for v in values]
