"""Train → predict round trip on the tiny QM9 config through ``python main.py predict``, and the
command's handling of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
import ase.io

REPO = Path(__file__).resolve().parents[1]


def tiny_config():
    sys.path.insert(0, str(REPO))
    from scannet_jax.configs import qm9

    config = qm9.get_config("homo,tiny")
    config.num_epochs = 1
    config.data.limit = 200
    config.checkpoint_every_steps = 0
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny QM9 run: (workdir, config, results, test-split molecules as ase.Atoms, test store)."""
    from scannet_jax import train

    config = tiny_config()
    # a fresh feature cache: the round trip must compare against the current featuriser
    config.data.data_dir = str(tmp_path_factory.mktemp("feature_cache"))
    config.data.num_workers = 1
    workdir = tmp_path_factory.mktemp("tiny_qm9")
    data = train.get_datasets(config)
    from scannet_jax.datasets import qm9
    molecules = qm9.read_qm9(limit=config.data.limit)
    results = train.train_and_evaluate(config, str(workdir), data=data)
    test_atoms = []
    for s in data.test.index:
        structure = molecules.structure(int(s))
        test_atoms.append(Atoms(structure.numbers, structure.positions))
    return workdir, config, results, test_atoms, data


def direct_predictions(workdir: Path, config, store) -> np.ndarray:
    """model.apply on the cached training-path graphs of ``store`` with the best params, in eV."""
    from scannet_jax import batching, checkpoints, models

    _, params, scaler, _ = checkpoints.load_pretrained(workdir)
    bucket = batching.Bucket(int(store.n_node.sum()) + 1, int(store.n_edge.sum()), len(store) + 1)
    graphs = batching.pad_batch(store, np.arange(len(store)), bucket, None)
    values, _ = models.build_model(config.model).apply({"params": params}, graphs)
    return np.asarray(values[:len(store)]) * scaler["std"] + scaler["mean"]


def test_round_trip_matches_training_evaluation(trained, tmp_path, capsys):
    from scannet_jax import cli_predict

    workdir, config, results, test_atoms, data = trained
    inputs = tmp_path / "test_split.extxyz"
    ase.io.write(inputs, test_atoms, format="extxyz")
    output, table = tmp_path / "scored.extxyz", tmp_path / "table.json"
    status = cli_predict.main([f"--workdir={workdir}", str(inputs), f"--output={output}", f"--json={table}",
                               "--num-workers=1"])
    assert status == 0
    rows = json.loads(table.read_text())["structures"]
    predicted = np.array([r["prediction"] for r in rows])
    assert [r["frame"] for r in rows] == list(range(len(test_atoms)))

    targets = data.test.targets["homo"]
    assert np.mean(np.abs(predicted - targets)) == pytest.approx(results["test_mae"], abs=1e-5)
    np.testing.assert_allclose(predicted, direct_predictions(workdir, config, data.test), atol=1e-5)

    back = ase.io.read(output, index=":")
    assert len(back) == len(test_atoms)
    for atoms, row, original in zip(back, rows, test_atoms):
        assert atoms.info["homo"] == pytest.approx(row["prediction"], abs=1e-6)
        np.testing.assert_allclose(atoms.arrays["ga_score"], row["ga_scores"], atol=1e-7)
        assert atoms.arrays["ga_score"].sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(atoms.positions, original.positions, atol=1e-7)

    text = capsys.readouterr().out
    first = rows[0]
    top = first["top_atoms"][0]
    assert "prediction (eV)" in text
    assert f"{top['symbol']}{top['index']} {top['ga_score']:.2f}" in text
    assert top["ga_score"] == max(first["ga_scores"])


def test_workdir_records_the_training_domain(trained):
    workdir, _, _, _, data = trained
    sizes = np.concatenate([data.split(s).n_node for s in ("train", "validation", "test")])
    assert json.loads((workdir / "domain.json").read_text()) == {
        "elements": sorted(set(data.train.atomic_numbers.tolist())), "periodic": False,
        "max_atoms": int(sizes.max())}


def test_workdir_without_domain_is_refused_naming_the_file(trained, tmp_path):
    import shutil

    from scannet_jax import predict

    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    (copy / "domain.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{copy / 'domain.json'}: missing; it records the elements"):
        predict.Predictor.from_workdir(copy, num_workers=1)


def test_checkpoint_directory_gives_the_same_predictions(trained):
    from scannet_jax import predict

    workdir, _, _, test_atoms, _ = trained
    best = next((workdir / "best").iterdir())
    a = predict.Predictor.from_workdir(workdir, num_workers=1)(test_atoms[:5])
    b = predict.Predictor.from_workdir(best, num_workers=1)(test_atoms[:5])
    assert [x.value for x in a] == [x.value for x in b]


