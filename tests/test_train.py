"""Training loop: loss falls, kill-and-resume is exact, NaN targets/losses, fine-tuning, LR.

Fast cases use the structures of ``tests/fixtures/original/neighbours*.npz`` with a synthetic target
(see ``test_parallel.fixture_store``); the QM9 case uses the ``tiny`` config on a QM9 slice.
Runs that must be killed run this file as a script in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_parallel  # noqa: E402  (fixture store and tiny config)

FIXTURES = test_parallel.FIXTURES
REPO = test_parallel.REPO



def fixture_datasets(nan_target_at: int | None = None):
    """20 / 4 / 4 structures of the fixture store (structure 3 has a NaN target)."""
    from scannet_jax.datasets.splits import make_datasets

    store = test_parallel.fixture_store()
    y = store.targets["y"]
    if nan_target_at is not None:
        y[nan_target_at] = np.nan
    train_idx = np.arange(20)
    finite = y[train_idx][np.isfinite(y[train_idx])]
    data = make_datasets(store, {"train": train_idx, "validation": np.arange(20, 24),
                                 "test": np.arange(24, 28)}, "y")
    assert (data.mean, data.std) == (float(finite.mean()), float(finite.std()))
    return data


def fixture_config(**overrides):
    config = test_parallel.tiny_config()
    config.model.embed_dropout = 0.1  # dropout on: resume must reproduce its random masks
    config.model.ffn_dropout = 0.1
    config.data.target = "y"
    config.data.units = "a.u."
    config.batch_size = 4
    config.eval_batch_size = 8
    config.num_buckets = 1
    config.num_epochs = 3
    config.checkpoint_every_steps = 2
    config.optimizer.lr = 3e-3
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


def _subprocess_env(cache: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _start(workdir: Path, cache: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--workdir", str(workdir), *args],
                            env={**_subprocess_env(cache), **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _final_params(workdir: Path) -> dict[str, np.ndarray]:
    import jax

    from scannet_jax import checkpoints

    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    params = checkpoints.load_pretrained(workdir / "checkpoints" / str(steps[-1])).params
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def test_killed_run_resumes_to_identical_parameters(tmp_path):
    cache = tmp_path / "jax_cache"
    full = _start(tmp_path / "full", cache)
    killed = _start(tmp_path / "killed", cache)
    deadline = time.time() + 300
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    while time.time() < deadline and killed.poll() is None:
        # Finalised steps only: Orbax writes commit_success.txt into "<step>.orbax-checkpoint-tmp"
        # and then renames it to "<step>"; a kill between the two leaves no usable checkpoint.
        done = [p for p in ckpt_dir.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists()
                ] if ckpt_dir.exists() else []
        if done:
            killed.kill()  # SIGKILL: no cleanup, like a lost machine
            break
        time.sleep(0.005)
    killed.wait()
    assert killed.returncode == -9, "the run finished before a checkpoint was seen"
    assert not (tmp_path / "killed" / "results.json").exists()
    resumed = subprocess.run([sys.executable, __file__, "--workdir", str(tmp_path / "killed")],
                             env=_subprocess_env(cache), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "Resuming from checkpoint step" in resumed.stdout
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out[-3000:]
    a, b = _final_params(tmp_path / "full"), _final_params(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit
    full_results = json.loads((tmp_path / "full" / "results.json").read_text())
    resumed_results = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert resumed_results["mae"] == full_results["mae"]
    assert resumed_results["steps_run"] == full_results["steps_run"] == 15


def test_two_processes_checkpoint_resume_and_end_like_one(tmp_path):
    """2 processes on localhost (jax.distributed, one CPU device each, one shared workdir) save
    Orbax checkpoints together, resume from them together, and end with the parameters of one
    process trained on the same global batches (dropout off: masks depend on the device)."""
    cache = tmp_path / "jax_cache"
    single = _start(tmp_path / "one", cache, "--epochs=3", "--no-dropout")
    port = str(test_parallel._free_port())

    def two(epochs: int) -> list[str]:
        procs = [_start(tmp_path / "two", cache, f"--epochs={epochs}", "--no-dropout",
                        JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank))
                 for rank in range(2)]
        try:
            outputs = [p.communicate(timeout=300)[0] for p in procs]
        finally:
            for p in procs:  # a process left waiting for its peer would outlive the test
                p.kill()
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out[-3000:]
        return outputs

    two(epochs=2)
    assert (tmp_path / "two" / "results.json").exists()
    resumed = two(epochs=3)
    assert "Resuming from checkpoint step 10 (epoch 2, batch 0/5)" in resumed[0]
    out, _ = single.communicate(timeout=300)
    assert single.returncode == 0, out[-3000:]
    a, b = _final_params(tmp_path / "one"), _final_params(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)
    one, both = (json.loads((tmp_path / w / "results.json").read_text()) for w in ("one", "two"))
    assert both["steps_run"] == one["steps_run"] == 15
    assert both["mae"] == pytest.approx(one["mae"], rel=1e-4)


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    """One 4-epoch run on the fixture structures (structure 3's target is NaN); its log text."""
    from scannet_jax import train

    workdir = tmp_path_factory.mktemp("fixture_run")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        results = train.train_and_evaluate(fixture_config(num_epochs=4, checkpoint_every_steps=0), str(workdir),
                                           data=fixture_datasets(nan_target_at=3))
    finally:
        logging.getLogger().removeHandler(handler)
    return workdir, results, "\n".join(r.getMessage() for r in records)


def test_fixture_run_writes_outputs_and_masks_nan_target(fixture_run):
    workdir, results, log_text = fixture_run
    # the NaN target (structure 3 of the training split) is reported by index and not counted
    assert "train structure with data set index 3 (position 3 in the split) has y = nan" in log_text
    assert results["num_structures"] == {"train": 19, "validation": 4, "test": 4}
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "val_mae" in r]  # epoch records (others: log intervals)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert any("running_train_loss" in r for r in lines)
    assert all(np.isfinite(r["train_loss"]) for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    for name in ("results.json", "config.json", "target_scaler.json", "parity_test.png", "learning_curves.png"):
        assert (workdir / name).exists(), name
    assert results["compile_counts"]["train"] == 1  # one bucket → one compilation
    assert results["test_mae"] == pytest.approx(results["mae"]["test"])
    scaler = json.loads((workdir / "target_scaler.json").read_text())
    assert scaler["mean"] == pytest.approx(fixture_datasets(nan_target_at=3).mean)


def test_fine_tuning_loads_best_params_and_rejects_other_architecture(fixture_run):
    import jax

    from scannet_jax import checkpoints, train

    workdir = fixture_run[0]
    best = checkpoints.load_pretrained(workdir).params
    config = fixture_config()
    template = jax.tree.map(np.zeros_like, best)
    loaded = checkpoints.load_init_params(str(workdir), template, config.model.to_dict())
    jax.tree.map(np.testing.assert_array_equal, loaded, best)
    bigger = fixture_config(**{"model.local_dim": 32})
    template = jax.eval_shape(lambda: train.create_model(bigger).init(
        jax.random.PRNGKey(0), jax.tree.map(lambda x: x[0], _one_batch(bigger)))["params"])
    with pytest.raises(ValueError, match=r"architecture differs.*local_dim.*\(16, 32\)"):
        checkpoints.load_init_params(str(workdir), template, bigger.model.to_dict())


def test_fine_tuning_ignores_switches_without_parameters(fixture_run):
    """QM9 → fullerene: the fullerene config differs from QM9's only in use_ga_norm, which has no
    parameters, so a QM9 run initialises it (the parameter shapes are what is compared)."""
    import jax

    from scannet_jax.configs import fullerene, qm9
    from scannet_jax import checkpoints, train

    ours, theirs = fullerene.get_config("homo").model, qm9.get_config("homo").model
    assert {k for k in ours if ours[k] != theirs[k]} == {"use_ga_norm"}
    workdir = fixture_run[0]
    saved = json.loads((workdir / "config.json").read_text())["model"]
    config = fixture_config(**{"model.use_ga_norm": not saved["use_ga_norm"]})
    template = jax.eval_shape(lambda: train.create_model(config).init(
        jax.random.PRNGKey(0), jax.tree.map(lambda x: x[0], _one_batch(config)))["params"])
    best = checkpoints.load_pretrained(workdir).params
    loaded = checkpoints.load_init_params(str(workdir), template, config.model.to_dict())
    jax.tree.map(np.testing.assert_array_equal, loaded, best)


def test_fine_tuning_accepts_original_weights():
    import jax

    from scannet_jax import checkpoints, convert, train

    path = FIXTURES / "forward_scannplus_seed0.npz"
    model_config, original = convert.load_original_weights(path)
    config = fixture_config()
    config.model = model_config
    template = jax.eval_shape(lambda: train.create_model(config).init(
        jax.random.PRNGKey(0), jax.tree.map(lambda x: x[0], _one_batch(config)))["params"])
    loaded = checkpoints.load_init_params(str(path), template, config.model.to_dict())
    jax.tree.map(np.testing.assert_array_equal, loaded, original)


def test_fine_tuning_widens_the_original_element_table():
    """The original's QM9 weights embed Z < 10; a 95-row model keeps those rows and its own
    initialisation for Z = 10..94, everything else is loaded as it is."""
    import jax

    from scannet_jax import checkpoints, convert, train

    path = FIXTURES / "forward_scannplus_seed0.npz"
    model_config, original = convert.load_original_weights(path)
    assert original["embed_atom"]["embedding"].shape[0] == 10
    config = fixture_config()
    config.model = model_config
    config.model.n_atoms = 95
    fresh = train.create_model(config).init(jax.random.PRNGKey(1), jax.tree.map(lambda x: x[0], _one_batch(config)))
    fresh = jax.tree.map(np.asarray, fresh["params"])
    loaded = checkpoints.load_init_params(str(path), fresh, config.model.to_dict())
    table = loaded["embed_atom"]["embedding"]
    assert table.shape == (95, model_config.embedding_dim)
    np.testing.assert_array_equal(table[:10], original["embed_atom"]["embedding"])
    np.testing.assert_array_equal(table[10:], fresh["embed_atom"]["embedding"][10:])
    rest = lambda p: {k: v for k, v in p.items() if k != "embed_atom"}  # noqa: E731
    jax.tree.map(np.testing.assert_array_equal, rest(loaded), rest(original))
    config.model.n_atoms = 5  # a smaller table is not cut down: Z = 5..9 would lose their rows
    small = jax.eval_shape(lambda: train.create_model(config).init(
        jax.random.PRNGKey(0), jax.tree.map(lambda x: x[0], _one_batch(config)))["params"])
    with pytest.raises(ValueError, match=r"\['embed_atom'\]\['embedding'\]: \(10, 8\) in .*, \(5, 8\) here"):
        checkpoints.load_init_params(str(path), small, config.model.to_dict())


def _one_batch(config):
    from scannet_jax import batching, parallel

    data = fixture_datasets()
    plan = batching.make_plan(data.store, data.indices("train"), "y", 8, 1, parallel.make_mesh())
    return plan.batch(data.indices("train")[:8])


def test_nonfinite_step_is_skipped():
    import jax

    from scannet_jax import parallel, train

    config = fixture_config(batch_size=8, num_buckets=1)
    trainer = train.setup(config, fixture_datasets())
    state, mesh = trainer.state, trainer.mesh
    before = jax.tree.map(np.asarray, state.params)
    batch = trainer.train_plan.batch(trainer.data.indices("train")[:8])
    batch.edges["distances"][0, 0] = np.nan  # a corrupt edge: NaN prediction, NaN loss
    state, metrics = trainer.steps.train(state, parallel.shard_batch(batch, mesh))
    assert float(metrics["nonfinite"]) == 1.0
    assert int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)


