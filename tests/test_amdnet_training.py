"""MEGNet and AMDNet through the one trainer: the ``radius`` and ``motif_dual`` stores against
`radius_graph` and `motifs`, per-structure refusals of non-oxides, the registered ``megnet`` and
``amdnet`` networks on padded batches, and a tiny AMDNet training run on MP oxides' band gaps."""

from __future__ import annotations

import functools
import json
import logging

import jax
import ml_collections
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.spacegroup import crystal

from scannet_jax import batching, megnet, models, motifs
from scannet_jax.datasets import featurize
from scannet_jax.radius_graph import radius_neighbors
from scannet_jax.structures import from_atoms, to_atoms

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pymatgen's oxidation-state guesses

NUM_MP = 20  # smallest MP band-gap oxides of the training run: 12 train, 4 validation, 4 test
# A narrow AMDNet (same operations, faster to compile).
SMALL = {"num_blocks": 1, "n1": 16, "n2": 8, "n3": 4, "num_steps": 2}
SMALL_AMDNET = {**SMALL, "num_output_embedding": 4, "num_last_layer": 8}


def oxides() -> list[Atoms]:
    rutile = crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3048, 0.3048, 0)], spacegroup=136,
                     cellpar=[4.594, 4.594, 2.959, 90, 90, 90])
    perovskite = crystal(["Sr", "Ti", "O"], basis=[(0.5, 0.5, 0.5), (0, 0, 0), (0.5, 0, 0)],
                         spacegroup=221, cellpar=[3.905] * 3 + [90] * 3)
    return [bulk("MgO", "rocksalt", a=4.21), rutile, perovskite]


@functools.cache
def dual_store():
    structures = oxides()
    return featurize.build_store([from_atoms(a) for a in structures], featurize.graph_settings("motif_dual", {}),
                                 targets={"y": np.arange(len(structures), dtype=float)}, num_workers=1,
                                 progress=False)


def _rows(extra, s: int) -> dict[str, np.ndarray]:
    return {k: v[extra.ptr[s]:extra.ptr[s + 1]] for k, v in extra.fields.items()}


def test_motif_dual_store_holds_the_atom_and_motif_graphs():
    store = dual_store()
    assert featurize.graph_settings("motif_dual", {}).key() == "motifdual1-d5"
    assert featurize.graph_settings("radius", {"cutoff": 4.0}).key() == "radius1-d4"
    assert {k: dict(v.refers) for k, v in store.extras.items()} == {
        "motifs": {"centers": "nodes"}, "motif_edges": {"senders": "motifs", "receivers": "motifs"}}
    radius = featurize.build_store([from_atoms(a) for a in oxides()], featurize.RadiusSettings(),
                                   num_workers=1, progress=False)
    assert not radius.extras
    for s, atoms in enumerate(oxides()):
        nb, graph = radius_neighbors(atoms, cutoff=5.0), motifs.motif_graph(atoms)
        e = slice(store.edge_ptr[s], store.edge_ptr[s + 1])
        for built in (store, radius):
            np.testing.assert_array_equal(built.receivers[e], nb.receivers)
            np.testing.assert_array_equal(built.senders[e], nb.senders)
            np.testing.assert_array_equal(built.distances[e], nb.distances.astype(np.float32))
        rows = _rows(store.extras["motifs"], s)
        np.testing.assert_array_equal(rows["centers"], graph.centers)
        np.testing.assert_array_equal(rows["features"], graph.features.astype(np.float32))
        assert [motifs.ENVIRONMENTS[k] for k in rows["environments"]] == graph.environments.tolist()
        edges = _rows(store.extras["motif_edges"], s)
        np.testing.assert_array_equal(edges["receivers"], graph.receivers)
        np.testing.assert_array_equal(edges["senders"], graph.senders)
        np.testing.assert_array_equal(edges["distances"], graph.distances.astype(np.float32))
        np.testing.assert_array_equal(edges["sharing"], graph.sharing)
    # MgO: one octahedron (Mg, site 0); TiO2: two; SrTiO3: Sr cuboctahedron and Ti octahedron.
    envs = store.extras["motifs"].fields["environments"]
    assert [motifs.ENVIRONMENTS[k] for k in envs] == ["O:6", "O:6", "O:6", "C:12", "O:6"]
    # The released generator's bug would leave self-loops only; here every edge joins real neighbours.
    sharing = store.extras["motif_edges"].fields["sharing"]
    assert (sharing != motifs.SELF_LOOP).all() and store.extras["motif_edges"].counts.tolist() == [18, 20, 40]
    assert store.extras["motifs"].fields["features"].shape == (5, motifs.FINGERPRINT_DIM)


