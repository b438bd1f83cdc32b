"""Orbax checkpoints: round trip, resume fallback on damage or an incompatible config."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from scannet_jax import checkpoints

CONFIG = {"model": {"local_dim": 8, "n_attention": 1}, "data": {"target": "homo", "featurizer": {"mode": "exact"},
                                                            "ring": False},
          "optimizer": {"schedule": "sgdr", "lr": 5e-4}, "num_epochs": 10}


def _state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"step": np.array(step, np.int32), "params": {"dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                                                         "bias": rng.normal(size=4).astype(np.float32)}},
            "rng": np.array([0, step], np.uint32)}


def _save_steps(workdir: Path, steps=(3, 7), config=CONFIG) -> checkpoints.Checkpointer:
    ckpt = checkpoints.Checkpointer(workdir, config, keep=3)
    for step in steps:
        ckpt.save(step, _state(step), {"loop": {"epoch": step // 3, "batch_index": step % 3}})
    ckpt.wait_until_finished()
    return ckpt


def _assert_tree_equal(a, b):
    np.testing.assert_array_equal(a["params"]["dense"]["kernel"], b["params"]["dense"]["kernel"])
    np.testing.assert_array_equal(a["params"]["dense"]["bias"], b["params"]["dense"]["bias"])
    assert int(a["step"]) == int(b["step"])


def test_round_trip_restores_latest_with_meta(tmp_path):
    _save_steps(tmp_path).close()
    changed_epochs = {**CONFIG, "num_epochs": 99}  # not part of compatibility
    state, meta = checkpoints.Checkpointer(tmp_path, changed_epochs).restore_latest(_state(0))
    _assert_tree_equal(state, _state(7))
    assert meta["loop"] == {"epoch": 2, "batch_index": 1}
    assert meta["config"] == CONFIG


def test_empty_workdir_restores_nothing(tmp_path):
    assert checkpoints.Checkpointer(tmp_path, CONFIG).restore_latest(_state(0)) is None


def _truncate_arrays(step_dir: Path) -> None:
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files, f"no array data files under {step_dir}"
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 3])


def test_truncated_checkpoint_falls_back_to_previous_step(tmp_path, caplog):
    _save_steps(tmp_path).close()
    _truncate_arrays(tmp_path / "checkpoints" / "7")
    with caplog.at_level(logging.ERROR):
        state, _ = checkpoints.Checkpointer(tmp_path, CONFIG).restore_latest(_state(0))
    _assert_tree_equal(state, _state(3))
    message = caplog.text
    assert str(tmp_path / "checkpoints" / "7") in message
    assert "falling back to step 3" in message


def test_truncated_only_checkpoint_raises_naming_the_file(tmp_path):
    _save_steps(tmp_path, steps=(5,)).close()
    _truncate_arrays(tmp_path / "checkpoints" / "5")
    with pytest.raises(checkpoints.CheckpointError, match=str(tmp_path / "checkpoints" / "5")):
        checkpoints.Checkpointer(tmp_path, CONFIG).restore_latest(_state(0))


def test_incompatible_config_is_named(tmp_path):
    _save_steps(tmp_path, steps=(5,)).close()
    other = {**CONFIG, "model": {"local_dim": 16, "n_attention": 1}}
    with pytest.raises(checkpoints.CheckpointError, match=r"incompatible config: model.local_dim: 8 -> 16"):
        checkpoints.Checkpointer(tmp_path, other).restore_latest(_state(0))


def test_shape_mismatch_is_reported(tmp_path):
    _save_steps(tmp_path, steps=(5,)).close()
    wrong = _state(0)
    wrong["params"]["dense"]["kernel"] = np.zeros((5, 4), np.float32)
    with pytest.raises(checkpoints.CheckpointError, match=str(tmp_path / "checkpoints" / "5")):
        checkpoints.Checkpointer(tmp_path, CONFIG).restore_latest(wrong)


def test_best_params_and_load_pretrained(tmp_path):
    ckpt = _save_steps(tmp_path)
    best = {"params": _state(11)["params"], "target_mean": np.array(-6.5, np.float32), "target_std": np.array(0.6, np.float32)}
    ckpt.save_best(2, best, {"epoch": 2, "val_mae": 0.1})
    ckpt.save_best(2, best, {"epoch": 2, "val_mae": 0.1})  # an epoch redone after a resume
    ckpt.wait_until_finished()
    assert ckpt.best_meta()["val_mae"] == 0.1
    ckpt.close()
    model_config, params, scaler, _ = checkpoints.load_pretrained(tmp_path)
    assert model_config == CONFIG["model"]
    np.testing.assert_array_equal(params["dense"]["kernel"], best["params"]["dense"]["kernel"])
    assert scaler == {"mean": -6.5, "std": pytest.approx(0.6)}


def test_load_pretrained_without_checkpoint(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint found"):
        checkpoints.load_pretrained(tmp_path)


def test_config_mismatch_ignores_run_length():
    a = {"model": {"x": 1}, "num_epochs": 3, "data": {"target": "homo", "limit": 0}}
    b = {"model": {"x": 1}, "num_epochs": 9, "data": {"target": "lumo", "limit": 5}}
    assert checkpoints.config_mismatch(a, b) == ["data.target: 'homo' -> 'lumo'"]


def test_arrays_that_differ_from_their_saved_digest_are_refused(tmp_path, caplog):
    """Every saved array's CRC-32 is recorded in the step's meta and checked on restore. Orbax's
    own checksums cover its index nodes, not every data chunk, so silently changed numbers can
    restore without an error; here the recorded digest of one array is made to disagree
    (equivalent to its data changing after the save). Training falls back to the previous step;
    load_pretrained refuses, naming the directory and the array."""
    import json

    _save_steps(tmp_path).close()
    (meta_file,) = [f for f in (tmp_path / "checkpoints" / "7" / "meta").rglob("*")
                    if f.is_file() and b'"digests"' in f.read_bytes()]
    meta = json.loads(meta_file.read_text())
    meta["digests"]["params.dense.kernel"] = "00000000"
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.ERROR):
        state, _ = checkpoints.Checkpointer(tmp_path, CONFIG).restore_latest(_state(0))
    _assert_tree_equal(state, _state(3))
    assert "differ from what was saved" in caplog.text and "params.dense.kernel" in caplog.text
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoints/7: 1 array\(s\) differ from what was saved"
                                                          r".*params.dense.kernel"):
        checkpoints.load_pretrained(tmp_path / "checkpoints" / "7")
