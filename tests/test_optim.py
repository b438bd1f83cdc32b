"""Schedules against the original's numbers (tests/fixtures/original/lr_schedules.npz)."""

import json
from pathlib import Path

import numpy as np
import pytest

from scannet_jax import optim

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "original"


@pytest.fixture(scope="module")
def lr_fixture():
    path = FIXTURES / "lr_schedules.npz"
    return np.load(path)


@pytest.mark.parametrize("suffix", ["qm9", "trigger_0p4"])
def test_sgdr_matches_original_callback(lr_fixture, suffix):
    trigger = float(lr_fixture[f"sgdr_trigger_{suffix}"])
    sgdr = optim.SGDR(lr_max=5e-4, lr_min=1e-4, t0=50, tmult=2, compression=1.2, trigger=trigger)
    got = []
    for epoch, val_mae in zip(lr_fixture["epochs"], lr_fixture["val_mae"]):
        got.append(sgdr.lr_for_epoch(int(epoch)))
        sgdr.update(float(val_mae))
    np.testing.assert_allclose(got, lr_fixture[f"sgdr_lr_{suffix}"], rtol=1e-12, atol=0)


def test_sgdr_resumes_from_state_dict(lr_fixture):
    kwargs = dict(lr_max=5e-4, lr_min=1e-4, t0=50, tmult=2, compression=1.2, trigger=0.4)
    sgdr = optim.SGDR(**kwargs)
    val = lr_fixture["val_mae"]
    for e in range(120):
        sgdr.lr_for_epoch(e)
        sgdr.update(float(val[e]))
    resumed = optim.SGDR(**kwargs)
    resumed.load_state_dict(json.loads(json.dumps(sgdr.state_dict())))
    got = []
    for e in range(120, 800):
        got.append(resumed.lr_for_epoch(e))
        resumed.update(float(val[e]))
    np.testing.assert_allclose(got, lr_fixture["sgdr_lr_trigger_0p4"][120:], rtol=1e-12)


def _cosine_params(lr_fixture):
    return json.loads(str(lr_fixture["cosine_params_json"]))


def test_keras_cosine_decay(lr_fixture):
    p = _cosine_params(lr_fixture)
    sched = optim.keras_cosine_decay(p["lr"], p["decay_steps"], p["alpha"])
    got = np.array([float(sched(s)) for s in lr_fixture["cosine_steps"]])
    np.testing.assert_allclose(got, lr_fixture["cosine_lr"], rtol=2e-6)


@pytest.mark.parametrize(
    "kind,key",
    [("cosine", "cosine_plus_decay_effective_lr"), ("constant", "constant_5e-4_plus_decay_effective_lr")],
)
def test_applied_rate_with_legacy_decay(lr_fixture, kind, key):
    p = _cosine_params(lr_fixture)
    factor = optim.step_factor_schedule(
        kind,
        steps_per_epoch=p["steps_per_epoch"],
        num_epochs=p["epochs"],
        min_lr_ratio=p["min_lr"] / p["lr"],
        legacy_decay=p["adam_decay"],
    )
    got = np.array([p["lr"] * float(factor(s)) for s in lr_fixture["cosine_steps"]])
    np.testing.assert_allclose(got, lr_fixture[key], rtol=2e-6)


def test_sgdr_uses_legacy_decay_only():
    factor = optim.step_factor_schedule(
        "sgdr", steps_per_epoch=10, num_epochs=1000, min_lr_ratio=0.2, legacy_decay=1e-5
    )
    assert float(factor(0)) == 1.0
    np.testing.assert_allclose(float(factor(100_000)), 0.5, rtol=1e-6)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        optim.step_factor_schedule(
            "step", steps_per_epoch=1, num_epochs=1, min_lr_ratio=1.0, legacy_decay=0.0
        )


def test_keras_adam_state_injects_only_the_rate():
    """The Keras path keeps the state layout of its checkpoints: one injected hyperparameter."""
    import jax.numpy as jnp

    from scannet_jax.configs import qm9

    opt = qm9.get_config("homo").optimizer
    state = optim.create_optimizer(opt, steps_per_epoch=10).init({"w": jnp.ones(3)})
    assert set(state.hyperparams) == {"learning_rate"}


def test_onecycle_factor_needs_its_shape():
    with pytest.raises(ValueError, match="needs its OneCycle shape"):
        optim.step_factor_schedule(
            "onecycle", steps_per_epoch=1, num_epochs=1, min_lr_ratio=1.0, legacy_decay=0.0
        )