def test_non_oxide_is_a_per_structure_error(tmp_path):
    settings = featurize.MotifDualSettings()
    structures = [from_atoms(bulk("Si", "diamond", a=5.43)), from_atoms(oxides()[0]),
                  from_atoms(bulk("NaCl", "rocksalt", a=5.64))]
    with featurize.Featurizer(settings, num_workers=1) as featurizer:
        results = list(featurizer.map(structures))
    assert isinstance(results[1], featurize.Featurized) and results[1].extras["motifs"]["centers"].tolist() == [0]
    for k, formula in ((0, "Si2"), (2, "ClNa")):
        assert isinstance(results[k], featurize.FeaturizationError) and results[k].position == k
        assert results[k].kind == "MotifError"
        assert str(results[k]) == f"structure {k}: MotifError: {formula}: not an oxide (no O atom in {formula})"
    with pytest.raises(featurize.FeaturizationError, match=r"^crystal 0 \(Si\): MotifError: Si2: not an oxide"):
        featurize.featurized_store("non_oxide", lambda: (structures[:1], {"y": [0.0]}), settings,
                                   cache_dir=tmp_path, num_workers=1, describe=lambda k: f"crystal {k} (Si)")



def test_training_stores_skip_and_count_structures_without_motifs(tmp_path, caplog):
    from scannet_jax.datasets import mp

    settings = featurize.MotifDualSettings()
    structures = [from_atoms(bulk("Si", "diamond", a=5.43)), from_atoms(oxides()[0]),
                  from_atoms(bulk("NaCl", "rocksalt", a=5.64))]

    def load():
        return featurize.featurized_store("mixed", lambda: (structures, {"y": [1.0, 2.0, 3.0]}), settings,
                                          cache_dir=tmp_path, num_workers=1, describe=lambda k: f"crystal {k}",
                                          skip=mp.SKIPPED_ERRORS)

    with caplog.at_level(logging.WARNING):
        store = load()
    assert len(store) == 1 and store.index.tolist() == [1] and store.targets["y"].tolist() == [2.0]
    assert store.metadata["skipped"] == {"0": "MotifError: Si2: not an oxide (no O atom in Si2)",
                                         "2": "MotifError: ClNa: not an oxide (no O atom in ClNa)"}
    assert "crystal 2 skipped: MotifError: ClNa: not an oxide" in caplog.text
    assert "2 of 3 structures skipped (MotifError)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = load()  # from the cache: the same rows, and the skipped ones said again
    assert again.index.tolist() == [1]
    assert "mixed: 2 structures left out when the feature cache was built" in caplog.text
    splits = mp.rows_of_kept({"train": np.array([0, 1]), "test": np.array([2])}, again.index, 3)
    assert {k: v.tolist() for k, v in splits.items()} == {"train": [0], "test": []}


@functools.cache
def amdnet_apply():
    """The registered tiny AMDNet's apply, jitted once (the run's and the padding tests' network)."""
    return jax.jit(models.build_model({"name": "amdnet", **SMALL_AMDNET}).apply)


def shared_bucket(*batches: tuple[object, np.ndarray]) -> batching.Bucket:
    """One bucket fitting every (store, indices) given, so the tests share one compiled shape."""
    buckets = [batching.worst_case_bucket(store, indices, len(indices), round_to=1) for store, indices in batches]
    return batching.Bucket(max(b.n_node for b in buckets), max(b.n_edge for b in buckets),
                           max(b.n_graph for b in buckets),
                           tuple((name, max(dict(b.extras)[name] for b in buckets)) for name, _ in buckets[0].extras))


@pytest.fixture(scope="module")
def bucket(mp_run):
    return shared_bucket((dual_store(), np.arange(3)), (mp_run[1].store, mp_run[1].indices("test")))


@pytest.fixture(scope="module")
def params(mp_run):
    from scannet_jax import checkpoints

    return {"params": checkpoints.load_pretrained(mp_run[2]).params}


