"""Training and evaluation of any registered network, data parallel over all devices.

``train_and_evaluate(config, workdir)`` is the whole job: `setup` (data → plans → model → state →
steps), then epochs of ``steps.train_step`` with validation, the epoch schedule, early stopping
and checkpoints, then the best-validation parameters on every split, plots and ``results.json``.
The config is read here, at the edge: by `get_datasets`, the ``create_*`` factories, `setup` and
`loop.RunSettings.from_config`; everything below takes typed values. Nothing here is specific to
one network (`models.get_spec` says how to build and regularise it).

Departures from the original, on purpose: the target is standardised with the training split's
mean and std (the original used the whole data set); after a step whose loss or gradient is not
finite (``steps.train_step`` does not apply it) the learning rate is halved.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from scannet_jax import batching, checkpoints, datasets, models, optim, parallel, pretrained, reporting
from scannet_jax.batching import BatchPlan
from scannet_jax.datasets import featurize
from scannet_jax.datasets.splits import Datasets, make_datasets
from scannet_jax.loop import (MIN_LR_AFTER_DIVERGENCE, LoopState, RunSettings, StopSignals, WallClock, agreed,
                              diverged)
from scannet_jax.steps import Steps, TrainState, create_train_state, make_steps, set_learning_rate

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
SPLITS = datasets.SPLITS


def data_source(data: ml_collections.ConfigDict) -> datasets.Source:
    """The data set's own options of ``config.data``."""
    return datasets.Source(limit=data.limit or None, source_dir=data.source_dir, paths=data.paths,
                           file_format=data.file_format,
                           columns=tuple(data.columns.split(":")) if data.columns else (),
                           group_by=data.group_by, molecules=data.molecules,
                           oxides_only=data.get("oxides_only", False))  # absent from configs saved before it


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
    state = create_train_state(model, tx, example, data.mean, data.std, config.seed)
    if config.init_from:
        source = pretrained.resolve(config.init_from)  # a path, or a pre-built model's name
        state = state.replace(params=checkpoints.load_init_params(source, state.params, config.model.to_dict()))
        log.info("initialised parameters from %s", config.init_from)
    state = parallel.replicate(state, mesh)
    steps = make_steps(mesh, config.model, config.loss, config.optimizer.l2)
    return Trainer(config, mesh, data, train_plan, eval_plans, state, steps)


# --------------------------------------------------------------------------------------------
# Host-side loop.



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


def _running_record(host: dict[str, float], epoch: int, step: int, fraction: float, start_count: float,
                    epoch_start: float) -> dict[str, Any]:
    """A ``metrics.jsonl`` record of the epoch so far: running loss and MAE, and structures/s
    since ``epoch_start`` (``start_count``: the epoch's structures trained before it, on a resume)."""
    running = _summarise(host)
    return {"epoch": epoch, "step": step, "epoch_progress": epoch + fraction, "running_train_loss": running["loss"],
            "running_train_mae": running["mae"],
            "train_mol_per_s": (host["count"] - start_count) / max(time.time() - epoch_start, 1e-9)}


