"""Checkpoints of a training run (the only module that imports Orbax).

Layout of a workdir::

    config.json            the run's config (written once, checked on resume)
    target_scaler.json     {"target", "units", "mean", "std"} of the training split
    checkpoints/<step>/    periodic: the whole TrainState + JSON "meta" (epoch, batch index,
                           schedule state, early-stopping state, partial epoch sums)
    best/<epoch>/          params + target mean/std of the best validation epoch, JSON "meta"

A restore walks the periodic steps from the newest down: a step that cannot be read (truncated
or corrupt file) or that was written under an incompatible config is reported with its path and
the reason, and the next older step is tried. :class:`CheckpointError` is raised only when no
step is usable.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from scannet_jax import atomic

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
SCALER_FILE = "target_scaler.json"
DOMAIN_FILE = "domain.json"
PERIODIC_DIR = "checkpoints"
BEST_DIR = "best"

# Config sections that must agree between a checkpoint and the run restoring it: anything else
# (epochs, logging, checkpoint frequency, wall-time limit...) may change on resume.
COMPATIBILITY_KEYS = ("model", "data.target", "data.graph_builder", "data.featurizer", "data.ring",
                      "optimizer.schedule")


class CheckpointError(RuntimeError):
    """No usable checkpoint: every candidate is listed with its path and what is wrong."""


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Differences in the :data:`COMPATIBILITY_KEYS` sections, as ``"key: saved -> current"``."""
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    problems = []
    for key in sorted(set(saved_flat) | set(current_flat)):
        if not any(key == k or key.startswith(k + ".") for k in COMPATIBILITY_KEYS):
            continue
        a, b = saved_flat.get(key, "<absent>"), current_flat.get(key, "<absent>")
        if a != b:
            problems.append(f"{key}: {a!r} -> {b!r}")
    return problems


def write_json(path: Path, value: Any) -> None:
    """Writes JSON atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    text = json.dumps(value, indent=2, sort_keys=True, default=float)
    atomic.write_atomically(path, lambda tmp: tmp.write_text(text))


class Checkpointer:
    """Periodic and best-validation checkpoints of one workdir.

    Args:
      workdir: the run directory.
      config: the run's config as a plain dict (``ConfigDict.to_dict()``); stored in every
        step's meta and checked against on restore.
      keep: periodic checkpoints kept (older ones are deleted).
    """

    def __init__(self, workdir: str | Path, config: dict[str, Any], keep: int = 2):
        self.workdir = Path(workdir).absolute()
        self.config = config
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._periodic = ocp.CheckpointManager(
            self.workdir / PERIODIC_DIR, options=options, item_handlers=_handlers()
        )
        self._best = ocp.CheckpointManager(
            self.workdir / BEST_DIR,
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
            item_handlers=_handlers(),
        )

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves the whole train state (asynchronously) with ``meta`` beside it.

        A step saved before (e.g. mid-epoch, then again at the epoch's end after a resume) is
        replaced.
        """
        self._periodic.wait_until_finished()
        if step in self._periodic.all_steps():
            self._periodic.delete(step)
        self._periodic.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({**meta, "config": self.config, "digests": tree_digests(state)}),
            ),
        )

    def save_best(self, epoch: int, best: dict[str, Any], meta: dict[str, Any]) -> None:
        """Saves the best-validation params (``{"params", "target_mean", "target_std"}``)."""
        self._best.wait_until_finished()
        if epoch in self._best.all_steps():  # rewritten after a resume that redid this epoch
            self._best.delete(epoch)
        self._best.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(best),
                meta=ocp.args.JsonSave({**meta, "config": self.config, "digests": tree_digests(best)}),
            ),
        )

    def wait_until_finished(self) -> None:
        self._periodic.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._periodic.close()
        self._best.close()

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """Restores the newest usable periodic checkpoint.

        Args:
          abstract_state: the TrainState pytree (arrays or ``jax.ShapeDtypeStruct`` with
            shardings) to restore into.

        Returns:
          ``(state, meta)``, or None if the workdir has no checkpoint.

        Raises:
          CheckpointError: if checkpoints exist but none can be used.
        """
        steps = sorted(self._periodic.all_steps(), reverse=True)
        if not steps:
            return None
        failures = []
        for step in steps:
            path = self.workdir / PERIODIC_DIR / str(step)
            try:
                restored = _restore(self._periodic, step, abstract_state, self.config)
            except Exception as err:  # noqa: BLE001 - any failure means "try the older step"
                reason = _describe(err)
                failures.append(f"{path}: {reason}")
                older = [s for s in steps if s < step]
                if older:
                    log.error(
                        "checkpoint %s is unusable (%s); falling back to step %d", path, reason, older[0]
                    )
                else:
                    log.error("checkpoint %s is unusable (%s)", path, reason)
                continue
            return restored.state, dict(restored.meta)
        raise CheckpointError("no usable checkpoint in " + str(self.workdir / PERIODIC_DIR) + ":\n  " + "\n  ".join(failures))

    def best_meta(self) -> dict[str, Any] | None:
        """Meta of the best-validation checkpoint, or None if there is none yet."""
        step = self._best.latest_step()
        if step is None:
            return None
        return dict(self._best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def restore_best(self, abstract_best: Any) -> Any:
        """Restores the best-validation ``{"params", "target_mean", "target_std"}``.

        Raises:
          CheckpointError: if there is none or it cannot be read.
        """
        step = self._best.latest_step()
        if step is None:
            raise CheckpointError(f"no best-validation checkpoint in {self.workdir / BEST_DIR}")
        try:
            return _restore(self._best, step, abstract_best, self.config).state
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{self.workdir / BEST_DIR / str(step)}: {_describe(err)}") from err


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _host_array(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))  # replicated: every copy is the same
    return np.asarray(x)


