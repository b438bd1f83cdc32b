"""Training and evaluation of SCANN / SCANN+ (reference §3), data parallel over all devices.

``train_and_evaluate(config, workdir)`` is the whole job: data → buckets → model → epochs of
``train_step`` with validation, SGDR, early stopping and checkpoints → test metrics, plots and
``results.json``. Only the ``create_*`` factories and ``train_and_evaluate`` read the config.

Steps are pure and run under ``jax.shard_map`` over the ``('data',)`` mesh (``parallel.py``):
the batch argument holds one padded GraphsTuple per device, stacked on a leading axis. The loss
is the original's RMSE over the *global* batch (sums and counts combined with ``psum`` before
the square root) plus the L2 term, so any number of devices computes the gradient of one
device holding the whole batch. Graphs with a NaN target are masked out of loss and metrics.

Departures from the original, on purpose: the target is standardised with the training split's
mean and std (the original used the whole data set); a step whose loss or gradient is not
finite is not applied (the state stays at the last good step) and the learning rate is halved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import PartitionSpec as P

import scannet_jax
from scannet_jax import batching, checkpoints, losses, models, parallel, schedules
from scannet_jax.graphs import Domain, GraphStore

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"


class TrainState(train_state.TrainState):
    """Parameters, optimiser state and everything else a resumed run needs on device.

    Attributes:
      target_mean: float32 [], mean of the training targets (target units).
      target_std: float32 [], their population std; predictions are y·std + mean.
      rng: uint32 [2], base key; step t uses ``fold_in(rng, t)`` for dropout.
    """

    target_mean: jax.Array
    target_std: jax.Array
    rng: jax.Array


# --------------------------------------------------------------------------------------------
# Factories: the only functions that read model / optimiser keys of the config.


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The network of ``config.model`` (``models.build_model``)."""
    return models.build_model(config.model)


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """Adam with the original's schedule (reference §3).

    The learning rate is an injected hyperparameter (``opt_state.hyperparams["learning_rate"]``)
    that the host sets at every epoch from the epoch schedule; the per-step factor (legacy
    inverse-time decay, and the cosine if chosen) is applied inside the update.

    Args:
      config: the run config (reads ``config.optimizer``).
      steps_per_epoch: optimiser steps per epoch (lays out the cosine schedule).
    """
    opt = config.optimizer
    factor = schedules.step_factor_schedule(
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


def create_epoch_schedule(config: ml_collections.ConfigDict) -> schedules.EpochSchedule:
    """SGDR (``optimizer.schedule == "sgdr"``) or a constant epoch rate."""
    opt = config.optimizer
    if opt.schedule == "sgdr":
        return schedules.SGDR(
            lr_max=opt.lr,
            lr_min=opt.min_lr,
            t0=opt.sgdr_t0,
            tmult=opt.sgdr_tmult,
            compression=opt.sgdr_compression,
            trigger=opt.sgdr_trigger,
        )
    return schedules.ConstantLR(opt.lr)


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    example: jraph.GraphsTuple,
    target_mean: float,
    target_std: float,
) -> TrainState:
    """Initialises parameters on ``example`` (one unstacked padded batch) with ``config.seed``."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(config.seed))
    params = jax.jit(lambda k, g: model.init(k, g)["params"])(init_key, example)
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        target_mean=jnp.float32(target_mean),
        target_std=jnp.float32(target_std),
        rng=rng,
    )


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


def train_step(state: TrainState, batch: jraph.GraphsTuple, *, l2: float) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on the global batch (runs under ``make_steps``' shard_map).

    Args:
      state: replicated train state.
      batch: this device's padded GraphsTuple, every leaf with a leading axis of size 1.
      l2: coefficient of the L2 penalty.

    Returns:
      (new state, metrics): metrics are sums over the global batch — ``abs_err``, ``sq_err``
      (target units), ``count`` (graphs with a target) — plus ``loss``/``rmse`` of the step,
      ``steps`` (1) and ``nonfinite`` (1 if the update was skipped). The dropout key is
      ``fold_in(fold_in(rng, step), device)``.
    """
    graphs = parallel.unstack_local(batch)
    scaled, mask = _targets_and_mask(state, graphs)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(parallel.AXIS))

    def loss_fn(params):
        predictions, _ = state.apply_fn({"params": params}, graphs, train=True, rngs={"dropout": key})
        sums = _psum(losses.metric_sums(predictions, scaled, mask))
        # The original's RMSE over the whole global batch; guarded like losses.original_loss.
        mse = sums["squared_error_sum"] / jnp.maximum(sums["count"], 1.0)
        rmse = jnp.where(mse > 0, jnp.sqrt(jnp.where(mse > 0, mse, 1.0)), 0.0)
        return rmse + losses.l2_penalty(params, l2), (rmse, sums)

    (loss, (rmse, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    finite = jax.tree.reduce(lambda ok, g: ok & jnp.isfinite(g).all(), grads, jnp.isfinite(loss))
    updated = state.apply_gradients(grads=grads)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        params=keep(updated.params, state.params),
        opt_state=keep(updated.opt_state, state.opt_state),
    )
    std = state.target_std
    metrics = {
        "loss": jnp.where(finite, loss, 0.0),
        "rmse": jnp.where(finite, rmse, 0.0),
        "abs_err": sums["abs_error_sum"] * std,
        "sq_err": sums["squared_error_sum"] * std**2,
        "count": sums["count"],
        "steps": jnp.float32(1.0),
        "nonfinite": 1.0 - finite.astype(jnp.float32),
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: jraph.GraphsTuple) -> dict[str, jax.Array]:
    """Sums ``abs_err``, ``sq_err`` (target units) and ``count`` over the global batch."""
    graphs = parallel.unstack_local(batch)
    scaled, mask = _targets_and_mask(state, graphs)
    predictions, _ = state.apply_fn({"params": state.params}, graphs, train=False)
    sums = _psum(losses.metric_sums(predictions, scaled, mask))
    std = state.target_std
    return {"abs_err": sums["abs_error_sum"] * std, "sq_err": sums["squared_error_sum"] * std**2,
            "count": sums["count"]}


def predict_step(state: TrainState, batch: jraph.GraphsTuple) -> jax.Array:
    """Predictions in target units, [1, G] per device ([D, G] globally)."""
    graphs = parallel.unstack_local(batch)
    predictions, _ = state.apply_fn({"params": state.params}, graphs, train=False)
    return (predictions * state.target_std + state.target_mean)[None]  # [1, G], target units


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

    def compile_counts(self) -> dict[str, int]:
        return {name: getattr(self, name)._cache_size() for name in ("train", "eval", "predict")}


def make_steps(mesh: jax.sharding.Mesh, l2: float) -> Steps:
    """Builds ``train_step``, ``eval_step`` and ``predict_step`` for ``mesh``."""
    train = parallel.data_parallel(
        functools.partial(train_step, l2=l2), mesh, (P(), P(parallel.AXIS)), (P(), P())
    )
    evaluate = parallel.data_parallel(eval_step, mesh, (P(), P(parallel.AXIS)), P())
    predict = parallel.data_parallel(predict_step, mesh, (P(), P(parallel.AXIS)), P(parallel.AXIS))
    return Steps(
        train=jax.jit(train, donate_argnums=0), eval=jax.jit(evaluate), predict=jax.jit(predict)
    )


def set_learning_rate(state: TrainState, lr: float, mesh: jax.sharding.Mesh) -> TrainState:
    """Returns ``state`` with the injected Adam learning rate set to ``lr``."""
    hyper = dict(state.opt_state.hyperparams)
    hyper["learning_rate"] = parallel.replicate(np.asarray(lr, np.float32), mesh)
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyper))


