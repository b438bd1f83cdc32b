"""Predictor on hand-built molecules with a small randomly initialised model: invariances,
batching against single calls, compilation counts, large structures and error messages.
(The train → predict round trip on QM9 is in test_cli_predict.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from scannet_jax import batching, models, predict, structures
from scannet_jax.datasets import featurize, qm9
from scannet_jax.graphs import GraphStore
from scannet_jax.neighbors import FeaturizerSettings

MEAN, STD = -6.5, 0.6  # a HOMO-like scaler (eV)


def small_model_config():
    config = models.default_model_config()
    config.update(n_atoms=16, n_attention=1, embedding_dim=8, local_dim=16, num_head=2, global_dim=16,
                  dense_out=16)
    return config


@pytest.fixture(scope="module")
def predictor():
    config = small_model_config()
    atoms = molecule("CH4")
    store = GraphStore.from_structures(
        [atoms.numbers], [featurize.featurize_one(structures.from_atoms(atoms),
                                                  FeaturizerSettings(), False)])
    graphs = batching.pad_batch(store, [0], batching.Bucket(64, 384, 2), None)
    params = models.build_model(config).init(jax.random.PRNGKey(0), graphs)["params"]
    return predict.Predictor(config, params, settings=FeaturizerSettings(), target="homo", units="eV",
                             mean=MEAN, std=STD, domain=qm9.DOMAIN, batch_size=4,
                             num_workers=1)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def test_rotated_translated_permuted_copy_gives_same_prediction_and_permuted_scores(predictor):
    rng = np.random.default_rng(0)
    atoms = molecule("CH3CH2OH")
    perm = rng.permutation(len(atoms))
    moved = Atoms(atoms.numbers[perm], (atoms.positions @ random_rotation(rng).T + [3.0, -1.0, 7.5])[perm])
    a, b = predictor(atoms), predictor(moved)
    assert b.value == pytest.approx(a.value, abs=1e-5)
    np.testing.assert_allclose(b.ga_scores, a.ga_scores[perm], atol=1e-6)
    assert a.ga_scores.sum() == pytest.approx(1.0, abs=1e-6)
    assert a.ga_scores.shape == (len(atoms),) and (a.ga_scores > 0).all()


def test_batched_list_equals_single_calls_and_compiles_once_per_bucket(predictor):
    mols = [molecule(name) for name in ("H2O", "CH4", "C6H6", "CH3CH2OH", "NH3", "HCOOH", "CH3CN")]
    before = predictor.num_compiles
    batched = predictor(mols)
    after_batched = predictor.num_compiles
    again = predictor(list(reversed(mols)))
    assert predictor.num_compiles == after_batched  # same shapes: nothing recompiled
    assert after_batched - before <= 2  # 7 molecules in batches of 4: at most two buckets
    singles = [predictor(m) for m in mols]
    for one, many, rev in zip(singles, batched, reversed(again)):
        assert many.value == pytest.approx(one.value, abs=1e-5)
        assert rev.value == pytest.approx(one.value, abs=1e-5)
        np.testing.assert_allclose(many.ga_scores, one.ga_scores, atol=1e-6)
    # the prediction is de-standardised: model output · std + mean
    assert all(abs(p.value - MEAN) < 10 * STD for p in singles)


def test_structure_larger_than_any_bucket_is_predicted_untruncated(predictor):
    rng = np.random.default_rng(1)
    # 200 atoms on a jittered 1.5 Å grid (C and H), far beyond the 29-atom QM9 buckets
    grid = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3)[:200] * 1.5
    big = Atoms(np.where(np.arange(200) % 3 == 0, 1, 6), grid + rng.uniform(-0.1, 0.1, grid.shape))
    largest = predictor.buckets[1][-1]
    assert len(big) + 1 > largest.n_node
    before = predictor.num_compiles
    result = predictor(big)
    assert predictor.num_compiles == before + 1
    assert result.ga_scores.shape == (200,) and np.isfinite(result.value)
    assert result.ga_scores.sum() == pytest.approx(1.0, abs=1e-5)
    predictor(big)
    assert predictor.num_compiles == before + 1


def test_write_sets_info_and_ga_column(predictor):
    atoms = molecule("H2O")
    result = predictor(atoms, write=True)
    assert atoms.info["homo"] == result.value
    np.testing.assert_array_equal(atoms.arrays["ga_score"], result.ga_scores)


@pytest.mark.parametrize("atoms, message", [
    (Atoms(), "empty structure"),
    (Atoms("CH", [[0, 0, 0], [np.nan, 0, 1.1]]), r"atom 1 \(H\) has non-finite coordinates"),
    (Atoms("CSi", [[0, 0, 0], [0, 0, 1.9]]), r"element\(s\) Si \(first: atom 1\) never seen in training"),
    (bulk("C", "diamond", a=3.57), r"a periodic structure \(pbc=\[True, True, True\]\) given to a molecule model"),
    (Atoms("CCl", [[0, 0, 0], [0, 0, 1.8]]), r"atom 1 is Cl \(Z=17\); the model embeds only Z < 16"),
    (Atoms("CH", [[0, 0, 0], [0, 0, 0.05]]), "featurisation failed: atoms 0 and 1 are 0.05 Å apart"),
])
def test_bad_structures_are_named_and_the_rest_predicted(predictor, atoms, message):
    good = molecule("CH4")
    results = predictor.predict_each([good, atoms, good])
    assert isinstance(results[1], predict.StructureError)
    assert pytest.approx(results[0].value) == results[2].value
    with pytest.raises(predict.StructureError, match="structure 1: " + message):
        predictor([good, atoms])


def test_unseen_elements_allowed_on_request(predictor):
    atoms = Atoms("CSi", [[0, 0, 0], [0, 0, 1.9]])
    assert predictor(atoms, allow_unseen_elements=True).ga_scores.shape == (2,)


def test_from_workdir_without_config_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        predict.Predictor.from_workdir(tmp_path)


def test_top_atoms():
    atoms = molecule("H2O")
    assert predict.top_atoms(atoms, np.array([0.2, 0.5, 0.3]), k=2) == [(1, "H", 0.5), (2, "H", 0.3)]


def test_worker_pool_featurisation_equals_in_process(predictor, monkeypatch):
    mols = [molecule(name) for name in ("H2O", "CH4", "C6H6", "CH3CH2OH", "NH3")]
    mols.insert(2, Atoms("CH", [[0, 0, 0], [0, 0, 0.05]]))
    serial = predictor.predict_each(mols)
    monkeypatch.setattr(predict, "PARALLEL_THRESHOLD", 4)
    pooled = predict.Predictor(predictor.model_config, predictor._variables["params"], settings=predictor.settings,
                               mean=MEAN, std=STD, domain=predictor.domain, batch_size=4, num_workers=2)
    try:
        parallel = pooled.predict_each(mols)
        assert pooled.featurizer._pool is not None
    finally:
        pooled.close()
    assert "atoms 0 and 1 are 0.05 Å apart" in str(parallel[2])
    for a, b in zip(serial[:2] + serial[3:], parallel[:2] + parallel[3:]):
        assert b.value == a.value
        np.testing.assert_array_equal(b.ga_scores, a.ga_scores)


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "original"


def forward_fixture_molecules(count: int) -> tuple[list[Atoms], Any]:
    """The first ``count`` molecules of forward_scannplus_seed0.npz (benzene #214, formamide #12)
    as fed to the original (from neighbours.npz), and that fixture."""
    nb = np.load(FIXTURES / "neighbours.npz")
    forward = np.load(FIXTURES / "forward_scannplus_seed0.npz")
    names = [str(n) for n in nb["names"]]
    mols = []
    for label in forward["structure_names"][:count]:
        s = next(k for k, n in enumerate(names) if n.startswith(str(label)[:10]))
        a, b = nb["atom_ptr"][s], nb["atom_ptr"][s + 1]
        mols.append(Atoms(nb["Z"][a:b], nb["positions_float32_fed"][a:b].astype(np.float64)))
    return mols, forward


def test_original_weights_reproduce_the_original_forward_pass():
    """Benzene and formamide from neighbours.npz through from_original (original-mode neighbours)
    give the original's predictions and GA scores (forward_scannplus_seed0.npz)."""
    mols, forward = forward_fixture_molecules(2)
    plain = predict.Predictor.from_original(FIXTURES / "forward_scannplus_seed0.npz", num_workers=1)
    scaled = predict.Predictor.from_original(FIXTURES / "forward_scannplus_seed0.npz", mean=2.0, std=3.0,
                                             num_workers=1)
    for k, (p, q) in enumerate(zip(plain(mols), scaled(mols))):
        assert p.value == pytest.approx(float(forward["prediction"][k, 0]), abs=1e-5)
        np.testing.assert_allclose(p.ga_scores, forward["ga_score"][k, :len(mols[k]), 0], atol=1e-6)
        assert q.value == pytest.approx(3.0 * p.value + 2.0, abs=1e-5)


def test_command_line_predicts_with_original_weights(tmp_path, capsys):
    """``main.py predict --original-weights W --target-mean M --target-std S FILE`` gives the
    original's prediction (scaled) and GA scores for benzene from the fixtures."""
    import json

    import ase.io

    from scannet_jax import cli_predict

    [benzene], forward = forward_fixture_molecules(1)
    path = tmp_path / "benzene.xyz"
    ase.io.write(path, benzene)
    status = cli_predict.main([f"--original-weights={FIXTURES / 'forward_scannplus_seed0.npz'}", "--target-mean=2",
                               "--target-std=3", str(path), f"--json={tmp_path / 'out.json'}", "--num-workers=1"])
    assert status == 0
    row = json.loads((tmp_path / "out.json").read_text())["structures"][0]
    assert row["prediction"] == pytest.approx(3.0 * float(forward["prediction"][0, 0]) + 2.0, abs=1e-4)
    np.testing.assert_allclose(row["ga_scores"], forward["ga_score"][0, :len(benzene), 0], atol=1e-6)
    assert "benzene.xyz" in capsys.readouterr().out