def test_amdnet_ignores_padding(params, bucket):
    store, apply = dual_store(), amdnet_apply()
    loose = batching.Bucket(bucket.n_node + 7, bucket.n_edge + 31, bucket.n_graph + 2,
                            tuple((name, rows + 5) for name, rows in bucket.extras))
    batch = batching.pad_batch(store, np.arange(3), bucket, "y")
    a, scores = apply(params, batch)
    a = np.asarray(a)
    b = np.asarray(apply(params, batching.pad_batch(store, np.arange(3), loose, "y"))[0])
    assert scores is None and a.shape == (bucket.n_graph,)
    np.testing.assert_allclose(b[:3], a[:3], rtol=1e-5, atol=1e-6)
    assert (a[3:] == 0).all() and (b[3:] == 0).all() and len(np.unique(a[:3])) == 3
    alone = np.asarray(apply(params, batching.pad_batch(store, np.array([2, 0]), loose, "y"))[0])
    np.testing.assert_allclose(alone[:2], a[[2, 0]], rtol=1e-5, atol=1e-6)
    # The motif branch reads the motif graph: other motif features change the predictions.
    motif_rows = batch.extras["motifs"]
    moved = batch._replace(extras={**batch.extras, "motifs": motif_rows._replace(
        fields={**motif_rows.fields, "features": motif_rows.fields["features"] + 0.5})})
    assert np.abs(np.asarray(apply(params, moved)[0])[:3] - a[:3]).min() > 0


def test_megnet_on_the_radius_store_ignores_padding():
    radius = featurize.build_store([from_atoms(x) for x in oxides()], featurize.RadiusSettings(),
                                   targets={"y": np.zeros(3)}, num_workers=1, progress=False)
    net = models.build_model({"name": "megnet", **SMALL})
    tight = batching.Bucket(int(radius.n_node.sum()) + 1, int(radius.n_edge.sum()), 4)
    graphs = batching.pad_batch(radius, np.arange(3), tight, "y")
    shapes = jax.eval_shape(net.init, jax.random.key(0), graphs)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    apply = jax.jit(net.apply)
    c = np.asarray(apply(variables, graphs)[0])
    wide = batching.pad_batch(radius, np.arange(3), tight._replace(n_node=tight.n_node + 9, n_edge=tight.n_edge + 40,
                                                                  n_graph=7), "y")
    np.testing.assert_allclose(np.asarray(apply(variables, wide)[0])[:3], c[:3], rtol=1e-5, atol=1e-6)
    assert c[3] == 0 and len(np.unique(c[:3])) == 3


def test_registry_entries():
    assert models.default_model_config("amdnet").to_dict() == {
        "name": "amdnet", "num_species": 95, "embedding_dim": 16, "atom_cutoff": 5.0, "motif_cutoff": 11.0,
        "num_gaussians_atom": 100, "num_gaussians_motif": 100, "num_blocks": 3, "n1": 64, "n2": 32, "n3": 16,
        "num_steps": 3, "num_output_embedding": 16, "num_last_layer": 32, "activation": "relu"}
    spec = models.get_spec("megnet")
    assert spec.node_scores is None and spec.num_elements(spec.default_config()) == 95
    assert spec.default_config()["cutoff"] == 5.0 and float(spec.regularizer({}, 1.0)) == 0.0
    net = models.build_model({"name": "megnet"})
    assert isinstance(net, megnet.MegnetNet) and net.network == megnet.MEGNet()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['motif_cutoff'\]"):
        models.build_model({"name": "megnet", "motif_cutoff": 3.0})


def test_released_recipe_reloads_on_divergence_and_clips_band_gaps_only():
    from scannet_jax.configs import mp as mp_config

    for arg, floor in (("gap,amdnet", 0.0), ("gap,megnet", 0.0), ("e_form,amdnet", None), ("e_form,megnet", None)):
        config = mp_config.get_config(arg)
        assert (config.optimizer.on_divergence, config.prediction_floor) == ("reload_best", floor), arg
        assert config.data.oxides_only == arg.endswith("amdnet"), arg
    scannplus = mp_config.get_config("gap")
    assert (scannplus.optimizer.on_divergence, scannplus.prediction_floor) == ("skip", None)


