"""Learning-rate schedules of the original training (reference §3), as numbers and Optax pieces.

The rate applied at optimiser step t of epoch e is

    lr(e, t) = epoch_lr(e) · step_factor(t)

* ``epoch_lr`` comes from a host-side, stateful epoch schedule (:class:`SGDR` or
  :class:`ConstantLR`). SGDR needs the validation MAE of each finished epoch, which only the
  host knows, so it cannot be an Optax schedule; its state is checkpointed with the run. The
  value is fed to the optimiser through ``optax.inject_hyperparams`` (see ``train.py``).
* ``step_factor`` is a pure Optax schedule of the step count: the Keras-2 legacy Adam
  ``decay`` (inverse-time decay 1 / (1 + decay·t)), optionally times a cosine decay normalised
  to 1 at t = 0 (the original's non-SGDR ``cosine`` schedule).

All of this reproduces ``shared/fixtures/lr_schedules.npz`` (tests/test_schedules.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax.numpy as jnp
import optax


def keras_cosine_decay(
    init_value: float, decay_steps: float, alpha: float
) -> optax.Schedule:
    """Keras ``CosineDecay``: init·((1 − α)·½(1 + cos(π·min(t, T)/T)) + α).

    Args:
      init_value: rate at step 0.
      decay_steps: T, the step at which the floor init·α is reached (flat afterwards).
      alpha: floor as a fraction of ``init_value``.

    Returns:
      An Optax schedule of the step count.
    """
    return optax.cosine_decay_schedule(init_value, decay_steps=decay_steps, alpha=alpha)


def inverse_time_decay(decay: float) -> optax.Schedule:
    """Keras-2 legacy optimiser ``decay``: step t is scaled by 1 / (1 + decay·t)."""

    def schedule(count: jnp.ndarray) -> jnp.ndarray:
        return 1.0 / (1.0 + decay * count)

    return schedule


def step_factor_schedule(
    kind: str,
    *,
    steps_per_epoch: int,
    num_epochs: int,
    min_lr_ratio: float,
    legacy_decay: float,
) -> optax.Schedule:
    """The per-step multiplier of the epoch learning rate.

    Args:
      kind: ``"sgdr"`` or ``"constant"`` (factor from ``legacy_decay`` only) or ``"cosine"``
        (Keras ``CosineDecay`` over 0.5·steps_per_epoch·num_epochs steps down to
        ``min_lr_ratio``, as the original builds it, times the legacy decay).
      steps_per_epoch: optimiser steps per epoch (only used by ``"cosine"``).
      num_epochs: epochs the cosine is laid out for (the original: 1000).
      min_lr_ratio: min_lr / lr.
      legacy_decay: the Keras ``decay`` (1e-5 in the original); 0 switches it off.

    Returns:
      An Optax schedule t ↦ factor(t), 1 at t = 0.

    Raises:
      ValueError: for an unknown ``kind``.
    """
    if kind not in ("sgdr", "constant", "cosine"):
        raise ValueError(f"unknown schedule {kind!r}; expected 'sgdr', 'constant' or 'cosine'")
    decay = inverse_time_decay(legacy_decay)
    if kind != "cosine":
        return decay
    cosine = keras_cosine_decay(1.0, 0.5 * steps_per_epoch * num_epochs, min_lr_ratio)
    return lambda count: cosine(count) * decay(count)


class EpochSchedule(Protocol):
    """Host-side schedule of the learning rate per epoch."""

    def lr_for_epoch(self, epoch: int) -> float:
        """Learning rate for epoch ``epoch``; call once, before the epoch runs."""

    def update(self, val_mae: float) -> None:
        """Report the validation MAE of the epoch that just finished."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (JSON-serialisable)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


@dataclasses.dataclass
class ConstantLR:
    """The same rate every epoch (used with the ``cosine`` and ``constant`` step schedules)."""

    lr: float

    def lr_for_epoch(self, epoch: int) -> float:
        del epoch
        return self.lr

    def update(self, val_mae: float) -> None:
        del val_mae

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr = float(state["lr"])


@dataclasses.dataclass
class SGDR:
    """Warm-restart cosine schedule per epoch, steered by validation MAE (reference §3).

    Behaviour of the original callback, which this reproduces number for number:

    * Until the validation MAE first falls to ``trigger`` or below, the rate stays ``lr_max``.
    * Then each epoch advances τ by one inside a cycle of length T (first ``t0`` epochs, ×``tmult``
      at every restart): lr = lr_min + (peak − lr_min)·(1 + cos(πτ/T))/2. τ starts at 1, so the
      first triggered epoch already has τ = 2.
    * When τ would exceed T, a new cycle starts with τ = 1 and the peak set at the last
      validation improvement: previous peak / ``compression``, but not below the rate that was in
      force at that improvement.

    Attributes:
      lr_max: first peak.
      lr_min: floor of every cycle.
      t0: length of the first cycle, in epochs.
      tmult: cycle length multiplier.
      compression: peak divisor per improvement (≤ 0: next peak = current rate).
      trigger: validation MAE (standardised units, as the original compares it) that starts
        the schedule; the original's 300 triggers after epoch 0.
    """

    lr_max: float
    lr_min: float
    t0: int = 50
    tmult: int = 2
    compression: float = 1.2
    trigger: float = 300.0
    triggered: bool = False
    peak_next: float = dataclasses.field(default=math.nan)
    peak: float = dataclasses.field(default=math.nan)
    lr: float = dataclasses.field(default=math.nan)
    cycle_length: int = dataclasses.field(default=0)
    position: int = 1
    best_val_mae: float = math.inf

    def __post_init__(self) -> None:
        if math.isnan(self.lr):
            self.peak_next = self.peak = self.lr = self.lr_max
            self.cycle_length = self.t0

    def lr_for_epoch(self, epoch: int) -> float:
        del epoch  # the schedule is driven by its own state, like the original's callback
        if not self.triggered:
            return self.lr
        self.position += 1
        if self.position > self.cycle_length:
            self.cycle_length = int(self.tmult * self.cycle_length)
            self.position = 1
            self.peak = self.peak_next
        self.lr = float(
            self.lr_min
            + (self.peak - self.lr_min)
            * (1.0 + math.cos(self.position / self.cycle_length * math.pi))
            / 2.0
        )
        return self.lr

    def update(self, val_mae: float) -> None:
        if not self.triggered and val_mae <= self.trigger:
            self.triggered = True
        if self.triggered and val_mae < self.best_val_mae:
            self.best_val_mae = float(val_mae)
            if self.compression > 0:
                self.peak_next = max(self.peak / self.compression, self.lr)
            else:
                self.peak_next = self.lr

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, type(getattr(self, field.name))(state[field.name]))