def _summarise(sums: dict[str, float]) -> dict[str, float]:
    """Turns summed metrics into means (MAE, RMSE in target units; loss per step)."""
    count = max(sums.get("count", 0.0), 1.0)
    out = {"mae": sums["abs_err"] / count, "rmse": math.sqrt(sums["sq_err"] / count), "count": sums["count"]}
    if "steps" in sums:
        out["loss"] = sums["loss"] / max(sums["steps"] - sums["nonfinite"], 1.0)
        out["nonfinite"] = sums["nonfinite"]
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data: Datasets | None = None
                       ) -> dict[str, Any]:
    """Trains one model as ``config`` says, resuming from ``workdir`` if it holds a checkpoint.

    ``data`` replaces ``get_datasets(config)`` (tests, or data already in memory). A
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
            return _train(config, config_dict, workdir_path, data, stop_signals)
    finally:
        if lock is not None:
            lock.release()




def _train(config: ml_collections.ConfigDict, config_dict: dict[str, Any], workdir_path: Path,
           data: Datasets | None, stop_signals: StopSignals) -> dict[str, Any]:
    """The body of `train_and_evaluate`, once the workdir is locked and checked."""
    from tqdm import tqdm

    run = RunSettings.from_config(config)
    log.info("devices: %d (%d local) %s", jax.device_count(), jax.local_device_count(), jax.devices()[0].platform)
    trainer = setup(config, data)
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
        start_count = last_log[1]  # structures of this epoch trained before a resume
        logged_at = loop.batch_index  # the batch of the last running record
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
                if host["nonfinite"] > seen_nonfinite and run.on_divergence == "skip":
                    loop.lr_scale *= 0.5
                    seen_nonfinite = host["nonfinite"]
                    log.warning("non-finite loss or gradient before step %d: update(s) skipped, state "
                                "kept at the last good step, learning rate halved to %.3g",
                                int(state.step), loop.epoch_lr * loop.lr_scale)
                    state = set_learning_rate(state, loop.epoch_lr * loop.lr_scale, mesh)
                record = _running_record(host, epoch, int(state.step), loop.batch_index / steps_per_epoch,
                                         start_count, epoch_start)
                now = time.time()
                # the speed since the last interval: the first intervals include compilation
                clock.train_speed((host["count"] - last_log[1]) / max(now - last_log[0], 1e-9))
                last_log = (now, host["count"])
                bar.set_postfix(loss=f"{record['running_train_loss']:.4f}", mae=f"{record['running_train_mae']:.4g}",
                                mol_s=f"{record['train_mol_per_s']:.0f}")
                writer.write(record)
                logged_at = loop.batch_index
            step_due = bool(run.checkpoint_every_steps) and loop.batch_index % run.checkpoint_every_steps == 0
            signalled = time_due = False
            if loop.batch_index % run.log_every_steps == 0 or step_due:
                signalled, time_due = agreed(stop_signals.received is not None,
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
            if loop.epoch_sums is not None and logged_at != loop.batch_index:
                # the partial epoch, so that its throughput is on record
                writer.write(_running_record(loop.epoch_sums, epoch, int(state.step),
                                             loop.batch_index / steps_per_epoch, start_count, epoch_start))
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
        diverged_stop = False
        if run.on_divergence == "reload_best":
            state, record["divergence"], diverged_stop = _handle_divergence(state, loop, ckpt, train_metrics, epoch)
        writer.write(record)
        log.info("epoch %d: loss %.4f train MAE %.4g val MAE %.4g %s (best %.4g @ %d), lr %.3g, %.0f mol/s",
                 epoch, record["train_loss"], record["train_mae"], record["val_mae"], run.units,
                 loop.best_val_mae, loop.best_epoch, record["lr"], record["train_mol_per_s"])
        loop.epoch, loop.batch_index, loop.epoch_lr, loop.epoch_sums = epoch + 1, 0, None, None
        if diverged_stop:
            loop.stop_reason = record["divergence"]
        elif loop.epochs_since_best >= run.patience:
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


def _handle_divergence(state: TrainState, loop: LoopState, ckpt: checkpoints.Checkpointer,
                       train_metrics: dict[str, float], epoch: int) -> tuple[TrainState, str, bool]:
    """MEGNet's ReduceLRUponNan at the end of ``epoch`` (``optimizer.on_divergence = "reload_best"``).

    Returns the state to go on with, what was done ("" if the epoch did not diverge) and whether
    training stops: the rate halved and the best-validation parameters and model state reloaded
    (optimiser moments kept, as Keras ``load_weights``), or a stop below ``MIN_LR_AFTER_DIVERGENCE``.
    """
    previous, loop.last_train_loss = loop.last_train_loss, train_metrics["loss"]
    if not diverged(train_metrics["loss"], train_metrics["nonfinite"], previous):
        return state, "", False
    loop.lr_scale *= 0.5
    rate = loop.epoch_lr * loop.lr_scale
    why = (f"{train_metrics['nonfinite']:.0f} non-finite step(s)" if train_metrics["nonfinite"]
           else f"loss {train_metrics['loss']:.4g} after {previous:.4g}")
    stop = rate < MIN_LR_AFTER_DIVERGENCE
    if stop:
        done = f"stopped: epoch {epoch} diverged ({why}) and the halved learning rate {rate:.3g} is below " \
               f"{MIN_LR_AFTER_DIVERGENCE:g}"
    elif ckpt.best_meta() is None:
        done = f"epoch {epoch} diverged ({why}): learning rate halved to {rate:.3g}; no best parameters yet"
    else:
        best = ckpt.restore_best(_best_tree(state))
        state = state.replace(params=best["params"], model_state=best["model_state"])
        done = (f"epoch {epoch} diverged ({why}): learning rate halved to {rate:.3g}, best-validation "
                f"parameters of epoch {ckpt.best_meta()['epoch']} reloaded")
    log.warning("%s", done)
    return state, done, stop


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
    unclipped = maes["test"]
    if run.prediction_floor is not None:
        predictions = np.maximum(predictions, run.prediction_floor)
        finite = np.isfinite(targets)
        error = predictions[finite] - targets[finite]
        maes["test"] = {**unclipped, "mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error**2).mean()))}
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
    if run.prediction_floor is not None:
        results["prediction_floor"] = run.prediction_floor
        results["test_unclipped"] = {"mae": unclipped["mae"], "rmse": unclipped["rmse"]}
    log.info("test MAE %.5g %s (%s)", results["test_mae"], run.units, params_from)
    if writer.enabled:
        reporting.plot_parity(workdir / reporting.PARITY_PLOT, predictions, targets, run.units, run.target)
        reporting.plot_learning_curves(workdir / reporting.CURVES_PLOT, writer.read(), run.units, run.target)
    return results