def tree_digests(tree: Any) -> dict[str, str]:
    """CRC-32 (hex) of every array of ``tree``'s bytes, by its leaf name (as Orbax names it).

    Each array is copied to the host once (none for host arrays) and checksummed in place.
    """
    def crc(leaf: Any) -> str:
        return f"{zlib.crc32(np.ascontiguousarray(_host_array(leaf)).reshape(-1).view(np.uint8)):08x}"

    return {_leaf_name(path): crc(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def verify_digests(tree: Any, meta: dict[str, Any], where: Path) -> None:
    """Raises CheckpointError naming the arrays of ``tree`` whose CRC-32 differs from the one
    recorded at save time (silent corruption of a checkpoint's data files). Checkpoints written
    before digests were recorded are not checked."""
    recorded = meta.get("digests")
    if not recorded:
        return
    bad = [name for name, crc in tree_digests(tree).items() if name in recorded and recorded[name] != crc]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} array(s) differ from what was saved (corrupted data "
                              f"files): {', '.join(bad[:5])}")


def _leaf_name(path: tuple) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts)


def _shape_mismatch(manager: ocp.CheckpointManager, step: int, abstract: Any) -> list[str]:
    """Arrays whose saved shape or dtype differs from ``abstract`` (Orbax would silently
    pad or crop them)."""
    saved = {
        _leaf_name(path): (tuple(m.shape), np.dtype(m.dtype))
        for path, m in jax.tree_util.tree_leaves_with_path(manager.item_metadata(step)["state"])
    }
    problems = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        name = _leaf_name(path)
        want = (tuple(np.shape(leaf)), np.dtype(leaf.dtype))
        if name in saved and saved[name] != want:
            problems.append(f"{name}: saved {saved[name][1]}{list(saved[name][0])}, "
                            f"expected {want[1]}{list(want[0])}")
    return problems


def _restore(manager: ocp.CheckpointManager, step: int, abstract: Any, config: dict[str, Any]):
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    problems = config_mismatch(meta.get("config", {}), config)
    if problems:
        raise ValueError("written under an incompatible config: " + "; ".join(problems))
    problems = _shape_mismatch(manager, step, abstract)
    if problems:
        raise ValueError(f"{len(problems)} array(s) of another shape or dtype: " + "; ".join(problems[:5]))
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    verify_digests(restored.state, dict(restored.meta), Path(manager.directory) / str(step))
    return restored