# --------------------------------------------------------------------------------------------
# Batches: global batches → one chunk per device → padded to a shared bucket → stacked.


@dataclasses.dataclass
class BatchPlan:
    """How a split is cut into steps: one global batch per step, one padded chunk per device.

    Chunking and bucket choice are those of ``batching.stack_device_batches`` (the same on every
    process), but a process pads only the chunks of its own devices.

    Attributes:
      store: the split's graphs.
      target: name of the target in ``store.targets``.
      batch_size: global batch size (over all devices).
      buckets: padded shapes of one device's chunk, smallest first.
      num_devices: devices in the mesh.
      local_devices: positions in the mesh of the devices this process feeds.
    """

    store: GraphStore
    target: str
    batch_size: int
    buckets: list[batching.Bucket]
    num_devices: int
    local_devices: range

    def num_batches(self) -> int:
        return batching.num_batches(len(self.store), self.batch_size)

    def order(self, seed: int | None, epoch: int) -> np.ndarray:
        """Structure order of ``epoch``: shuffled by (seed, epoch), or as stored if seed is None."""
        everything = np.arange(len(self.store))
        return batching.epoch_order(everything, seed=seed or 0, epoch=epoch, shuffle=seed is not None)

    def chunks(self, indices: np.ndarray) -> list[np.ndarray]:
        return np.array_split(np.asarray(indices, np.int64), self.num_devices)

    def bucket_for(self, chunks: list[np.ndarray]) -> batching.Bucket:
        """Smallest bucket that holds every chunk of the global batch."""
        n_node, n_edge = self.store.n_node, self.store.n_edge
        return max((batching.select_bucket(int(n_node[c].sum()), int(n_edge[c].sum()), len(c), self.buckets)
                    for c in chunks), key=self.buckets.index)

    def batch(self, indices: np.ndarray) -> jraph.GraphsTuple:
        """This process's padded chunks of one global batch, stacked: every leaf [L, ...]."""
        chunks = self.chunks(indices)
        bucket = self.bucket_for(chunks)
        padded = [batching.pad_batch(self.store, chunks[d], bucket, self.target) for d in self.local_devices]
        return jax.tree.map(lambda *xs: np.stack(xs), *padded)

    def batches(self, seed: int | None, epoch: int, start: int = 0) -> Iterator[jraph.GraphsTuple]:
        """Batches of ``epoch`` from batch number ``start`` on (resuming mid-epoch)."""
        order = self.order(seed, epoch)
        for b in range(start, self.num_batches()):
            yield self.batch(order[b * self.batch_size:(b + 1) * self.batch_size])

    def padding_efficiency(self, seed: int | None = 0, epoch: int = 0) -> dict[str, float]:
        """Fraction of the padded node / edge / graph slots holding real data over one epoch."""
        real, padded = np.zeros(3), np.zeros(3)
        order = self.order(seed, epoch)
        for b in range(self.num_batches()):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            bucket = self.bucket_for(self.chunks(batch))
            real += [self.store.n_node[batch].sum(), self.store.n_edge[batch].sum(), len(batch)]
            padded += np.array(bucket) * self.num_devices
        return dict(zip(("nodes", "edges", "graphs"), (real / padded).tolist()))