@pytest.fixture(scope="module")
def mp_run(tmp_path_factory):
    from scannet_jax import train
    from scannet_jax.configs import mp as mp_config
    from scannet_jax.datasets import mp, splits

    config = mp_config.get_config("gap,tiny")
    config.data.graph_builder = "motif_dual"
    config.data.featurizer = ml_collections.ConfigDict({"cutoff": 5.0})
    config.model = models.default_model_config("amdnet")
    config.model.update(SMALL_AMDNET)
    config.loss = "mse"
    config.optimizer.update(lr=1e-2, min_lr=1e-2, schedule="constant", legacy_decay=0.0, eps=1e-7, l2=0.0)
    config.num_epochs = 8
    config.batch_size, config.eval_batch_size = 4, 8  # 3 steps an epoch
    config.num_buckets = 1
    config.checkpoint_every_steps = 0
    atoms, _ = mp.read("gap")
    smallest = sorted((a for a in atoms if "O" in a.symbols and set(a.symbols) != {"O"}), key=len)[:NUM_MP]
    settings = featurize.graph_settings(config.data.graph_builder, config.data.featurizer.to_dict())
    target = config.data.target
    store = featurize.build_store([from_atoms(a) for a in smallest], settings,
                                  targets={target: [a.info[target] for a in smallest]}, num_workers=1,
                                  progress=False)
    order = np.random.default_rng(0).permutation(NUM_MP)
    split = {"train": np.sort(order[:12]), "validation": np.sort(order[12:16]), "test": np.sort(order[16:])}
    data = splits.make_datasets(store, split, target, config.data.standardize)
    workdir = tmp_path_factory.mktemp("mp_amdnet")
    results = train.train_and_evaluate(config, str(workdir), data=data)
    return config, data, workdir, results


def test_tiny_amdnet_trains_on_mp_oxide_band_gaps(mp_run):
    config, data, workdir, results = mp_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val_mae" in r]
    assert len(epochs) == config.num_epochs
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert results["num_structures"] == {"train": 12, "validation": 4, "test": 4}
    for split in ("train", "validation", "test"):
        assert np.isfinite(results["mae"][split])
    assert results["compile_counts"]["train"] == 1
    assert data.store.extras["motifs"].counts.min() >= 1


def test_amdnet_best_checkpoint_restores(mp_run, bucket):
    """best/ reproduces the reported test MAE through steps.model_outputs."""
    from scannet_jax import checkpoints, steps

    config, data, workdir, results = mp_run
    assert config.model.to_dict() == {**models.default_model_config("amdnet").to_dict(), **SMALL_AMDNET}
    pretrained = checkpoints.load_pretrained(workdir)
    indices = data.indices("test")
    batch = batching.pad_batch(data.store, indices, bucket, data.target)
    predictions, _ = steps.model_outputs(lambda v, b, train: amdnet_apply()(v, b),
                                         {"params": pretrained.params, **pretrained.model_state},
                                         batch, pretrained.scaler["mean"], pretrained.scaler["std"])
    targets = data.store.targets[data.target][indices]
    mae = np.abs(np.asarray(predictions)[:len(indices)] - targets).mean()
    assert mae == pytest.approx(results["mae"]["test"], rel=1e-4, abs=1e-6)


def test_megnet_trains_on_qm9_molecules_and_predicts_them(tmp_path):
    """``configs/qm9.py:homo,megnet``: the released recipe on the molecules' radius graphs; the
    trained model, through `Predictor`, reproduces the run's test MAE and does not change under a
    rotation and reordering of each molecule's atoms."""
    from scipy.spatial.transform import Rotation

    from scannet_jax import train
    from scannet_jax.configs import qm9 as qm9_config
    from scannet_jax.datasets import qm9
    from scannet_jax.predict import Predictor

    full = qm9_config.get_config("homo,megnet")
    assert (full.data.graph_builder, full.model.name, full.loss, full.batch_size) == ("radius", "megnet", "mse", 32)
    assert (full.data.molecules, full.data.standardize, full.prediction_floor) == (True, True, None)
    assert (full.optimizer.name, full.optimizer.lr, full.optimizer.on_divergence) == ("adam", 5e-5, "reload_best")
    config = qm9_config.get_config("homo,tiny,megnet,limit=60")
    config.num_epochs, config.num_buckets, config.checkpoint_every_steps = 2, 1, 0
    config.data.data_dir, config.data.num_workers = str(tmp_path / "cache"), 1
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["num_structures"] == {"train": 48, "validation": 6, "test": 6}

    molecules = qm9.read_qm9(limit=60)
    test = qm9.split_indices(molecules.n_atoms, config.split_seed)["test"]
    atoms = [to_atoms(molecules.structure(s)) for s in test]
    rng = np.random.default_rng(1)
    moved = []
    for a in atoms:
        b = a[rng.permutation(len(a))]
        b.positions = b.positions @ Rotation.random(random_state=rng).as_matrix().T
        moved.append(b)
    predictor = Predictor.from_workdir(tmp_path / "run", num_workers=1)
    try:
        values = np.array([p.value for p in predictor.predict_each(atoms)])
        again = np.array([p.value for p in predictor.predict_each(moved)])
    finally:
        predictor.close()
    assert np.mean(np.abs(values - molecules.targets["homo"][test])) == pytest.approx(results["test_mae"], abs=1e-5)
    np.testing.assert_allclose(again, values, atol=1e-4)