def test_bad_inputs_are_reported_by_file_and_frame(trained, tmp_path, capsys):
    from scannet_jax import cli_predict

    workdir = trained[0]
    frames = [molecule("CH4"), Atoms("CH", [[0, 0, 0], [np.nan, 0, 1.0]]), Atoms("CSi", [[0, 0, 0], [0, 0, 1.9]]),
              molecule("H2O")]
    mixed = tmp_path / "mixed.extxyz"
    ase.io.write(mixed, frames, format="extxyz")
    crystal = tmp_path / "POSCAR"
    ase.io.write(crystal, bulk("C", "diamond", a=3.57), format="vasp")
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is not\na structure file\n")
    pictures, table = tmp_path / "png", tmp_path / "table.json"
    status = cli_predict.main([f"--workdir={workdir}", str(mixed), str(crystal), str(garbage),
                               f"--png={pictures}", f"--json={table}", "--num-workers=1"])
    assert status == cli_predict.EXIT_SOME_FAILED
    err = capsys.readouterr().err
    assert f"{mixed} frame 1: atom 1 (H) has non-finite coordinates" in err
    assert f"{mixed} frame 2: element(s) Si (first: atom 1) never seen in training" in err
    assert f"{crystal} frame 0: a periodic structure" in err and "given to a molecule model" in err
    assert f"{garbage}: cannot read" in err
    rows = json.loads(table.read_text())["structures"]
    assert [(Path(r["file"]).name, r["frame"]) for r in rows] == [("mixed.extxyz", 0), ("mixed.extxyz", 3)]
    assert sorted(p.name for p in pictures.iterdir()) == sorted(
        cli_predict._png_name(str(mixed), k) for k in (0, 3))

    status = cli_predict.main([f"--workdir={workdir}", str(mixed), "--allow-unseen-elements", "--num-workers=1"])
    assert status == cli_predict.EXIT_SOME_FAILED  # the NaN frame still fails
    assert "Si" in capsys.readouterr().out


def test_outputs_are_checked_first_written_whole_and_inputs_left_alone(trained, tmp_path, capsys, monkeypatch):
    """Issue-17 faults: a missing output directory stops the command before any work; a failing
    write leaves the old output whole; same-named files in two folders get two pictures; an
    SQLite file that is not an ASE database is reported and not modified; '@' in a file name is
    part of the name; Z = 120 in one file does not stop the others; a NaN prediction fails."""
    import sqlite3

    from scannet_jax import cli_predict, predict

    workdir = trained[0]
    with pytest.raises(SystemExit, match=r"--output .*: directory .*missing_dir does not exist"):
        cli_predict.main([f"--workdir={workdir}", "x.xyz", f"--output={tmp_path / 'missing_dir' / 'o.extxyz'}"])

    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        ase.io.write(tmp_path / folder / "mol.xyz", molecule("CH4"))
    at_sign = tmp_path / "w@1.xyz"
    ase.io.write(at_sign, [molecule("H2O"), molecule("NH3")])
    z120 = tmp_path / "z120.extxyz"
    z120.write_text("1\nProperties=species:S:1:pos:R:3:Z:I:1 pbc=\"F F F\"\nH 0.0 0.0 0.0 120\n")
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE samples (x REAL)")
    foreign_bytes = foreign.read_bytes()
    output, pictures = tmp_path / "scored.extxyz", tmp_path / "png"
    output.write_text("old content\n")

    def failing_write(path, *args, **kwargs):
        Path(path).write_text("partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(cli_predict.ase.io, "write", failing_write)
    args = [f"--workdir={workdir}", str(tmp_path / "d1" / "mol.xyz"), str(tmp_path / "d2" / "mol.xyz"),
            str(at_sign), str(z120), str(foreign), f"--output={output}", f"--png={pictures}", "--num-workers=1"]
    with pytest.raises(OSError, match="No space left"):
        cli_predict.main(args)
    assert output.read_text() == "old content\n" and sorted(p.name for p in tmp_path.glob(".scored*")) == []
    monkeypatch.undo()
    status = cli_predict.main(args)
    assert status == cli_predict.EXIT_SOME_FAILED
    captured = capsys.readouterr()
    assert f"{z120} frame 0: atom 0 has atomic number Z=120: no such element" in captured.err
    assert f"{foreign}: cannot read" in captured.err
    assert "not an ASE database" in captured.err and foreign.read_bytes() == foreign_bytes
    back = ase.io.read(output, index=":")
    assert [a.info["source_file"] for a in back] == [str(tmp_path / "d1" / "mol.xyz"), str(tmp_path / "d2" / "mol.xyz"),
                                                    str(at_sign), str(at_sign)]
    assert len(list(pictures.iterdir())) == 4

    real = predict.Predictor.predict_each
    monkeypatch.setattr(predict.Predictor, "predict_each", lambda self, atoms, **kw: [
        predict.Prediction(float("nan"), r.ga_scores) for r in real(self, atoms, **kw)])
    assert cli_predict.main([f"--workdir={workdir}", str(at_sign), "--num-workers=1"]) == cli_predict.EXIT_SOME_FAILED
    assert "the prediction is not finite (nan)" in capsys.readouterr().err


def test_structures_outside_what_the_model_saw_are_predicted_with_a_warning(trained, tmp_path, capsys):
    from scannet_jax import cli_predict

    workdir = trained[0]
    path = tmp_path / "odd.extxyz"
    ase.io.write(path, [Atoms("C", [[0.0, 0.0, 0.0]]), molecule("C60")], format="extxyz")
    status = cli_predict.main([f"--workdir={workdir}", str(path), "--num-workers=1"])
    assert status == 0
    err = capsys.readouterr().err
    assert f"warning: {path} frame 0: no neighbour within the cutoff (4.0 Å)" in err
    assert f"warning: {path} frame 1: 60 atoms: larger than any structure the model was trained on" in err


def test_main_py_dispatches_predict():
    run = subprocess.run([sys.executable, str(REPO / "main.py"), "predict", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "--allow-unseen-elements" in run.stdout and "--workdir" in run.stdout