def make_plan(store: GraphStore, target: str, batch_size: int, num_buckets: int,
              mesh: jax.sharding.Mesh, bucket_store: GraphStore | None = None) -> BatchPlan:
    """Buckets from the full size distribution of ``bucket_store`` (default ``store``), at this
    mesh's per-device batch size. Evaluation plans of all splits share one ``bucket_store`` so
    that they share shapes, hence compilations."""
    num_devices = mesh.devices.size
    local = {d.id for d in jax.local_devices()}
    positions = [i for i, d in enumerate(mesh.devices.flat) if d.id in local]
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise ValueError(f"this process's devices are not contiguous in the mesh: {positions}")
    per_device = math.ceil(batch_size / num_devices)
    buckets = batching.choose_buckets(bucket_store or store, None, per_device, max_buckets=num_buckets)
    return BatchPlan(store, target, batch_size, list(buckets), num_devices,
                     range(positions[0], positions[-1] + 1))


def device_batches(plan: BatchPlan, mesh: jax.sharding.Mesh, seed: int | None, epoch: int, start: int,
                   buffer_size: int) -> Iterator[jraph.GraphsTuple]:
    """Global device batches, padded and transferred by a background thread ahead of use."""
    batches = (parallel.shard_batch(b, mesh) for b in plan.batches(seed, epoch, start))
    return batching.prefetch(batches, buffer_size) if buffer_size > 0 else batches


# --------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass
class Datasets:
    """The three splits of one target, with the training-split target scaler."""

    train: GraphStore
    validation: GraphStore
    test: GraphStore
    target: str
    mean: float
    std: float

    def split(self, name: str) -> GraphStore:
        return getattr(self, name)


SPLITS = ("train", "validation", "test")
# config.data.dataset values and the loaders they select (see `load_store`).
MD_DATASETS = ("fullerene", "pt_graphene", "files")
DATASETS = ("qm9",) + MD_DATASETS