def test_cpu_steps_are_compiled_without_ynn_fusions_where_the_network_runs_faster_so():
    """On CPU, SCANN+'s train, eval and predict steps have no YNNPACK fusion
    (steps.compiler_options), and give the numbers of a plain ``jax.jit`` of the same forward
    pass to float32 rounding; each network's choice is the measured one (docs/performance.md)."""
    import jax

    from scannet_jax import models, parallel, steps, train

    assert jax.default_backend() == "cpu"
    assert steps.compiler_options(ynn=True) is None
    assert steps.compiler_options(ynn=False) == {"xla_cpu_experimental_ynn_fusion_type": ""}
    choices = {name: (models.get_spec(name).train_with_ynn, models.get_spec(name).forward_with_ynn)
               for name in ("scannplus", "scann", "alignn", "lstm", "megnet", "amdnet")}
    assert choices == {"scannplus": (False, False), "scann": (False, False), "alignn": (False, False),
                       "lstm": (True, False), "megnet": (True, True), "amdnet": (True, True)}

    trainer = train.setup(fixture_config(batch_size=8, num_buckets=1), fixture_datasets())
    assert models.model_name(trainer.config.model) == "scannplus"
    batch = parallel.shard_batch(trainer.train_plan.batch(trainer.data.indices("train")[:8]), trainer.mesh)
    for name in ("train", "eval", "predict"):
        text = getattr(trainer.steps, name).lower(trainer.state, batch).compile().as_text()
        assert "__ynn_fusion" not in text, name

    state = trainer.state
    plain = jax.jit(lambda s, b: steps.model_outputs(s.apply_fn, s.variables(), parallel.unstack_local(b),
                                                     s.target_mean, s.target_std)[0])
    np.testing.assert_allclose(np.asarray(trainer.steps.predict(state, batch))[0], np.asarray(plain(state, batch)),
                               rtol=1e-5, atol=1e-5)


