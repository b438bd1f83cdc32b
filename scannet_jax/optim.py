"""The optimiser and its learning-rate schedules (reference §3), as numbers and Optax pieces.

``create_optimizer(opt, steps_per_epoch)`` builds Adam exactly as Keras-2 computes it
(`scale_by_keras_adam`) with the per-step factor below; ``create_epoch_schedule(opt)`` the
host-side epoch schedule. Both take the ``config.optimizer`` section; nothing else here reads
a config.

The rate applied at optimiser step t of epoch e is

    lr(e, t) = epoch_lr(e) · step_factor(t)

* ``epoch_lr`` comes from a host-side, stateful epoch schedule (:class:`SGDR` or
  :class:`ConstantLR`). SGDR needs the validation MAE of each finished epoch, which only the
  host knows, so it cannot be an Optax schedule; its state is checkpointed with the run. The
  value is fed to the optimiser through ``optax.inject_hyperparams`` (`set_learning_rate`).
* ``step_factor`` is a pure Optax schedule of the step count: the Keras-2 legacy Adam
  ``decay`` (inverse-time decay 1 / (1 + decay·t)), optionally times a cosine decay normalised
  to 1 at t = 0 (the original's non-SGDR ``cosine`` schedule).

All of this reproduces ``tests/fixtures/original/lr_schedules.npz`` (tests/test_schedules.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


def scale_by_keras_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7) -> optax.GradientTransformation:
    """Adam's direction exactly as Keras-2 (and the original) computes it.

    ``sqrt(1 - b2^t) / (1 - b1^t) · m_t / (sqrt(v_t) + eps)`` with the uncorrected moments
    ``m_t``, ``v_t`` and t = step + 1: epsilon is added to the root of the *uncorrected* second
    moment, where ``optax.scale_by_adam`` adds it after bias correction. The two differ by an
    effective epsilon ``eps / sqrt(1 - b2^t)`` (3.2e-6 instead of 1e-7 at the first step), which
    matters for parameters whose gradients are small. The result is not yet multiplied by
    ``-learning_rate`` (chain with ``optax.scale_by_learning_rate``).
    """

    def init(params: Any) -> optax.ScaleByAdamState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update(updates: Any, state: optax.ScaleByAdamState, params: Any = None) -> tuple[Any, optax.ScaleByAdamState]:
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        correction = jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        direction = jax.tree.map(lambda m, v: correction * m / (jnp.sqrt(v) + eps), mu, nu)
        return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def create_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """Keras-2 Adam with the original's per-step factor (reference §3).

    The learning rate is an injected hyperparameter (``opt_state.hyperparams["learning_rate"]``)
    that the loop sets at every epoch from the epoch schedule (`set_learning_rate`); the
    per-step factor (legacy inverse-time decay, and the cosine if chosen) is applied inside
    the update.

    Args:
      opt: the ``config.optimizer`` section.
      steps_per_epoch: optimiser steps per epoch (lays out the cosine schedule).
    """
    factor = step_factor_schedule(
        opt.schedule,
        steps_per_epoch=steps_per_epoch,
        num_epochs=opt.cosine_epochs,
        min_lr_ratio=opt.min_lr / opt.lr,
        legacy_decay=opt.legacy_decay,
    )

    def adam(learning_rate: float) -> optax.GradientTransformation:
        return optax.chain(
            scale_by_keras_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
            optax.scale_by_schedule(factor),
            optax.scale_by_learning_rate(learning_rate),
        )

    return optax.inject_hyperparams(adam)(learning_rate=opt.lr)


def create_epoch_schedule(opt: ml_collections.ConfigDict) -> EpochSchedule:
    """SGDR (``opt.schedule == "sgdr"``) or a constant epoch rate, from ``config.optimizer``."""
    if opt.schedule == "sgdr":
        return SGDR(lr_max=opt.lr, lr_min=opt.min_lr, t0=opt.sgdr_t0, tmult=opt.sgdr_tmult,
                    compression=opt.sgdr_compression, trigger=opt.sgdr_trigger)
    return ConstantLR(opt.lr)


def set_learning_rate(opt_state: Any, lr: float, place: Any) -> Any:
    """``opt_state`` (of `create_optimizer`) with its injected learning rate set to ``lr``.

    Args:
      opt_state: the optimiser state.
      lr: the new rate.
      place: puts a host value where the state lives (e.g. replication over the mesh).
    """
    hyper = dict(opt_state.hyperparams)
    hyper["learning_rate"] = place(np.asarray(lr, np.float32))
    return opt_state._replace(hyperparams=hyper)