def load_store(config: ml_collections.ConfigDict) -> tuple[GraphStore, dict[str, np.ndarray]]:
    """The featurised data set of ``config.data`` and its splits (split name -> indices).

    ``qm9`` goes to `datasets.qm9.load_qm9`; ``fullerene``, ``pt_graphene`` and ``files`` to
    `datasets.md.load` (``configs/fullerene.py``, ``pt_graphene.py``, ``files.py``). The
    featuriser settings, cache root (``data_dir``), ring flags, workers and split seed mean the
    same for all of them.

    Raises:
      ValueError: for an unknown ``config.data.dataset``, naming the known ones.
    """
    data = config.data
    if data.dataset not in DATASETS:
        raise ValueError(f"config.data.dataset={data.dataset!r}: unknown data set; known: {', '.join(DATASETS)}")
    from scannet_jax.neighbors import FeaturizerSettings

    settings = FeaturizerSettings(**data.featurizer.to_dict())
    common = dict(cache_dir=data.data_dir or None, ring=data.ring, num_workers=data.num_workers or None,
                  seed=config.split_seed)
    if data.dataset == "qm9":
        from scannet_jax.datasets import qm9

        return qm9.load_qm9(settings, limit=data.limit or None, **common)
    from scannet_jax.datasets import md

    return md.load(data.dataset, settings, paths=data.paths, file_format=data.file_format,
                   columns=data.columns.split(":") if data.columns else (), group_by=data.group_by,
                   molecules=data.molecules, data_dir=data.source_dir or None, **common)


def training_periodicity(config: ml_collections.ConfigDict) -> bool | None:
    """False when every training structure is featurised as a molecule; None for a ``files``
    data set that keeps each file's own periodicity (possibly mixed, so not checked)."""
    data = config.data
    return False if data.dataset != "files" or data.molecules else None


def get_datasets(config: ml_collections.ConfigDict) -> Datasets:
    """Loads the data set (`load_store`), splits it and computes the target scaler on the
    training split.

    Raises:
      ValueError: for an unknown data set or target, or a training split without any target.
    """
    data = config.data
    store, splits = load_store(config)
    if data.target not in store.targets:
        raise ValueError(f"config.data.target={data.target!r} is not in the data set; "
                         f"available: {sorted(store.targets)}")
    train_idx = np.asarray(splits["train"])
    values = store.targets[data.target][train_idx]
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError(f"no finite {data.target!r} target in the training split")
    if data.standardize:
        mean, std = float(np.mean(values[finite])), float(np.std(values[finite]))
    else:
        mean, std = 0.0, 1.0
    return Datasets(
        train=store.subset(train_idx),
        validation=store.subset(np.asarray(splits["validation"])),
        test=store.subset(np.asarray(splits["test"])),
        target=data.target,
        mean=mean,
        std=std if std > 0 else 1.0,
    )


# --------------------------------------------------------------------------------------------
# Host-side loop.


def report_missing_targets(store: GraphStore, target: str, split: str) -> int:
    """Logs every structure of ``store`` whose target is not finite; returns how many.

    Such structures stay in the batches but are masked out of loss and metrics (never trained on).
    """
    values = store.targets[target]
    bad = np.flatnonzero(~np.isfinite(values))
    for position in bad:
        log.warning("%s molecule with data set index %d (position %d in the split) has %s = %s: "
                        "masked out, not trained on", split, store.index[position], position, target,
                        float(values[position]))
    return len(bad)


def _add(total: dict[str, Any] | None, metrics: dict[str, Any]) -> dict[str, Any]:
    return metrics if total is None else jax.tree.map(jnp.add, total, metrics)


def _summarise(sums: dict[str, float]) -> dict[str, float]:
    """Turns summed metrics into means (MAE, RMSE in target units; loss per step)."""
    count = max(sums.get("count", 0.0), 1.0)
    out = {"mae": sums["abs_err"] / count, "rmse": math.sqrt(sums["sq_err"] / count), "count": sums["count"]}
    if "steps" in sums:
        out["loss"] = sums["loss"] / max(sums["steps"] - sums["nonfinite"], 1.0)
    return out


def evaluate(steps: Steps, state: TrainState, plan: BatchPlan, mesh: jax.sharding.Mesh, prefetch_size: int = 2) -> dict[str, float]:
    """MAE / RMSE (target units) of ``state`` over a whole split.

    Also returns ``structures_per_s``: the evaluation speed without the batches that compiled.
    """
    total, compile_s, start = None, 0.0, time.time()
    for batch in device_batches(plan, mesh, None, 0, 0, prefetch_size):
        compiled, t = steps.eval._cache_size(), time.time()
        metrics = steps.eval(state, batch)
        if steps.eval._cache_size() != compiled:
            jax.block_until_ready(metrics)
            compile_s += time.time() - t
        total = _add(total, metrics)
    summary = _summarise({k: float(v) for k, v in parallel.to_host(total).items()})
    summary["structures_per_s"] = len(plan.store) / max(time.time() - start - compile_s, 1e-9)
    return summary