def test_optimizer_applies_the_original_learning_rate():
    """Our update divided by the same Adam direction at a constant 5e-4 is the applied rate / 5e-4.

    The ratio cancels Adam's own float32 rounding (its bias correction is off by ~1e-5 early on).
    """
    import jax.numpy as jnp
    import optax

    from scannet_jax import optim, train

    lr = np.load(FIXTURES / "lr_schedules.npz")
    config = fixture_config()
    config.optimizer.lr = 5e-4
    config.optimizer.schedule = "cosine"
    ours = train.create_optimizer(config, steps_per_epoch=860)
    plain = optax.chain(optim.scale_by_keras_adam(b1=0.9, b2=0.999, eps=1e-7), optax.scale(-5e-4))
    params = jnp.zeros(())
    state_ours, state_plain = ours.init(params), plain.init(params)
    ratios = []
    for _ in range(101):
        a, state_ours = ours.update(jnp.ones(()), state_ours, params)
        b, state_plain = plain.update(jnp.ones(()), state_plain, params)
        ratios.append(float(a) / float(b))
    np.testing.assert_allclose(5e-4 * np.array([ratios[s] for s in (0, 1, 10, 100)]),
                               lr["cosine_plus_decay_effective_lr"][:4], rtol=1e-6)


def test_tiny_qm9_loss_falls(tmp_path):
    from scannet_jax import train

    config = test_parallel.tiny_config()
    config.model.n_atoms = 10
    config.num_epochs = 3
    config.data.limit = 300
    results = train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "val_mae" in r]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert results["units"] == "eV" and results["num_structures"]["train"] == 240
    assert 0 < results["test_mae"] < 1.0  # eV; the HOMO std is about 0.6 eV


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--no-dropout", action="store_true")
    args = parser.parse_args()
    from scannet_jax import parallel, train

    parallel.initialize_distributed()  # from JAX_* variables, as main.py does from the config
    dropout = 0.0 if args.no_dropout else 0.1
    config = fixture_config(num_epochs=args.epochs, **{"model.embed_dropout": dropout, "model.ffn_dropout": dropout})
    train.train_and_evaluate(config, args.workdir, data=fixture_datasets())


