"""What training does when an epoch diverges (``optimizer.on_divergence``), and the prediction
floor of the AMDNet recipe's band gaps (``prediction_floor``), on the fixture structures of
``test_train``: a non-finite step is injected by wrapping the jitted train step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_train  # noqa: E402  (fixture structures and config)

STEPS_PER_EPOCH = 5  # 20 training structures in batches of 4


def _run_with_nonfinite_step(monkeypatch, workdir: Path, bad_calls: set[int], **overrides):
    """Trains the fixture config; the train step's calls in ``bad_calls`` (0-based) report a
    non-finite step (as a NaN loss would, after the step skipped its update). Returns the
    results, the epoch records and the parameters each epoch's first step started from."""
    import jax

    from scannet_jax import train

    make_steps = train.make_steps
    starts: list[dict[str, np.ndarray]] = []

    def steps_with_bad_calls(*args, **kwargs):
        steps = make_steps(*args, **kwargs)
        calls = iter(range(10**6))
        good_train = steps.train

        def train_step(state, batch):
            call = next(calls)
            if call % STEPS_PER_EPOCH == 0:
                starts.append(jax.tree.map(np.array, state.params))  # a copy: the state is donated
            state, metrics = good_train(state, batch)
            if call in bad_calls:
                metrics = {**metrics, "nonfinite": metrics["nonfinite"] + 1.0}
            return state, metrics

        steps.train = train_step
        return steps

    monkeypatch.setattr(train, "make_steps", steps_with_bad_calls)
    config = test_train.fixture_config(checkpoint_every_steps=0, **overrides)
    config.optimizer.update(schedule="constant", min_lr=config.optimizer.lr)
    results = train.train_and_evaluate(config, str(workdir), data=test_train.fixture_datasets())
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return results, [r for r in lines if "val_mae" in r], starts


def _same(a, b) -> bool:
    import jax

    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_reload_best_halves_the_rate_and_reloads_the_best_parameters(monkeypatch, tmp_path):
    lr = 3e-3
    results, records, starts = _run_with_nonfinite_step(
        monkeypatch, tmp_path, {STEPS_PER_EPOCH + 2}, num_epochs=3, **{"optimizer.on_divergence": "reload_best"})
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert [r["lr"] for r in records] == pytest.approx([lr, lr, lr / 2])
    assert [r["divergence"] for r in records] == [
        "", "epoch 1 diverged (1 non-finite step(s)): learning rate halved to 0.0015, best-validation parameters "
        "of epoch 0 reloaded", ""]
    # epoch 0 is the best so far when epoch 1 diverges: epoch 2 starts where epoch 1 started
    assert records[0]["val_mae"] == records[0]["best_val_mae"]
    assert _same(starts[2], starts[1]) and not _same(starts[1], starts[0])
    assert results["stop_reason"] == "num_epochs=3 reached"


def test_reload_best_stops_when_the_halved_rate_is_below_1e_7(monkeypatch, tmp_path):
    results, records, _ = _run_with_nonfinite_step(
        monkeypatch, tmp_path, {STEPS_PER_EPOCH}, num_epochs=4,
        **{"optimizer.on_divergence": "reload_best", "optimizer.lr": 1.5e-7})
    assert [r["epoch"] for r in records] == [0, 1]
    assert results["stop_reason"] == ("stopped: epoch 1 diverged (1 non-finite step(s)) and the halved learning "
                                      "rate 7.5e-08 is below 1e-07")
    assert records[1]["divergence"] == results["stop_reason"]


def test_skip_halves_the_rate_at_the_next_log_and_keeps_the_parameters(monkeypatch, tmp_path):
    results, records, starts = _run_with_nonfinite_step(monkeypatch, tmp_path, {STEPS_PER_EPOCH + 1},
                                                        num_epochs=3)
    # the halving comes at the last batch's log of epoch 1: within the epoch record of epoch 1
    assert [r["lr"] for r in records] == pytest.approx([3e-3, 1.5e-3, 1.5e-3])
    assert all("divergence" not in r for r in records)
    assert not _same(starts[2], starts[1])
    assert results["stop_reason"] == "num_epochs=3 reached"


def test_a_loss_100_times_the_previous_epochs_is_a_divergence():
    from scannet_jax.loop import diverged

    assert not diverged(1.0, 0.0, None)
    assert not diverged(100.0, 0.0, 1.0)
    assert diverged(100.5, 0.0, 1.0)
    assert diverged(0.5, 1.0, 1.0)
    assert diverged(float("nan"), 0.0, 1.0)


def test_unknown_divergence_mode_is_refused_by_name():
    from scannet_jax.loop import RunSettings

    config = test_train.fixture_config(**{"optimizer.on_divergence": "retry"})
    with pytest.raises(ValueError, match=r"config.optimizer.on_divergence='retry': unknown; known: skip, reload_best"):
        RunSettings.from_config(config)


def test_prediction_floor_clips_the_test_figures_and_predict(tmp_path):
    """A floor above every target: each clipped prediction is the floor, so the test MAE is
    the mean distance of the test targets below it, while validation stays unclipped."""
    from scannet_jax import train
    from scannet_jax.predict import Predictor

    data = test_train.fixture_datasets()
    y = data.store.targets["y"]
    floor = float(np.nanmax(y)) + 1.0
    config = test_train.fixture_config(num_epochs=1, checkpoint_every_steps=0, prediction_floor=floor)
    results = train.train_and_evaluate(config, str(tmp_path), data=data)
    test_y = y[data.indices("test")]
    assert results["prediction_floor"] == floor
    assert results["test_mae"] == pytest.approx(np.abs(floor - test_y).mean(), rel=1e-6)
    assert results["rmse"]["test"] == pytest.approx(np.sqrt(((floor - test_y) ** 2).mean()), rel=1e-6)
    assert results["test_unclipped"]["mae"] < results["test_mae"]
    predictor = Predictor.from_workdir(tmp_path)
    assert predictor.prediction_floor == floor
    values = [p.value for p in predictor.predict_store(data.store.subset(data.indices("test")))]
    assert values == [floor] * len(test_y)