def predict_split(steps: Steps, state: TrainState, plan: BatchPlan, mesh: jax.sharding.Mesh) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, targets) [S] in target units, in the split's stored order."""
    from jax.experimental import multihost_utils

    predictions = []
    for indices in np.array_split(np.arange(len(plan.store)), plan.num_batches()):
        batch = parallel.shard_batch(plan.batch(indices), mesh)
        out = multihost_utils.process_allgather(steps.predict(state, batch), tiled=True)  # [D, G]
        predictions.extend(out[d, :len(c)] for d, c in enumerate(plan.chunks(indices)))
    return np.concatenate(predictions), plan.store.targets[plan.target].copy()


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


def _load_init_params(path: str, params: Any, config: ml_collections.ConfigDict) -> Any:
    """Parameters to fine-tune from ``path`` (a run or original weights), checked against ``params``.

    Raises:
      ValueError: if the architecture differs (listing the differing parameters).
    """
    if Path(path).suffix in (".npz", ".h5", ".hdf5"):
        from scannet_jax import convert

        model_config, loaded = convert.load_original_weights(path)
    else:
        model_config, loaded, _ = checkpoints.load_pretrained(path)
    loaded = _grow_embedding(loaded, params, path)
    ours = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    theirs = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
    problems = [f"{k}: {theirs.get(k, 'absent')} in {path}, {ours.get(k, 'absent')} here"
                for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if problems:
        saved = dict(model_config) if model_config else {}
        differ = {k: (saved[k], config.model[k]) for k in saved if k in config.model and saved[k] != config.model[k]}
        raise ValueError(
            f"config.init_from={path}: architecture differs from config.model "
            f"(model keys saved vs here: {differ}); {len(problems)} parameter(s) differ: "
            + "; ".join(problems[:10])
        )
    return jax.tree.map(lambda new, old: np.asarray(new, dtype=old.dtype), loaded, params)


def _grow_embedding(loaded: Any, params: Any, path: str) -> Any:
    """``loaded`` with its element table widened to ``params``' rows, if it has fewer.

    The original's QM9 models embed only Z < 10; ours embed Z = 1..94. Rows the loaded table
    lacks keep their fresh initialisation in ``params`` (elements the loaded model never saw).
    """
    table = loaded.get("embed_atom", {}).get("embedding")
    fresh = params.get("embed_atom", {}).get("embedding")
    if table is None or fresh is None or np.ndim(table) != 2 or np.shape(fresh)[1:] != np.shape(table)[1:]:
        return loaded
    rows, wanted = np.shape(table)[0], np.shape(fresh)[0]
    if rows >= wanted:
        return loaded
    grown = np.array(fresh, dtype=np.asarray(table).dtype)
    grown[:rows] = table
    log.info("config.init_from=%s: element table has %d rows (Z < %d); rows %d..%d keep their fresh "
             "initialisation", path, rows, rows, rows, wanted - 1)
    return {**loaded, "embed_atom": {**loaded["embed_atom"], "embedding": grown}}


class _MetricsWriter:
    """Appends one JSON line per record to ``workdir/metrics.jsonl`` (process 0)."""

    def __init__(self, workdir: Path):
        self.path = workdir / METRICS_FILE

    def write(self, record: dict[str, Any]) -> None:
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, datasets: Datasets | None = None
) -> dict[str, Any]:
    """Trains one model as ``config`` says, resuming from ``workdir`` if it holds a checkpoint.

    ``datasets`` replaces ``get_datasets(config)`` (tests, or data already in memory).

    Writes to ``workdir``: ``config.json``, ``target_scaler.json``, ``checkpoints/``, ``best/``,
    ``metrics.jsonl`` (one line per epoch and per log interval), ``results.json`` (MAE of every
    split with the best-validation params, in target units) and PNGs (test parity plot,
    learning curves).

    Returns:
      The contents of ``results.json``.
    """
    from tqdm import tqdm

    parallel.initialize_distributed(
        config.distributed.coordinator_address, config.distributed.num_processes, config.distributed.process_id
    )
    start_time = time.time()
    workdir_path = Path(workdir).absolute()
    workdir_path.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh()
    log.info("devices: %d (%d local) %s", jax.device_count(), jax.local_device_count(), jax.devices()[0].platform)

    data = get_datasets(config) if datasets is None else datasets
    target, units = config.data.target, config.data.units
    everything = GraphStore.concat([data.train, data.validation, data.test])
    train_plan = make_plan(data.train, target, config.batch_size, config.num_buckets, mesh)
    plans = {name: make_plan(data.split(name), target, config.eval_batch_size, config.num_buckets, mesh, everything)
             for name in SPLITS}
    if 0 < config.final_train_eval_limit < len(data.train):
        # The final training-split MAE on a fixed random subset (bounds the final evaluation).
        subset = np.sort(np.random.default_rng(config.seed).permutation(len(data.train))[:config.final_train_eval_limit])
        plans["train"] = make_plan(data.train.subset(subset), target, config.eval_batch_size, config.num_buckets,
                                   mesh, everything)
    for name, plan in plans.items():
        report_missing_targets(plan.store, target, name)
    steps_per_epoch = train_plan.num_batches()
    log.info("splits: %s; target %s mean %.6g std %.6g %s (training split)",
                 {k: len(data.split(k)) for k in SPLITS}, target, data.mean, data.std, units)

    model = create_model(config)
    tx = create_optimizer(config, steps_per_epoch)
    example = jax.tree.map(lambda x: x[0], train_plan.batch(np.arange(min(len(data.train), config.batch_size))))
    state = create_train_state(config, model, tx, example, data.mean, data.std)
    if config.init_from:
        state = state.replace(params=_load_init_params(config.init_from, state.params, config))
        log.info("initialised parameters from %s", config.init_from)
    state = parallel.replicate(state, mesh)
    steps = make_steps(mesh, config.optimizer.l2)

    config_dict = config.to_dict()
    ckpt = checkpoints.Checkpointer(workdir_path, config_dict, keep=config.checkpoints_to_keep)
    checkpoints.write_json(workdir_path / checkpoints.CONFIG_FILE, config_dict)
    checkpoints.write_json(workdir_path / checkpoints.SCALER_FILE,
                           {"target": target, "units": units, "mean": data.mean, "std": data.std})
    checkpoints.write_json(workdir_path / checkpoints.DOMAIN_FILE,
                           Domain.of(data.train, everything, training_periodicity(config)).to_json())

    schedule = create_epoch_schedule(config)
    loop = {"epoch": 0, "batch_index": 0, "epoch_lr": None, "lr_scale": 1.0, "best_val_mae": math.inf,
            "best_epoch": -1, "epochs_since_best": 0, "epoch_sums": None, "stop_reason": ""}
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, meta = restored
        loop.update(meta["loop"])
        if loop["stop_reason"].startswith("max_wall_time_s"):
            loop["stop_reason"] = ""  # a new wall-time budget starts now
        schedule.load_state_dict(meta["schedule"])
        log.info("resuming from %s/%d: epoch %d, batch %d of %d", workdir_path / checkpoints.PERIODIC_DIR,
                     int(state.step), loop["epoch"], loop["batch_index"], steps_per_epoch)
        print(f"Resuming from checkpoint step {int(state.step)} (epoch {loop['epoch']}, "
              f"batch {loop['batch_index']}/{steps_per_epoch}) in {workdir_path}", flush=True)

    def meta() -> dict[str, Any]:
        return {"loop": dict(loop), "schedule": schedule.state_dict()}

    writer = _MetricsWriter(workdir_path)
    log_every = max(config.log_every_steps, 1)
    stop = loop["stop_reason"] != ""
    wall_limit = config.max_wall_time_s
    # Time reserved for the final evaluation of all splits, from the measured validation speed.
    final_eval_s = 0.0
    final_eval_structures = sum(len(p.store) for p in plans.values())
    measured_eval_speed = False

    def out_of_time() -> bool:
        return bool(wall_limit) and time.time() - start_time + final_eval_s > wall_limit

    while not stop and loop["epoch"] < config.num_epochs:
        epoch = loop["epoch"]
        if loop["batch_index"] == 0 or loop["epoch_lr"] is None:
            loop["epoch_lr"] = schedule.lr_for_epoch(epoch)
        state = set_learning_rate(state, loop["epoch_lr"] * loop["lr_scale"], mesh)
        sums = None if loop["epoch_sums"] is None else parallel.replicate(
            {k: np.float32(v) for k, v in loop["epoch_sums"].items()}, mesh)
        seen_nonfinite = 0.0 if loop["epoch_sums"] is None else loop["epoch_sums"]["nonfinite"]
        epoch_start = time.time()
        batches = device_batches(train_plan, mesh, config.seed, epoch, loop["batch_index"], config.prefetch)
        bar = tqdm(batches, total=steps_per_epoch, initial=loop["batch_index"], desc=f"epoch {epoch}",
                   disable=jax.process_index() != 0, leave=False, mininterval=1.0)
        for batch in bar:
            state, metrics = steps.train(state, batch)
            sums = _add(sums, metrics)
            loop["batch_index"] += 1
            last_batch = loop["batch_index"] == steps_per_epoch
            if loop["batch_index"] % log_every == 0 or last_batch:
                host = {k: float(v) for k, v in parallel.to_host(sums).items()}
                if host["nonfinite"] > seen_nonfinite:
                    loop["lr_scale"] *= 0.5
                    seen_nonfinite = host["nonfinite"]
                    log.warning("non-finite loss or gradient before step %d: update(s) skipped, state "
                                    "kept at the last good step, learning rate halved to %.3g",
                                    int(state.step), loop["epoch_lr"] * loop["lr_scale"])
                    state = set_learning_rate(state, loop["epoch_lr"] * loop["lr_scale"], mesh)
                running = _summarise(host)
                rate = host["count"] / max(time.time() - epoch_start, 1e-9)
                if not measured_eval_speed:  # until a validation pass is timed: forward ≈ 1/3 of a step
                    final_eval_s = 1.2 * final_eval_structures / (3.0 * rate) + 30.0
                bar.set_postfix(loss=f"{running['loss']:.4f}", mae=f"{running['mae']:.4g}", mol_s=f"{rate:.0f}")
                writer.write({"epoch": epoch, "step": int(state.step),
                              "epoch_progress": epoch + loop["batch_index"] / steps_per_epoch,
                              "running_train_loss": running["loss"],
                              "running_train_mae": running["mae"], "train_mol_per_s": rate})
            if (config.checkpoint_every_steps and loop["batch_index"] % config.checkpoint_every_steps == 0
                    and not last_batch):
                loop["epoch_sums"] = {k: float(v) for k, v in parallel.to_host(sums).items()}
                ckpt.save(int(state.step), state, meta())
            if out_of_time():
                loop["stop_reason"] = f"max_wall_time_s={wall_limit} reached in epoch {epoch}"
                break
        bar.close()
        if loop["stop_reason"]:
            loop["epoch_sums"] = {k: float(v) for k, v in parallel.to_host(sums).items()} if sums else None
            ckpt.save(int(state.step), state, meta())
            break
        train_metrics = _summarise({k: float(v) for k, v in parallel.to_host(sums).items()})
        epoch_time = time.time() - epoch_start
        val_metrics = evaluate(steps, state, plans["validation"], mesh, config.prefetch)
        final_eval_s = 1.2 * final_eval_structures / val_metrics["structures_per_s"] + 30.0
        measured_eval_speed = True
        schedule.update(val_metrics["mae"] / data.std)  # the original compares standardised MAE
        improved = val_metrics["mae"] < loop["best_val_mae"]
        if improved:
            loop.update(best_val_mae=val_metrics["mae"], best_epoch=epoch, epochs_since_best=0)
            ckpt.save_best(epoch, {"params": state.params, "target_mean": state.target_mean,
                                   "target_std": state.target_std}, {"epoch": epoch, "val_mae": val_metrics["mae"]})
        else:
            loop["epochs_since_best"] += 1
        record = {"epoch": epoch, "step": int(state.step), "lr": loop["epoch_lr"] * loop["lr_scale"],
                  "train_loss": train_metrics["loss"], "train_mae": train_metrics["mae"],
                  "val_mae": val_metrics["mae"], "val_rmse": val_metrics["rmse"], "units": units,
                  "epoch_time_s": epoch_time, "train_mol_per_s": train_metrics["count"] / max(epoch_time, 1e-9),
                  "best_val_mae": loop["best_val_mae"]}
        writer.write(record)
        log.info("epoch %d: loss %.4f train MAE %.4g val MAE %.4g %s (best %.4g @ %d), lr %.3g, %.0f mol/s",
                     epoch, record["train_loss"], record["train_mae"], record["val_mae"], units,
                     loop["best_val_mae"], loop["best_epoch"], record["lr"], record["train_mol_per_s"])
        loop.update(epoch=epoch + 1, batch_index=0, epoch_lr=None, epoch_sums=None)
        if loop["epochs_since_best"] >= config.patience:
            loop["stop_reason"] = f"early stopping: no validation improvement for {config.patience} epochs"
        elif out_of_time():
            loop["stop_reason"] = f"max_wall_time_s={wall_limit} reached after epoch {epoch}"
        ckpt.save(int(state.step), state, meta())
        stop = loop["stop_reason"] != ""
    if not loop["stop_reason"]:
        loop["stop_reason"] = f"num_epochs={config.num_epochs} reached"
    ckpt.wait_until_finished()
    log.info("training stopped: %s", loop["stop_reason"])

    results = _final_evaluation(config, workdir_path, ckpt, steps, state, plans, mesh, data, loop)
    results["compile_counts"] = steps.compile_counts()
    results["wall_time_s"] = time.time() - start_time
    checkpoints.write_json(workdir_path / RESULTS_FILE, results)
    ckpt.close()
    return results