def _describe(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


class Pretrained(NamedTuple):
    """What `load_pretrained` reads: the saved model config, params, target scaler
    (``{"mean", "std"}``, None if absent) and the network's other variables (``{}`` if none)."""

    model_config: dict[str, Any]
    params: Any
    scaler: dict[str, float] | None
    model_state: Any


def load_pretrained(path: str | Path) -> Pretrained:
    """Reads the variables of a run (to predict with or fine-tune from) as numpy arrays.

    The arrays are restored onto this process's first device whatever the device count or
    number of hosts of the run that saved them, then copied to the host.

    Args:
      path: a workdir (its best-validation params, else its newest periodic checkpoint), a
        ``checkpoints``/``best`` directory, or one step directory inside them.

    Returns:
      `Pretrained`: the model section of the saved config, the params pytree, the saved target
      scaler and the non-parameter variables.

    Raises:
      CheckpointError: if ``path`` holds no readable checkpoint.
    """
    path = Path(path).absolute()
    candidates = []
    if path.name.isdigit():
        candidates.append((path.parent, int(path.name)))
    else:
        for root in (path / BEST_DIR, path / PERIODIC_DIR, path):
            if root.is_dir():
                with ocp.CheckpointManager(root, item_handlers=_handlers()) as manager:
                    step = manager.latest_step()
                if step is not None:
                    candidates.append((root, step))
                    break
    if not candidates:
        raise CheckpointError(f"{path}: no checkpoint found (expected a workdir, '{BEST_DIR}/' or '{PERIODIC_DIR}/')")
    root, step = candidates[0]
    try:
        with ocp.CheckpointManager(root, item_handlers=_handlers()) as manager:
            # Without a target Orbax would restore onto the saving run's devices and fail on
            # another topology (e.g. a 2-host run read by one process).
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=local),
                                  manager.item_metadata(step)["state"])
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
            )
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{root / str(step)}: {_describe(err)}") from err
    tree, meta = jax.device_get(restored.state), dict(restored.meta)
    verify_digests(tree, meta, root / str(step))
    params = tree["params"]
    scaler = None
    if "target_mean" in tree:
        scaler = {"mean": float(np.asarray(tree["target_mean"])), "std": float(np.asarray(tree["target_std"]))}
    return Pretrained(meta.get("config", {}).get("model", {}), params, scaler, tree.get("model_state") or {})


ORIGINAL_WEIGHT_SUFFIXES = (".npz", ".h5", ".hdf5")