def test_config_variants_and_errors():
    sys.path.insert(0, str(REPO))
    from scannet_jax.configs import qm9

    full = qm9.get_config("homo")
    assert (full.batch_size, full.optimizer.lr, full.optimizer.min_lr, full.num_epochs, full.patience) == (
        128, 5e-4, 1e-4, 1000, 200)
    assert (full.model.local_dim, full.model.n_attention, full.model.g_update) == (128, 7, True)
    assert full.data.limit == 0 and full.data.featurizer.mode == "exact"
    tiny = qm9.get_config("cv,tiny,scann")
    assert (tiny.data.target, tiny.data.units, tiny.data.limit, tiny.model.g_update) == (
        "cv", "cal/(mol K)", 400, False)
    assert tiny.model.local_dim < full.model.local_dim
    assert qm9.get_config("gap,tiny,limit=50").data.limit == 50
    with pytest.raises(ValueError, match="unknown QM9 target 'homoo'"):
        qm9.get_config("homoo")
    with pytest.raises(ValueError, match="unknown key 'lmit'"):
        qm9.get_config("homo,lmit=5")
    with pytest.raises(ValueError, match="limit='x': expected int"):
        qm9.get_config("homo,limit=x")


def test_main_rejects_bad_override(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "main.py"), "--config=configs/qm9.py:homo,tiny",
                          f"--workdir={tmp_path}", "--config.batch_size=many"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "batch_size" in run.stderr and "many" in run.stderr
    run = subprocess.run([sys.executable, str(REPO / "main.py"), "--config=configs/qm9.py:homo,tiny",
                          f"--workdir={tmp_path}", "--config.batch_sise=64"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "error: --config.batch_sise: the config has no field 'batch_sise'" in run.stderr


def test_zero_batch_sizes_are_refused_by_name():
    from scannet_jax import train

    with pytest.raises(ValueError, match=r"config.eval_batch_size=0: must be at least 1"):
        train.setup(fixture_config(eval_batch_size=0), fixture_datasets())


def test_incompatible_run_is_refused_before_anything_is_written(fixture_run, tmp_path):
    """A second run with another featuriser on a finished workdir is refused, and every file the
    first run wrote is unchanged (predict would otherwise featurise or label differently)."""
    import shutil

    from scannet_jax import checkpoints, train

    workdir = tmp_path / "copy"
    shutil.copytree(fixture_run[0], workdir)
    before = {p: p.read_bytes() for p in workdir.glob("*.json")}
    with pytest.raises(checkpoints.CheckpointError, match=r"incompatible config \(data.featurizer.cutoff: 4.0 -> 6.0\)"
                                                          r".*nothing in it was changed"):
        train.train_and_evaluate(fixture_config(**{"data.featurizer.cutoff": 6.0}), str(workdir),
                                 data=fixture_datasets())
    assert {p: p.read_bytes() for p in workdir.glob("*.json")} == before


def test_second_run_on_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    import os

    from scannet_jax import checkpoints, train

    lock = checkpoints.WorkdirLock(tmp_path)
    try:
        with pytest.raises(checkpoints.WorkdirBusyError, match=rf"in use by another training run \(PID {os.getpid()} on host"):
            train.train_and_evaluate(fixture_config(), str(tmp_path), data=fixture_datasets())
    finally:
        lock.release()
    assert not (tmp_path / "config.json").exists()


def test_fresh_run_moves_an_earlier_runs_outputs_aside(fixture_run, tmp_path):
    """checkpoints/ deleted, best/ and metrics.jsonl kept: the new run does not report the old
    best epoch nor append to the old metrics; the old outputs are kept under previous/."""
    import shutil

    from scannet_jax import train

    workdir = tmp_path / "copy"
    shutil.copytree(fixture_run[0], workdir)
    shutil.rmtree(workdir / "checkpoints")
    old_metrics = (workdir / "metrics.jsonl").read_text()
    results = train.train_and_evaluate(fixture_config(num_epochs=1), str(workdir), data=fixture_datasets())
    assert results["best_epoch"] == 0 and results["epochs_run"] == 1
    epochs = [json.loads(line)["epoch"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
              if "val_mae" in line]
    assert epochs == [0]
    (previous,) = (workdir / "previous").iterdir()
    assert (previous / "metrics.jsonl").read_text() == old_metrics and (previous / "best").is_dir()


def test_a_budget_stop_mid_epoch_records_the_partial_epoch(tmp_path):
    """A run whose wall-time budget ends inside its first epoch, between two log steps, still
    leaves that epoch's throughput in metrics.jsonl (one running record, at the last step)."""
    from scannet_jax import train

    config = fixture_config(log_every_steps=1000, max_wall_time_s=1e-3, checkpoint_every_steps=0)
    results = train.train_and_evaluate(config, str(tmp_path), data=fixture_datasets())
    assert results["epochs_run"] == 0 and results["stop_reason"].endswith("reached in epoch 0")
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = -(-len(fixture_datasets().indices("train")) // config.batch_size)
    assert record["step"] == results["steps_run"] >= 1
    assert record["epoch_progress"] == pytest.approx(record["step"] / steps_per_epoch) and record["epoch_progress"] < 1
    assert record["train_mol_per_s"] > 0 and np.isfinite(record["running_train_loss"])


def test_sigterm_saves_a_checkpoint_and_the_next_start_resumes(tmp_path):
    import signal

    cache = tmp_path / "jax_cache"
    run = _start(tmp_path / "run", cache, "--epochs=200")
    deadline = time.time() + 300
    metrics = tmp_path / "run" / "metrics.jsonl"
    while time.time() < deadline and run.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out[-3000:]  # the test script returns normally after the stop
    assert "stopped by SIGTERM" in out and "checkpoint saved at step" in out
    assert not (tmp_path / "run" / "results.json").exists()
    resumed = subprocess.run([sys.executable, __file__, "--workdir", str(tmp_path / "run"), "--epochs=1"],
                             env=_subprocess_env(cache), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "Resuming from checkpoint step" in resumed.stdout