def _final_evaluation(config, workdir, ckpt, steps, state, plans, mesh, data, loop) -> dict[str, Any]:
    """Metrics of every split with the best-validation params; parity plot and learning curves."""
    if ckpt.best_meta() is not None:
        abstract = {"params": state.params, "target_mean": state.target_mean, "target_std": state.target_std}
        best = ckpt.restore_best(abstract)
        state = state.replace(params=best["params"])
        params_from = f"best validation epoch {ckpt.best_meta()['epoch']}"
    else:
        params_from = "last step (no epoch finished)"
    maes = {name: evaluate(steps, state, plan, mesh, config.prefetch) for name, plan in plans.items()}
    predictions, targets = predict_split(steps, state, plans["test"], mesh)
    units = config.data.units
    results = {
        "target": config.data.target,
        "units": units,
        "test_mae": maes["test"]["mae"],
        "mae": {name: m["mae"] for name, m in maes.items()},
        "rmse": {name: m["rmse"] for name, m in maes.items()},
        "num_structures": {name: int(m["count"]) for name, m in maes.items()},
        "train_mae_on": ("whole training split" if len(plans["train"].store) == len(data.train)
                         else f"random subset of {len(plans['train'].store)} training molecules"),
        "params_from": params_from,
        "best_epoch": loop["best_epoch"],
        "epochs_run": loop["epoch"],
        "steps_run": int(state.step),
        "stop_reason": loop["stop_reason"],
        "target_scaler": {"mean": data.mean, "std": data.std, "computed_on": "training split"},
        "code_version": code_version(),
        "config": config.to_dict(),
    }
    log.info("test MAE %.5g %s (%s)", results["test_mae"], units, params_from)
    if jax.process_index() == 0:
        _plot(workdir, predictions, targets, units, config.data.target)
    return results


