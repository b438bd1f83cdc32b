"""Training and evaluation of any registered network, data parallel over all devices.

``train_and_evaluate(config, workdir)`` is the whole job: `setup` (data → plans → model → state →
steps), then epochs of ``train_step`` with validation, the epoch schedule, early stopping and
checkpoints, then the best-validation parameters on every split, plots and ``results.json``.
The config is read here, at the edge: by `get_datasets`, the ``create_*`` factories and
`RunSettings.from_config`; everything below takes typed values.

Steps are pure and run under ``jax.shard_map`` over the ``('data',)`` mesh (``parallel.py``):
the batch argument holds one padded GraphsTuple per device, stacked on a leading axis. The loss
(``config.loss``: the original's RMSE, or MSE) is computed over the *global* batch (sums and
counts combined with ``psum`` first) plus the network's regulariser, so any number of devices
computes the gradient of one device holding the whole batch. Graphs with a NaN target are masked
out of loss and metrics. Nothing here is specific to one network: `models.get_spec` says how
to build it, regularise it and whether it scores atoms.

Departures from the original, on purpose: the target is standardised with the training split's
mean and std (the original used the whole data set); a step whose loss or gradient is not
finite is not applied (the state stays at the last good step) and the learning rate is halved.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from scannet_jax import batching, checkpoints, datasets, losses, models, optim, parallel, reporting
from scannet_jax.batching import BatchPlan
from scannet_jax.graphs import Domain, GraphStore, concat_ranges
from scannet_jax.datasets import featurize

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
SPLITS = datasets.SPLITS

# Time kept back for the final evaluation of every split, from the measured validation speed:
# the estimate times this margin, plus a fixed allowance for compiling and writing results.
FINAL_EVAL_MARGIN = 1.2
FINAL_EVAL_OVERHEAD_S = 30.0
# Before any validation pass is timed, a forward pass is taken to cost this fraction of a step.
FORWARD_FRACTION_OF_STEP = 1.0 / 3.0


class TrainState(train_state.TrainState):
    """Parameters, optimiser state and everything else a resumed run needs on device.

    Attributes:
      target_mean: float32 [], mean of the training targets (target units).
      target_std: float32 [], their population std; predictions are y·std + mean.
      rng: uint32 [2], base key; step t uses ``fold_in(rng, t)`` for dropout.
      model_state: the network's non-parameter variables (e.g. ``{"batch_stats": ...}``), updated
        by every training step; ``{}`` for networks without any.
    """

    target_mean: jax.Array
    target_std: jax.Array
    rng: jax.Array
    model_state: Any = dataclasses.field(default_factory=dict)

    def variables(self, params: Any = None) -> dict[str, Any]:
        """The variables to ``apply`` the network with (``params`` replacing the state's)."""
        return {"params": self.params if params is None else params, **self.model_state}


# --------------------------------------------------------------------------------------------
# Data: read config.data at the edge, hand typed values to `datasets.load`.


@dataclasses.dataclass
class Datasets:
    """One data set with its splits and the training-split target scaler.

    Attributes:
      store: every structure of the data set.
      splits: split name -> int64 positions in ``store``.
      target: the target's name in ``store.targets``.
      mean, std: the target scaler (training split; 0 and 1 without standardisation).
    """

    store: GraphStore
    splits: dict[str, np.ndarray]
    target: str
    mean: float
    std: float

    def indices(self, name: str) -> np.ndarray:
        """int64 positions in ``store`` of split ``name``."""
        return np.asarray(self.splits[name], np.int64)

    def split(self, name: str) -> GraphStore:
        """A copy of split ``name`` as its own store (for inspection; training reads ``store``
        through the split's indices)."""
        return self.store.subset(self.indices(name))

    @property
    def train(self) -> GraphStore:
        return self.split("train")

    @property
    def validation(self) -> GraphStore:
        return self.split("validation")

    @property
    def test(self) -> GraphStore:
        return self.split("test")

    def domain(self, periodic: bool | None, chunk: int = 65536) -> Domain:
        """The training split's elements; the size of the largest structure of any split.

        The atoms are visited ``chunk`` structures at a time (bounded memory on large stores).
        """
        train, elements = self.indices("train"), set()
        for start in range(0, len(train), chunk):
            part = train[start:start + chunk]
            nodes = concat_ranges(self.store.node_ptr[part], self.store.n_node[part])
            elements.update(np.unique(self.store.atomic_numbers[nodes]).tolist())
        return Domain(frozenset(int(z) for z in elements), periodic, int(self.store.n_node.max(initial=1)))


def make_datasets(store: GraphStore, splits: dict[str, np.ndarray], target: str, standardize: bool = True) -> Datasets:
    """`Datasets` of ``store`` with the target scaler computed on the training split.

    Raises:
      ValueError: for a target the store lacks, or a training split without any finite target.
    """
    if target not in store.targets:
        raise ValueError(f"config.data.target={target!r} is not in the data set; available: {sorted(store.targets)}")
    values = store.targets[target][np.asarray(splits["train"], np.int64)]
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError(f"no finite {target!r} target in the training split")
    mean, std = (float(np.mean(values[finite])), float(np.std(values[finite]))) if standardize else (0.0, 1.0)
    return Datasets(store, {k: np.asarray(v, np.int64) for k, v in splits.items()}, target, mean,
                    std if std > 0 else 1.0)


def data_source(data: ml_collections.ConfigDict) -> datasets.Source:
    """The data set's own options of ``config.data``."""
    return datasets.Source(limit=data.limit or None, source_dir=data.source_dir, paths=data.paths,
                           file_format=data.file_format,
                           columns=tuple(data.columns.split(":")) if data.columns else (),
                           group_by=data.group_by, molecules=data.molecules)


def training_periodicity(data: ml_collections.ConfigDict) -> bool | None:
    """Whether ``config.data``'s structures are crystals (True), molecules (False) or either."""
    return datasets.periodicity(data.dataset, data_source(data))


def get_datasets(config: ml_collections.ConfigDict) -> Datasets:
    """Loads ``config.data``'s data set (`datasets.load`) and its target scaler."""
    data = config.data
    store, splits = datasets.load(
        data.dataset, featurizer=featurize.graph_settings(data.graph_builder, data.featurizer.to_dict()),
        source=data_source(data), cache_dir=data.data_dir or None, ring=data.ring,
        num_workers=data.num_workers or None, seed=config.split_seed)
    return make_datasets(store, splits, data.target, data.standardize)


# --------------------------------------------------------------------------------------------
# Factories: the only functions that read the model / optimiser sections of the config.


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The network of ``config.model`` (``models.build_model``).

    Raises:
      ValueError: for an unknown network, or a SCANN name that contradicts ``g_update``.
    """
    models.check_name(config.model)
    return models.build_model(config.model)


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimiser of ``config.optimizer`` (``optim.create_optimizer``)."""
    return optim.create_optimizer(config.optimizer, steps_per_epoch)


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    example: jraph.GraphsTuple,
    target_mean: float,
    target_std: float,
) -> TrainState:
    """Initialises the network on ``example`` (one unstacked padded batch) with ``config.seed``."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = jax.jit(lambda k, g: {c: v for c, v in model.init(k, g).items() if c != "intermediates"}
                        )(init_key, example)
    params = variables.pop("params")
    model_state = dict(variables)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, target_mean=jnp.float32(target_mean),
                             target_std=jnp.float32(target_std), rng=rng, model_state=model_state)


# --------------------------------------------------------------------------------------------
# Pure steps. Inside shard_map, every array of `batch` has a leading device axis of size 1.


def _targets_and_mask(state: TrainState, graphs: jraph.GraphsTuple) -> tuple[jax.Array, jax.Array]:
    """Standardised targets [G] (0 where masked) and the mask [G] of real graphs with a target."""
    target = graphs.globals["target"]
    mask = jraph.get_graph_padding_mask(graphs) & jnp.isfinite(target)
    scaled = (jnp.where(mask, target, state.target_mean) - state.target_mean) / state.target_std
    return scaled, mask


def _psum(tree: Any) -> Any:
    return jax.lax.psum(tree, parallel.AXIS)


def _error_metrics(sums: dict[str, jax.Array], std: jax.Array) -> dict[str, jax.Array]:
    """Summed errors in target units (from standardised sums) and the count."""
    return {"abs_err": sums["abs_error_sum"] * std, "sq_err": sums["squared_error_sum"] * std**2,
            "count": sums["count"]}


def train_step(state: TrainState, batch: jraph.GraphsTuple, *, loss: Callable[[jax.Array, jax.Array], jax.Array],
               regularizer: Callable[[Any, float], jax.Array], coeff: float) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on the global batch (runs under ``make_steps``' shard_map).

    Args:
      state: replicated train state.
      batch: this device's padded GraphsTuple, every leaf with a leading axis of size 1.
      loss: ``losses.LOSSES`` entry: (summed squared error, count) of the global batch -> loss.
      regularizer: the network's ``(params, coeff) -> penalty``.
      coeff: its coefficient.

    Returns:
      (new state, metrics): metrics are sums over the global batch — ``abs_err``, ``sq_err``
      (target units), ``count`` (graphs with a target) — plus ``loss``/``rmse`` of the step,
      ``steps`` (1) and ``nonfinite`` (1 if the update was skipped). The dropout key is
      ``fold_in(fold_in(rng, step), device)``.
    """
    graphs = parallel.unstack_local(batch)
    scaled, mask = _targets_and_mask(state, graphs)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(parallel.AXIS))
    mutable = list(state.model_state)

    def loss_fn(params):
        outputs = state.apply_fn(state.variables(params), graphs, train=True, rngs={"dropout": key},
                                 mutable=mutable or False)
        (predictions, _), model_state = outputs if mutable else (outputs, {})
        sums = _psum(losses.metric_sums(predictions, scaled, mask))
        value = loss(sums["squared_error_sum"], sums["count"])
        return value + regularizer(params, coeff), (value, sums, model_state)

    (total, (value, sums, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    finite = jax.tree.reduce(lambda ok, g: ok & jnp.isfinite(g).all(), grads, jnp.isfinite(total))
    updated = state.apply_gradients(grads=grads)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        params=keep(updated.params, state.params),
        opt_state=keep(updated.opt_state, state.opt_state),
        model_state=keep(jax.lax.pmean(dict(model_state), parallel.AXIS), state.model_state),
    )
    metrics = {"loss": jnp.where(finite, total, 0.0), "rmse": jnp.where(finite, value, 0.0),
               **_error_metrics(sums, state.target_std), "steps": jnp.float32(1.0),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return new_state, metrics


def model_outputs(apply_fn: Callable, variables: Any, graphs: jraph.GraphsTuple, target_mean: jax.Array,
                  target_std: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """The network in inference mode: (predictions [G] in target units, node scores [N] or None).

    The one inference path: evaluation, ``predict_step`` and the `predict.Predictor` use it.
    """
    predictions, node_scores = apply_fn(variables, graphs, train=False)
    return predictions * target_std + target_mean, node_scores


def eval_step(state: TrainState, batch: jraph.GraphsTuple) -> dict[str, jax.Array]:
    """Sums ``abs_err``, ``sq_err`` (target units) and ``count`` over the global batch."""
    graphs = parallel.unstack_local(batch)
    scaled, mask = _targets_and_mask(state, graphs)
    predictions, _ = model_outputs(state.apply_fn, state.variables(), graphs, 0.0, 1.0)
    return _error_metrics(_psum(losses.metric_sums(predictions, scaled, mask)), state.target_std)


def predict_step(state: TrainState, batch: jraph.GraphsTuple) -> jax.Array:
    """Predictions in target units, [1, G] per device ([D, G] globally)."""
    graphs = parallel.unstack_local(batch)
    predictions, _ = model_outputs(state.apply_fn, state.variables(), graphs, state.target_mean, state.target_std)
    return predictions[None]


class TraceCounter:
    """Counts how often a function is traced: under ``jax.jit`` once per new input shape, i.e.
    the number of compilations."""

    def __init__(self, fn: Callable):
        self.fn, self.count = fn, 0
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        return self.fn(*args, **kwargs)


@dataclasses.dataclass
class Steps:
    """The jitted steps of one mesh; each compiles once per bucket shape.

    ``train(state, batch) -> (state, metrics)``, ``eval(state, batch) -> metrics`` (sums and
    counts in target units, divided on the host) and ``predict(state, batch) -> [D, G]``
    predictions in target units. ``state`` is donated to ``train``.
    """

    train: Callable
    eval: Callable
    predict: Callable
    traces: dict[str, TraceCounter]

    def compile_counts(self) -> dict[str, int]:
        return {name: counter.count for name, counter in self.traces.items()}


def make_steps(mesh: jax.sharding.Mesh, model_config: Any, loss: str, coeff: float) -> Steps:
    """``train_step``, ``eval_step`` and ``predict_step`` for ``mesh``, with the loss
    (``losses.LOSSES`` name) and the regulariser of the network ``model_config`` names."""
    if loss not in losses.LOSSES:
        raise ValueError(f"config.loss={loss!r}: unknown; known: {', '.join(losses.LOSSES)}")
    regularizer = models.get_spec(model_config).regularizer
    traces = {"train": TraceCounter(functools.partial(train_step, loss=losses.LOSSES[loss],
                                                      regularizer=regularizer, coeff=coeff)),
              "eval": TraceCounter(eval_step), "predict": TraceCounter(predict_step)}
    data = (P(), P(parallel.AXIS))
    train = parallel.data_parallel(traces["train"], mesh, data, (P(), P()))
    evaluate = parallel.data_parallel(traces["eval"], mesh, data, P())
    predict = parallel.data_parallel(traces["predict"], mesh, data, P(parallel.AXIS))
    return Steps(train=jax.jit(train, donate_argnums=0), eval=jax.jit(evaluate), predict=jax.jit(predict),
                 traces=traces)


def set_learning_rate(state: TrainState, lr: float, mesh: jax.sharding.Mesh) -> TrainState:
    """Returns ``state`` with the injected learning rate set to ``lr`` (replicated on ``mesh``)."""
    return state.replace(opt_state=optim.set_learning_rate(state.opt_state, lr,
                                                           lambda x: parallel.replicate(x, mesh)))


# --------------------------------------------------------------------------------------------
# The trainer-construction seam: main.py (through train_and_evaluate), tests and benchmarks.


@dataclasses.dataclass
class Trainer:
    """Everything a run, a test or a benchmark needs, built once by `setup`.

    Attributes:
      config: the run's config.
      mesh: the ``('data',)`` mesh.
      data: the data set, its splits and target scaler.
      train_plan: training batches.
      eval_plans: split name -> evaluation batches (shapes shared by all splits).
      state: the replicated train state (parameters from ``config.init_from`` if set).
      steps: the jitted steps.
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    data: Datasets
    train_plan: BatchPlan
    eval_plans: dict[str, BatchPlan]
    state: TrainState
    steps: Steps


def setup(config: ml_collections.ConfigDict, data: Datasets | None = None,
          mesh: jax.sharding.Mesh | None = None) -> Trainer:
    """Builds the data plans, network, optimiser, state and steps of ``config``.

    Args:
      config: the run config.
      data: the data set (default ``get_datasets(config)``).
      mesh: the device mesh (default every device).
    """
    for key in ("batch_size", "eval_batch_size", "num_buckets", "num_epochs"):
        if config[key] < 1:
            raise ValueError(f"config.{key}={config[key]}: must be at least 1")
    mesh = parallel.make_mesh() if mesh is None else mesh
    data = get_datasets(config) if data is None else data
    target = data.target
    everything = np.arange(len(data.store))
    train_plan = batching.make_plan(data.store, data.indices("train"), target, config.batch_size,
                                    config.num_buckets, mesh)
    eval_plans = {name: batching.make_plan(data.store, data.indices(name), target, config.eval_batch_size,
                                           config.num_buckets, mesh, everything) for name in SPLITS}
    train_size = len(data.indices("train"))
    if 0 < config.final_train_eval_limit < train_size:
        # The final training-split MAE on a fixed random subset (bounds the final evaluation).
        keep = np.sort(np.random.default_rng(config.seed).permutation(train_size)[:config.final_train_eval_limit])
        eval_plans["train"] = batching.make_plan(data.store, data.indices("train")[keep], target, config.eval_batch_size,
                                                 config.num_buckets, mesh, everything)
    model = create_model(config)
    tx = create_optimizer(config, train_plan.num_batches())
    first = train_plan.order(None, 0)[:min(train_size, config.batch_size)]
    example = jax.tree.map(lambda x: x[0], train_plan.batch(first))
    state = create_train_state(config, model, tx, example, data.mean, data.std)
    if config.init_from:
        state = state.replace(params=checkpoints.load_init_params(config.init_from, state.params,
                                                                  config.model.to_dict()))
        log.info("initialised parameters from %s", config.init_from)
    state = parallel.replicate(state, mesh)
    steps = make_steps(mesh, config.model, config.loss, config.optimizer.l2)
    return Trainer(config, mesh, data, train_plan, eval_plans, state, steps)


# --------------------------------------------------------------------------------------------
# Host-side loop.


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

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> RunSettings:
        return cls(seed=config.seed, num_epochs=config.num_epochs, patience=config.patience,
                   max_wall_time_s=config.max_wall_time_s, checkpoint_every_steps=config.checkpoint_every_steps,
                   checkpoint_every_minutes=config.checkpoint_every_minutes,
                   log_every_steps=max(config.log_every_steps, 1), prefetch=config.prefetch,
                   target=config.data.target, units=config.data.units)


@dataclasses.dataclass
class LoopState:
    """Where the loop is; checkpointed with the train state (as JSON meta) and restored on resume.

    Attributes:
      epoch: current epoch (0-based).
      batch_index: batches of ``epoch`` already taken.
      epoch_lr: the epoch schedule's rate for ``epoch`` (None until the epoch starts).
      lr_scale: product of the halvings after non-finite steps.
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
        self.last_save = self.start

    def train_speed(self, structures_per_s: float) -> None:
        """Estimates the final evaluation from the training speed of a log interval, until an
        evaluation speed is measured. The run's first interval is not used: it includes the
        compilations, which made a 95-minute budget stop before the first epoch on a busy
        machine."""
        self.intervals += 1
        if not self.measured and self.intervals > 1:
            self.final_eval_s = (FINAL_EVAL_MARGIN * self.final_structures
                                 / (FORWARD_FRACTION_OF_STEP * max(structures_per_s, 1e-9)) + FINAL_EVAL_OVERHEAD_S)

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


def report_missing_targets(plan: BatchPlan, split: str) -> int:
    """Logs every structure of the split whose target is not finite; returns how many.

    Such structures stay in the batches but are masked out of loss and metrics (never trained on).
    """
    values = plan.store.targets[plan.target][plan.indices]
    bad = np.flatnonzero(~np.isfinite(values))
    for position in bad:
        log.warning("%s structure with data set index %d (position %d in the split) has %s = %s: "
                    "masked out, not trained on", split, plan.store.index[plan.indices[position]], position,
                    plan.target, float(values[position]))
    return len(bad)


def _add(total: dict[str, Any] | None, metrics: dict[str, Any]) -> dict[str, Any]:
    return metrics if total is None else jax.tree.map(jnp.add, total, metrics)


def _host(sums: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in parallel.to_host(sums).items()}


def _summarise(sums: dict[str, float]) -> dict[str, float]:
    """Turns summed metrics into means (MAE, RMSE in target units; loss per step)."""
    count = max(sums.get("count", 0.0), 1.0)
    out = {"mae": sums["abs_err"] / count, "rmse": math.sqrt(sums["sq_err"] / count), "count": sums["count"]}
    if "steps" in sums:
        out["loss"] = sums["loss"] / max(sums["steps"] - sums["nonfinite"], 1.0)
    return out


def evaluate(steps: Steps, state: TrainState, plan: BatchPlan, mesh: jax.sharding.Mesh,
             prefetch_size: int = 2) -> dict[str, float]:
    """MAE / RMSE (target units) of ``state`` over a whole split.

    Also returns ``structures_per_s``: the evaluation speed without the batches that compiled.
    """
    total, compile_s, start = None, 0.0, time.time()
    for batch in batching.device_batches(plan, mesh, None, 0, 0, prefetch_size):
        compiled, t = steps.traces["eval"].count, time.time()
        metrics = steps.eval(state, batch)
        if steps.traces["eval"].count != compiled:
            jax.block_until_ready(metrics)
            compile_s += time.time() - t
        total = _add(total, metrics)
    summary = _summarise(_host(total))
    summary["structures_per_s"] = len(plan) / max(time.time() - start - compile_s, 1e-9)
    return summary


def predict_split(steps: Steps, state: TrainState, plan: BatchPlan, mesh: jax.sharding.Mesh
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, targets) [S] in target units, in the split's order."""
    from jax.experimental import multihost_utils

    predictions = []
    for positions in np.array_split(np.arange(len(plan)), plan.num_batches()):
        indices = plan.indices[positions]
        batch = parallel.shard_batch(plan.batch(indices), mesh)
        out = multihost_utils.process_allgather(steps.predict(state, batch), tiled=True)  # [D, G]
        predictions.extend(out[d, :len(c)] for d, c in enumerate(plan.chunks(indices)))
    return np.concatenate(predictions), plan.store.targets[plan.target][plan.indices].copy()


def _best_tree(state: TrainState) -> dict[str, Any]:
    """What ``best/`` keeps of a state: the variables and the target scaler."""
    return {"params": state.params, "model_state": state.model_state, "target_mean": state.target_mean,
            "target_std": state.target_std}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, datasets: Datasets | None = None
                       ) -> dict[str, Any]:
    """Trains one model as ``config`` says, resuming from ``workdir`` if it holds a checkpoint.

    ``datasets`` replaces ``get_datasets(config)`` (tests, or data already in memory). A
    multi-process run must have called ``parallel.initialize_distributed`` first (``main.py``
    does).

    Before anything is written the workdir is locked (`checkpoints.WorkdirLock`: a second run on
    it is refused, naming the first) and checked (`checkpoints.check_workdir_config`: a run with
    an incompatible config is refused); the outputs of an earlier run that left no checkpoint
    are moved to ``previous/``. SIGTERM or SIGINT saves a checkpoint and stops the run (resumed
    by the next start); a checkpoint is also written every ``checkpoint_every_minutes``.

    Writes to ``workdir``: ``config.json``, ``target_scaler.json``, ``domain.json``,
    ``checkpoints/``, ``best/``, ``metrics.jsonl`` (one line per epoch and per log interval),
    ``results.json`` (metrics of every split with the best-validation params, in target units)
    and PNGs (test parity plot, learning curves).

    Returns:
      The contents of ``results.json``; after a signal, ``{"stop_reason", "signal"}`` only.

    Raises:
      checkpoints.WorkdirBusyError: another run holds the workdir.
      checkpoints.CheckpointError: the workdir holds a run with an incompatible config.
    """
    workdir_path = Path(workdir).absolute()
    workdir_path.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()
    lock = checkpoints.WorkdirLock(workdir_path) if jax.process_index() == 0 else None
    try:
        checkpoints.check_workdir_config(workdir_path, config_dict)
        if jax.process_count() == 1 and not checkpoints.has_checkpoint(workdir_path):
            checkpoints.archive_earlier_run(workdir_path)
        with StopSignals() as stop_signals:
            return _train(config, config_dict, workdir_path, datasets, stop_signals)
    finally:
        if lock is not None:
            lock.release()


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


def _agreed(*flags: bool) -> list[bool]:
    """Host-side flags OR-ed over all processes (every process takes the same branch)."""
    values = np.array(flags, np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        values = np.asarray(multihost_utils.process_allgather(values)).reshape(-1, len(flags)).max(0)
    return [bool(v) for v in values]


def _train(config: ml_collections.ConfigDict, config_dict: dict[str, Any], workdir_path: Path,
           datasets: Datasets | None, stop_signals: StopSignals) -> dict[str, Any]:
    """The body of `train_and_evaluate`, once the workdir is locked and checked."""
    from tqdm import tqdm

    run = RunSettings.from_config(config)
    log.info("devices: %d (%d local) %s", jax.device_count(), jax.local_device_count(), jax.devices()[0].platform)
    trainer = setup(config, datasets)
    mesh, data, train_plan, plans, steps = trainer.mesh, trainer.data, trainer.train_plan, trainer.eval_plans, trainer.steps
    state = trainer.state
    for name, plan in plans.items():
        report_missing_targets(plan, name)
    steps_per_epoch = train_plan.num_batches()
    log.info("splits: %s; target %s mean %.6g std %.6g %s (training split)",
             {k: len(data.indices(k)) for k in SPLITS}, run.target, data.mean, data.std, run.units)

    ckpt = checkpoints.Checkpointer(workdir_path, config_dict, keep=config.checkpoints_to_keep)
    checkpoints.write_json(workdir_path / checkpoints.CONFIG_FILE, config_dict)
    checkpoints.write_json(workdir_path / checkpoints.SCALER_FILE,
                           {"target": run.target, "units": run.units, "mean": data.mean, "std": data.std})
    checkpoints.write_json(workdir_path / checkpoints.DOMAIN_FILE,
                           data.domain(training_periodicity(config.data)).to_json())

    schedule = optim.create_epoch_schedule(config.optimizer)
    loop = LoopState()
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, meta = restored
        loop = LoopState.from_json(meta["loop"])
        if loop.stop_reason.startswith(("max_wall_time_s", "stopped by")):
            loop.stop_reason = ""  # a new start: a new wall-time budget, the signal is past
        schedule.load_state_dict(meta["schedule"])
        log.info("resuming from %s/%d: epoch %d, batch %d of %d", workdir_path / checkpoints.PERIODIC_DIR,
                 int(state.step), loop.epoch, loop.batch_index, steps_per_epoch)
        print(f"Resuming from checkpoint step {int(state.step)} (epoch {loop.epoch}, "
              f"batch {loop.batch_index}/{steps_per_epoch}) in {workdir_path}", flush=True)

    def meta() -> dict[str, Any]:
        return {"loop": loop.to_json(), "schedule": schedule.state_dict()}

    writer = reporting.MetricsWriter(workdir_path, enabled=jax.process_index() == 0)
    clock = WallClock(run.max_wall_time_s, sum(len(p) for p in plans.values()))
    stop = loop.stop_reason != ""
    while not stop and loop.epoch < run.num_epochs:
        epoch = loop.epoch
        if loop.batch_index == 0 or loop.epoch_lr is None:
            loop.epoch_lr = schedule.lr_for_epoch(epoch)
        state = set_learning_rate(state, loop.epoch_lr * loop.lr_scale, mesh)
        sums = None if loop.epoch_sums is None else parallel.replicate(
            {k: np.float32(v) for k, v in loop.epoch_sums.items()}, mesh)
        seen_nonfinite = 0.0 if loop.epoch_sums is None else loop.epoch_sums["nonfinite"]
        epoch_start = time.time()
        last_log = (epoch_start, 0.0 if loop.epoch_sums is None else loop.epoch_sums["count"])
        batches = batching.device_batches(train_plan, mesh, run.seed, epoch, loop.batch_index, run.prefetch)
        bar = tqdm(batches, total=steps_per_epoch, initial=loop.batch_index, desc=f"epoch {epoch}",
                   disable=jax.process_index() != 0, leave=False, mininterval=1.0)
        for batch in bar:
            state, metrics = steps.train(state, batch)
            sums = _add(sums, metrics)
            loop.batch_index += 1
            last_batch = loop.batch_index == steps_per_epoch
            if loop.batch_index % run.log_every_steps == 0 or last_batch:
                host = _host(sums)
                if host["nonfinite"] > seen_nonfinite:
                    loop.lr_scale *= 0.5
                    seen_nonfinite = host["nonfinite"]
                    log.warning("non-finite loss or gradient before step %d: update(s) skipped, state "
                                "kept at the last good step, learning rate halved to %.3g",
                                int(state.step), loop.epoch_lr * loop.lr_scale)
                    state = set_learning_rate(state, loop.epoch_lr * loop.lr_scale, mesh)
                running = _summarise(host)
                rate = host["count"] / max(time.time() - epoch_start, 1e-9)
                now = time.time()
                # the speed since the last interval: the first intervals include compilation
                clock.train_speed((host["count"] - last_log[1]) / max(now - last_log[0], 1e-9))
                last_log = (now, host["count"])
                bar.set_postfix(loss=f"{running['loss']:.4f}", mae=f"{running['mae']:.4g}", mol_s=f"{rate:.0f}")
                writer.write({"epoch": epoch, "step": int(state.step),
                              "epoch_progress": epoch + loop.batch_index / steps_per_epoch,
                              "running_train_loss": running["loss"],
                              "running_train_mae": running["mae"], "train_mol_per_s": rate})
            step_due = bool(run.checkpoint_every_steps) and loop.batch_index % run.checkpoint_every_steps == 0
            signalled = time_due = False
            if loop.batch_index % run.log_every_steps == 0 or step_due:
                signalled, time_due = _agreed(stop_signals.received is not None,
                                              clock.checkpoint_due(run.checkpoint_every_minutes))
            if signalled:
                name = signal.Signals(stop_signals.received or signal.SIGTERM).name
                loop.stop_reason = f"stopped by {name} in epoch {epoch}"
                break
            if (step_due or time_due) and not last_batch:
                loop.epoch_sums = _host(sums)
                ckpt.save(int(state.step), state, meta())
                clock.saved()
            if clock.out_of_time():
                loop.stop_reason = f"max_wall_time_s={run.max_wall_time_s} reached in epoch {epoch}"
                break
        bar.close()
        if loop.stop_reason:
            loop.epoch_sums = _host(sums) if sums else None
            ckpt.save(int(state.step), state, meta())
            clock.saved()
            break
        train_metrics = _summarise(_host(sums))
        epoch_time = time.time() - epoch_start
        val_metrics = evaluate(steps, state, plans["validation"], mesh, run.prefetch)
        clock.eval_speed(val_metrics["structures_per_s"])
        schedule.update(val_metrics["mae"] / data.std)  # the original compares standardised MAE
        if val_metrics["mae"] < loop.best_val_mae:
            loop.best_val_mae, loop.best_epoch, loop.epochs_since_best = val_metrics["mae"], epoch, 0
            ckpt.save_best(epoch, _best_tree(state), {"epoch": epoch, "val_mae": val_metrics["mae"]})
        else:
            loop.epochs_since_best += 1
        record = {"epoch": epoch, "step": int(state.step), "lr": loop.epoch_lr * loop.lr_scale,
                  "train_loss": train_metrics["loss"], "train_mae": train_metrics["mae"],
                  "val_mae": val_metrics["mae"], "val_rmse": val_metrics["rmse"], "units": run.units,
                  "epoch_time_s": epoch_time, "train_mol_per_s": train_metrics["count"] / max(epoch_time, 1e-9),
                  "best_val_mae": loop.best_val_mae}
        writer.write(record)
        log.info("epoch %d: loss %.4f train MAE %.4g val MAE %.4g %s (best %.4g @ %d), lr %.3g, %.0f mol/s",
                 epoch, record["train_loss"], record["train_mae"], record["val_mae"], run.units,
                 loop.best_val_mae, loop.best_epoch, record["lr"], record["train_mol_per_s"])
        loop.epoch, loop.batch_index, loop.epoch_lr, loop.epoch_sums = epoch + 1, 0, None, None
        if loop.epochs_since_best >= run.patience:
            loop.stop_reason = f"early stopping: no validation improvement for {run.patience} epochs"
        elif clock.out_of_time():
            loop.stop_reason = f"max_wall_time_s={run.max_wall_time_s} reached after epoch {epoch}"
        ckpt.save(int(state.step), state, meta())
        clock.saved()
        stop = loop.stop_reason != ""
    if not loop.stop_reason:
        loop.stop_reason = f"num_epochs={run.num_epochs} reached"
    ckpt.wait_until_finished()
    log.info("training stopped: %s", loop.stop_reason)
    if loop.stop_reason.startswith("stopped by"):
        ckpt.close()
        print(f"{loop.stop_reason}: checkpoint saved at step {int(state.step)} in {workdir_path}; "
              "the next start resumes from it", flush=True)
        return {"stop_reason": loop.stop_reason, "signal": int(stop_signals.received or signal.SIGTERM)}

    results = _final_evaluation(run, workdir_path, ckpt, trainer, state, loop, writer)
    results["config"] = config_dict
    results["compile_counts"] = steps.compile_counts()
    results["wall_time_s"] = clock.elapsed()
    checkpoints.write_json(workdir_path / RESULTS_FILE, results)
    ckpt.close()
    return results


def _final_evaluation(run: RunSettings, workdir: Path, ckpt: checkpoints.Checkpointer, trainer: Trainer,
                      state: TrainState, loop: LoopState, writer: reporting.MetricsWriter) -> dict[str, Any]:
    """Metrics of every split with the best-validation variables; parity plot and learning curves."""
    if ckpt.best_meta() is not None:
        best = ckpt.restore_best(_best_tree(state))
        state = state.replace(params=best["params"], model_state=best["model_state"])
        params_from = f"best validation epoch {ckpt.best_meta()['epoch']}"
    else:
        params_from = "last step (no epoch finished)"
    plans, mesh, data = trainer.eval_plans, trainer.mesh, trainer.data
    maes = {name: evaluate(trainer.steps, state, plan, mesh, run.prefetch) for name, plan in plans.items()}
    predictions, targets = predict_split(trainer.steps, state, plans["test"], mesh)
    results = {
        "target": run.target,
        "units": run.units,
        "test_mae": maes["test"]["mae"],
        "mae": {name: m["mae"] for name, m in maes.items()},
        "rmse": {name: m["rmse"] for name, m in maes.items()},
        "num_structures": {name: int(m["count"]) for name, m in maes.items()},
        "train_mae_on": ("whole training split" if len(plans["train"]) == len(data.indices("train"))
                         else f"random subset of {len(plans['train'])} training structures"),
        "params_from": params_from,
        "best_epoch": loop.best_epoch,
        "epochs_run": loop.epoch,
        "steps_run": int(state.step),
        "stop_reason": loop.stop_reason,
        "target_scaler": {"mean": data.mean, "std": data.std, "computed_on": "training split"},
        "code_version": reporting.code_version(),
    }
    log.info("test MAE %.5g %s (%s)", results["test_mae"], run.units, params_from)
    if writer.enabled:
        reporting.plot_parity(workdir / reporting.PARITY_PLOT, predictions, targets, run.units, run.target)
        reporting.plot_learning_curves(workdir / reporting.CURVES_PLOT, writer.read(), run.units, run.target)
    return results
