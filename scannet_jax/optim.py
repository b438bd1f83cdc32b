"""The optimisers and their learning-rate schedules, as numbers and Optax pieces.

``create_optimizer(opt, steps_per_epoch)`` builds, by ``opt.name``,

* ``"adam"``: Adam exactly as Keras-2 computes it (`scale_by_keras_adam`), the original SCANN
  recipe (reference §3);
* ``"adamw"``: AdamW exactly as ``torch.optim.AdamW`` computes it, with decoupled weight decay on
  the parameters `decay_mask` selects, the ALIGNN recipe (zoo-reference.md §1.10);

each with the per-step factor below; ``create_epoch_schedule(opt)`` the host-side epoch
schedule. Both take the ``config.optimizer`` section; nothing else here reads a config.

The rate applied at optimiser step t of epoch e is

    lr(e, t) = epoch_lr(e) · step_factor(t)

* ``epoch_lr`` comes from a host-side, stateful epoch schedule (:class:`SGDR` or
  :class:`ConstantLR`). SGDR needs the validation MAE of each finished epoch, which only the
  host knows, so it cannot be an Optax schedule; its state is checkpointed with the run. The
  value is fed to the optimiser through ``optax.inject_hyperparams`` (`set_learning_rate`).
* ``step_factor`` is a pure Optax schedule of the step count: the Keras-2 legacy Adam
  ``decay`` (inverse-time decay 1 / (1 + decay·t)), optionally times a cosine decay normalised
  to 1 at t = 0 (the original's non-SGDR ``cosine`` schedule) or PyTorch's one-cycle shape
  normalised to 1 at its peak (:class:`OneCycle`, the ALIGNN ``onecycle`` schedule, stepped once
  per batch over all epochs; its β1 cycle is a second injected hyperparameter).

The Keras pieces reproduce ``tests/fixtures/original/lr_schedules.npz`` (tests/test_optim.py);
the PyTorch ones ``tests/fixtures/alignn/optimizer.npz`` (tests/test_alignn_recipe.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
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


def _cosine_anneal(start: float, end: float, step: jnp.ndarray, begin: float, finish: float) -> jnp.ndarray:
    """PyTorch's ``OneCycleLR._annealing_cos`` from ``start`` (at ``begin``) to ``end`` (at ``finish``).

    PyTorch computes end + (start − end)·(1 + cos πp)/2 with p = (step − begin)/(finish − begin),
    in float64. The same value is start·sin²(πq/2) + end·sin²(πp/2) with q = 1 − p taken as
    (finish − step)/(finish − begin): a sum of two non-negative terms without the cancellation of
    1 + cos πp near the floor, so float32 keeps its relative precision there (the rate falls by
    2.5e5 over the cycle).
    """
    length = finish - begin
    p = (step - begin) / length
    q = (finish - step) / length
    half_pi = 0.5 * math.pi
    return start * jnp.sin(half_pi * q) ** 2 + end * jnp.sin(half_pi * p) ** 2


@dataclasses.dataclass(frozen=True)
class OneCycle:
    """``torch.optim.lr_scheduler.OneCycleLR`` (two phases, cosine annealing) as Optax schedules.

    With T = ``total_steps`` and t the optimiser step (0-based; PyTorch's ``last_epoch`` when the
    scheduler is stepped once after every optimiser step, as ALIGNN's trainer does), the warm-up
    runs from t = 0 to t₁ = pct_start·T − 1 (a float, as in PyTorch) and the annealing from t₁ to
    T − 1. Relative to the peak rate max_lr:

    * rate: 1/div_factor → 1 over the warm-up, then 1 → 1/(div_factor·final_div_factor);
    * momentum (β1 of Adam-type optimisers; PyTorch overwrites the optimiser's β1 with it at
      construction): max_momentum → base_momentum over the warm-up, back to max_momentum after,
      so β1 is lowest where the rate peaks.

    PyTorch raises past t = T; here t is clamped to T − 1 (the floor is kept).

    Attributes:
      total_steps: T = epochs · steps_per_epoch.
      pct_start: fraction of T spent warming up (the reference: 0.3).
      div_factor: peak / initial rate (PyTorch's default 25).
      final_div_factor: initial / final rate (PyTorch's default 1e4).
      base_momentum: β1 at the peak rate (PyTorch's default 0.85).
      max_momentum: β1 at the start and the end (PyTorch's default 0.95).
    """

    total_steps: int
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    base_momentum: float = 0.85
    max_momentum: float = 0.95

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0.0 <= self.pct_start <= 1.0:
            raise ValueError(f"OneCycle: need total_steps >= 1 and 0 <= pct_start <= 1, got "
                             f"{self.total_steps}, {self.pct_start}")
        if self.warmup_end in (0.0, self.total_steps - 1.0):
            raise ValueError(f"OneCycle: pct_start={self.pct_start} over {self.total_steps} steps gives a phase "
                             "of zero length (PyTorch divides by zero there)")

    @property
    def warmup_end(self) -> float:
        """t₁, the (fractional) step at which the rate peaks: PyTorch's ``pct_start·T − 1``."""
        return float(self.pct_start * self.total_steps) - 1

    def _phases(self, count: jnp.ndarray, first: tuple[float, float], second: tuple[float, float]) -> jnp.ndarray:
        t = jnp.minimum(jnp.asarray(count, jnp.float32), self.total_steps - 1)
        warm = _cosine_anneal(first[0], first[1], t, 0.0, self.warmup_end)
        anneal = _cosine_anneal(second[0], second[1], t, self.warmup_end, self.total_steps - 1.0)
        return jnp.where(t <= self.warmup_end, warm, anneal)

    def lr_factor(self, count: jnp.ndarray) -> jnp.ndarray:
        """Rate at step ``count`` over the peak rate: an Optax schedule, 1 at t₁."""
        initial = 1.0 / self.div_factor
        return self._phases(count, (initial, 1.0), (1.0, initial / self.final_div_factor))

    def momentum(self, count: jnp.ndarray) -> jnp.ndarray:
        """β1 at step ``count``: an Optax schedule."""
        return self._phases(count, (self.max_momentum, self.base_momentum),
                            (self.base_momentum, self.max_momentum))

    @classmethod
    def from_config(cls, opt: ml_collections.ConfigDict, steps_per_epoch: int) -> OneCycle:
        """The one-cycle of ``config.optimizer`` over ``opt.onecycle_epochs`` epochs."""
        return cls(total_steps=int(opt.onecycle_epochs) * steps_per_epoch, pct_start=opt.onecycle_pct_start,
                   div_factor=opt.onecycle_div_factor, final_div_factor=opt.onecycle_final_div_factor,
                   base_momentum=opt.onecycle_base_momentum, max_momentum=opt.onecycle_max_momentum)


SCHEDULES = ("sgdr", "constant", "cosine", "onecycle")


def step_factor_schedule(
    kind: str,
    *,
    steps_per_epoch: int,
    num_epochs: int,
    min_lr_ratio: float,
    legacy_decay: float,
    onecycle: OneCycle | None = None,
) -> optax.Schedule:
    """The per-step multiplier of the epoch learning rate.

    Args:
      kind: ``"sgdr"`` or ``"constant"`` (factor from ``legacy_decay`` only), ``"cosine"``
        (Keras ``CosineDecay`` over 0.5·steps_per_epoch·num_epochs steps down to
        ``min_lr_ratio``, as the original builds it, times the legacy decay) or ``"onecycle"``
        (``onecycle.lr_factor`` times the legacy decay).
      steps_per_epoch: optimiser steps per epoch (only used by ``"cosine"``).
      num_epochs: epochs the cosine is laid out for (the original: 1000).
      min_lr_ratio: min_lr / lr.
      legacy_decay: the Keras ``decay`` (1e-5 in the original); 0 switches it off (factor 1.0).
      onecycle: the one-cycle shape (only for ``"onecycle"``, where it is required).

    Returns:
      An Optax schedule t ↦ factor(t), 1 at t = 0 (``"onecycle"``: 1 at its peak).

    Raises:
      ValueError: for an unknown ``kind``, or ``"onecycle"`` without ``onecycle``.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {list(SCHEDULES)}")
    decay = inverse_time_decay(legacy_decay)
    if kind == "onecycle":
        if onecycle is None:
            raise ValueError("schedule 'onecycle' needs its OneCycle shape")
        return lambda count: onecycle.lr_factor(count) * decay(count)
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


def scale_by_torch_adam(b1: Any = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam's direction as ``torch.optim.Adam``/``AdamW`` computes it (not yet times −rate).

    m_t = m + (1 − β1)(g − m) (PyTorch's ``lerp``), v_t = β2·v + (1 − β2)·g², direction
    (m_t / c1) / (√v_t / √c2 + ε) with c_i = 1 − β_i^t, t = step + 1: ε after the bias correction,
    as ``optax.scale_by_adam``. The corrections are computed as −expm1(t·log β): PyTorch takes
    them in float64 on the host, while float32 ``1 − 0.999**t`` loses up to 6e-5 of its value to
    cancellation (1.3e-5 for t ≤ 5), which moved the fixture's parameters by 2e-6 over 40 steps.
    ``log β2`` is taken in float64 when β2 is a Python number; β1 may be an injected (traced)
    hyperparameter, as the one-cycle's β1 is, and like PyTorch each step's correction uses that
    step's β1.

    Args:
      b1: β1 (a number or a scalar array).
      b2: β2.
      eps: ε.
    """
    log_b2 = math.log(b2)

    def init(params: Any) -> optax.ScaleByAdamState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

    def update(updates: Any, state: optax.ScaleByAdamState, params: Any = None) -> tuple[Any, optax.ScaleByAdamState]:
        del params
        mu = jax.tree.map(lambda m, g: m + (1 - b1) * (g - m), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        c1 = -jnp.expm1(t * jnp.log(jnp.asarray(b1, jnp.float32)))
        root_c2 = jnp.sqrt(-jnp.expm1(t * log_b2))
        direction = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v) / root_c2 + eps), mu, nu)
        return direction, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def decay_mask(no_decay: Sequence[str]) -> Callable[[Any], Any]:
    """The weight-decay mask of a parameter tree: decay every leaf whose path, its keys joined
    by "/", contains none of ``no_decay``.

    ALIGNN's reference (``alignn.utils.group_decay``) exempts the torch parameters whose name
    contains "bias", "bn" or "norm". Its MLPLayer BatchNorms are named ``<layer>.layer.1`` and so
    ARE decayed (scale only), while the EGGC ones (``bn_nodes``, ``bn_edges``) are not
    (zoo-reference.md §1.10). On our Flax names (MLPLayer's BatchNorm is ``norm``) the same
    split is ``no_decay = ("bias", "bn")``: tests/test_alignn_recipe.py checks it name by name
    against the reference rule on `torch_weights.torch_names`.

    Args:
      no_decay: substrings of the paths exempt from weight decay.

    Returns:
      ``params -> tree of bool`` (True: decayed), for ``optax.add_decayed_weights(mask=...)``.
    """

    def mask(params: Any) -> Any:
        def decayed(path: tuple[Any, ...], _leaf: Any) -> bool:
            name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            return not any(part in name for part in no_decay)

        return jax.tree_util.tree_map_with_path(decayed, params)

    return mask


OPTIMIZERS = ("adam", "adamw")


def create_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimiser of ``config.optimizer``: its direction, the per-step factor, the rate.

    * ``opt.name == "adam"``: Keras-2 Adam (`scale_by_keras_adam`, reference §3).
    * ``opt.name == "adamw"``: ``torch.optim.AdamW`` (zoo-reference.md §1.10): Adam with ε added
      after the bias correction (`scale_by_torch_adam`), plus the decoupled weight
      decay ``opt.weight_decay``·θ on the parameters `decay_mask` (``opt.no_decay``) keeps. With
      rate η_t = lr·factor(t) the update is θ ← θ − η_t·(m̂/(√v̂ + ε) + λ·θ), PyTorch's
      θ·(1 − η_t·λ) − η_t·m̂/(√v̂ + ε): the decay scales with the scheduled rate.

    The learning rate is an injected hyperparameter (``opt_state.hyperparams["learning_rate"]``)
    that the loop sets at every epoch from the epoch schedule (`set_learning_rate`); the
    per-step factor (legacy inverse-time decay, and the cosine or one-cycle shape if chosen) is
    applied inside the update. With ``opt.schedule == "onecycle"`` and
    ``opt.onecycle_cycle_momentum``, β1 is a second injected hyperparameter following
    `OneCycle.momentum` at every step (PyTorch cycles it in place of the optimiser's own β1);
    otherwise β1 is ``opt.b1``.

    Args:
      opt: the ``config.optimizer`` section.
      steps_per_epoch: optimiser steps per epoch (lays out the cosine and one-cycle schedules).

    Raises:
      ValueError: for an unknown ``opt.name`` or schedule.
    """
    if opt.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {opt.name!r}; expected one of {list(OPTIMIZERS)}")
    onecycle = OneCycle.from_config(opt, steps_per_epoch) if opt.schedule == "onecycle" else None
    factor = step_factor_schedule(
        opt.schedule,
        steps_per_epoch=steps_per_epoch,
        num_epochs=opt.cosine_epochs,
        min_lr_ratio=opt.min_lr / opt.lr,
        legacy_decay=opt.legacy_decay,
        onecycle=onecycle,
    )

    def direction(b1: float) -> list[optax.GradientTransformation]:
        if opt.name == "adam":
            return [scale_by_keras_adam(b1=b1, b2=opt.b2, eps=opt.eps)]
        return [scale_by_torch_adam(b1=b1, b2=opt.b2, eps=opt.eps),
                optax.add_decayed_weights(opt.weight_decay, mask=decay_mask(tuple(opt.no_decay)))]

    def build(learning_rate: float, b1: float) -> optax.GradientTransformation:
        return optax.chain(*direction(b1), optax.scale_by_schedule(factor),
                           optax.scale_by_learning_rate(learning_rate))

    if onecycle is not None and opt.onecycle_cycle_momentum:
        return optax.inject_hyperparams(build)(learning_rate=opt.lr, b1=onecycle.momentum)
    # only the rate is injected (the state layout of checkpoints written before β1 could cycle)
    return optax.inject_hyperparams(lambda learning_rate: build(learning_rate, opt.b1))(learning_rate=opt.lr)


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