def _plot(workdir: Path, predictions: np.ndarray, targets: np.ndarray, units: str, target: str) -> None:
    """``parity_test.png`` and ``learning_curves.png`` (from metrics.jsonl) in ``workdir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(workdir / "parity_test.png", dpi=120)
    plt.close(fig)

    records = []
    if (workdir / METRICS_FILE).exists():
        records = [json.loads(line) for line in (workdir / METRICS_FILE).read_text().splitlines() if line]
    intervals = [r for r in records if "epoch_progress" in r]
    records = [r for r in records if "val_mae" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if intervals:
        ax.plot([r["epoch_progress"] for r in intervals], [r["running_train_mae"] for r in intervals],
                lw=0.8, alpha=0.6, label="train MAE, running mean within the epoch")
    if records:
        # an epoch's record is drawn at its end
        ax.plot([r["epoch"] + 1 for r in records], [r["train_mae"] for r in records], "o-", label="train MAE")
        ax.plot([r["epoch"] + 1 for r in records], [r["val_mae"] for r in records], "s-", label="validation MAE")
    if intervals or records:
        ax.set_yscale("log")
        ax.legend()
    ax.set(xlabel="epoch", ylabel=f"MAE ({units})", title=f"{target} learning curves")
    fig.tight_layout()
    fig.savefig(workdir / "learning_curves.png", dpi=120)
    plt.close(fig)