def load_init_params(path: str | Path, params: Any, model_config_here: dict[str, Any] | None = None) -> Any:
    """Parameters to fine-tune from (``config.init_from``), checked against ``params``.

    Args:
      path: a workdir or checkpoint directory of a run (`load_pretrained`), or the original
        code's weights (``.npz`` / Keras-2 ``.h5``, `convert.load_original_weights`).
      params: freshly initialised params of the network to train (the target structure).
      model_config_here: the model config of the network to train (compared in the error message).

    Returns:
      The loaded params with the dtypes of ``params``; element tables with fewer rows than
      ``params``' are widened (`grow_embeddings`).

    Raises:
      ValueError: if the architectures differ, naming the model keys and the parameters that do.
    """
    if Path(path).suffix in ORIGINAL_WEIGHT_SUFFIXES:
        from scannet_jax import convert

        model_config, loaded = convert.load_original_weights(path)
        model_config = model_config.to_dict()
    else:
        model_config, loaded = load_pretrained(path)[:2]
    loaded = grow_embeddings(loaded, params, path)
    ours = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    theirs = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
    problems = [f"{k}: {theirs.get(k, 'absent')} in {path}, {ours.get(k, 'absent')} here"
                for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if problems:
        saved, here = dict(model_config), dict(model_config_here or {})
        differ = {k: (saved[k], here[k]) for k in saved if k in here and saved[k] != here[k]}
        raise ValueError(f"config.init_from={path}: architecture differs from config.model (model keys saved vs "
                         f"here: {differ}); {len(problems)} parameter(s) differ: " + "; ".join(problems[:10]))
    return jax.tree.map(lambda new, old: np.asarray(new, dtype=old.dtype), loaded, params)


def grow_embeddings(loaded: Any, params: Any, path: str | Path) -> Any:
    """``loaded`` with every element table (a 2-D leaf named ``embedding``) widened to the rows
    of the same leaf in ``params``, where it has fewer.

    The original's QM9 models embed only Z < 10; ours embed Z = 1..94. Rows the loaded table
    lacks keep their fresh initialisation in ``params`` (elements the loaded model never saw).
    """

    def grow(keys: tuple, table: Any, fresh: Any) -> Any:
        if (keys[-1] != "embedding" or fresh is None or np.ndim(table) != 2
                or np.shape(fresh)[1:] != np.shape(table)[1:] or np.shape(table)[0] >= np.shape(fresh)[0]):
            return table
        rows, wanted = np.shape(table)[0], np.shape(fresh)[0]
        grown = np.array(fresh, dtype=np.asarray(table).dtype)
        grown[:rows] = table
        log.info("config.init_from=%s: element table %s has %d rows (Z < %d); rows %d..%d keep their fresh "
                 "initialisation", path, "/".join(keys), rows, rows, rows, wanted - 1)
        return grown

    def walk(tree: Any, fresh: Any, keys: tuple) -> Any:
        if isinstance(tree, dict):
            return {k: walk(v, fresh.get(k) if isinstance(fresh, dict) else None, keys + (k,)) for k, v in tree.items()}
        return grow(keys, tree, fresh)

    return walk(dict(loaded), dict(params), ())


class WorkdirBusyError(RuntimeError):
    """Another training run holds the workdir."""


class WorkdirLock:
    """An exclusive lock on a workdir for the life of one training run (process 0 of it).

    An advisory ``fcntl`` lock on ``workdir/lock`` that also records ``pid@host``; the kernel
    drops it when the holder exits, however it exits, so a killed run never leaves a stale lock.

    Raises:
      WorkdirBusyError: naming the holder's PID and host, if another run holds it.
    """

    def __init__(self, workdir: Path):
        import fcntl
        import os
        import socket

        self.path = Path(workdir) / "lock"
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "an unknown process"
            self._file.close()
            raise WorkdirBusyError(f"{workdir} is in use by another training run ({holder}, lock file "
                                   f"{self.path}); wait for it to end or use another --workdir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"PID {os.getpid()} on host {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()


def check_workdir_config(workdir: Path, config: dict[str, Any]) -> None:
    """Refuses, before anything in ``workdir`` is written, a run whose config is incompatible
    with the one the workdir already records (`COMPATIBILITY_KEYS`).

    Raises:
      CheckpointError: listing the differences; nothing in the workdir was changed.
    """
    saved = Path(workdir) / CONFIG_FILE
    if not saved.is_file():
        return
    try:
        problems = config_mismatch(json.loads(saved.read_text()), config)
    except ValueError as err:
        raise CheckpointError(f"{saved}: unreadable ({err}); nothing in {workdir} was changed") from err
    if problems:
        raise CheckpointError(f"{workdir} holds a run with an incompatible config ({'; '.join(problems)}); "
                              f"nothing in it was changed: use another --workdir")


# What a finished or abandoned run leaves beside its checkpoints.
RUN_OUTPUTS = (BEST_DIR, "metrics.jsonl", "results.json", "parity_test.png", "learning_curves.png")


def archive_earlier_run(workdir: Path) -> Path | None:
    """Moves the outputs of an earlier run that left no periodic checkpoint (``best/``,
    ``metrics.jsonl``, results, plots) into ``workdir/previous/<UTC time>/``, so that a fresh run
    neither reuses its best parameters nor appends to its metrics; nothing is deleted.

    Returns:
      The folder they went to, or None if there was nothing to move.
    """
    import time

    workdir = Path(workdir)
    present = [name for name in RUN_OUTPUTS if (workdir / name).exists()]
    if not present:
        return None
    folder = workdir / "previous" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder.mkdir(parents=True, exist_ok=True)
    for name in present:
        (workdir / name).replace(folder / name)
    log.warning("%s held outputs of an earlier run without a checkpoint to resume (%s): moved to %s",
                workdir, ", ".join(present), folder)
    return folder


def has_checkpoint(workdir: Path) -> bool:
    """Whether ``workdir/checkpoints`` holds a finalised step."""
    root = Path(workdir) / PERIODIC_DIR
    return root.is_dir() and any(p.name.isdigit() for p in root.iterdir())
