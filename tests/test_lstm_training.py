"""The LSTM neighbour-list model through the one trainer: the ``neighbour_list`` store (19-nearest
lists as edges, atom orders as the extra set ``atom_orders``) against `neighbor_lists`, the registered
``lstm`` network on `batching.Batch` against the host arrays of `neighbor_lists.pad_sequences`,
invariances, padding, the setting options, and a tiny training run on MP band gaps."""

from __future__ import annotations

import functools
import json

import ase
import jax
import numpy as np
import pytest
from ase.build import bulk, molecule
from scipy.spatial.transform import Rotation

from scannet_jax import batching, graphs, lstm, models, neighbor_lists as nl
from scannet_jax.datasets import featurize
from scannet_jax.structures import Structure, from_atoms

from mp_subset import train_on_mp_subset  # tests/mp_subset.py

SMALL = {"embedding_dim": 8, "atom_features": 12, "crystal_features": 10, "head_features": (8,)}


def crystals() -> list[ase.Atoms]:
    return [bulk("NaCl", "rocksalt", a=5.64), bulk("Si", "diamond", a=5.43, cubic=True),
            bulk("ZnO", "wurtzite", a=3.25, c=5.2),
            ase.Atoms("MgO2", scaled_positions=[[0, 0, 0], [0.2, 0.3, 0.4], [0.7, 0.6, 0.1]],
                      cell=np.diag([3.0, 4.0, 5.0]), pbc=True)]


def molecules() -> list[ase.Atoms]:
    water = ase.Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    return [water, molecule("CH4"), molecule("C60")]  # C60: 59 others, ties cut at the 19th place


def store_of(atoms: list[ase.Atoms], settings: str = "original"):
    return featurize.build_store([from_atoms(a) for a in atoms],
                                 featurize.graph_settings("neighbour_list", {"settings": settings}),
                                 targets={"y": np.zeros(len(atoms))}, num_workers=1, progress=False)


# One batch shape for every module test here (each new shape compiles the two LSTMs again).
BUCKET = batching.Bucket(n_node=128, n_edge=1536, n_graph=12, extras=((nl.ATOM_ORDERS, 256),))
HOST_ATOMS = 60  # atoms per structure of the host arrays (pad_sequences), for 8 structures


def padded(store, bucket: batching.Bucket = BUCKET, indices=None) -> batching.Batch:
    indices = np.arange(store.num_structures) if indices is None else np.asarray(indices)
    return batching.pad_batch(store, indices, bucket, "y")


@functools.cache
def jitted(options: tuple[tuple[str, bool], ...] = (), train: bool = False):
    net = models.build_model({"name": "lstm", **SMALL, **dict(options)})
    return jax.jit(lambda variables, batch, key: net.apply(variables, batch, train=train,
                                                           rngs={"dropout": jax.random.key(key)}))


def apply(params, batch, options: tuple[tuple[str, bool], ...] = (), train=False, key=0) -> np.ndarray:
    y, scores = jitted(options, train)(params, batch, key)
    assert scores is None
    return np.asarray(y)


@functools.cache
def host_model():
    return jax.jit(lstm.NeighbourListLSTM(**SMALL).apply)


def host_predictions(params, structures: list[ase.Atoms], axes=None) -> np.ndarray:
    """NeighbourListLSTM on the host arrays (`pad_sequences`) of the structures (in one setting each)."""
    axes = axes or [nl.IDENTITY] * len(structures)
    inputs = [nl.sequence_inputs(a.numbers, nl.neighbour_lists(a), nl.atom_order(a.positions, a.cell.array, a.pbc, p))
              for a, p in zip(structures, axes)]
    return np.asarray(host_model()({"params": params["params"]["lstm"]}, **nl.pad_sequences(inputs, HOST_ATOMS, 8)))


@pytest.fixture(scope="module")
def params(mp_run):
    """The tiny run's best parameters (every LstmConfig option has the same parameters)."""
    from scannet_jax import checkpoints

    return {"params": checkpoints.load_pretrained(mp_run[2]).params}


def test_store_edges_are_the_neighbour_lists():
    structures = crystals() + molecules()
    settings = featurize.graph_settings("neighbour_list", {})
    assert settings.key() == "nl1-k19-t0.001-original"
    store = store_of(structures)
    orders = store.extras[nl.ATOM_ORDERS]
    assert dict(orders.refers) == {"atoms": "nodes"}
    for s, atoms in enumerate(structures):
        lists = nl.neighbour_lists(atoms)
        e = slice(store.edge_ptr[s], store.edge_ptr[s + 1])
        n = len(atoms)
        np.testing.assert_array_equal(store.receivers[e], np.repeat(np.arange(n), lists.mask.sum(1)))
        np.testing.assert_array_equal(store.senders[e], lists.indices[lists.mask])
        np.testing.assert_array_equal(store.distances[e], lists.distances[lists.mask].astype(np.float32))
        np.testing.assert_array_equal(orders.fields["atoms"][orders.ptr[s]:orders.ptr[s + 1]],
                                      nl.atom_order(atoms.positions, atoms.cell.array, atoms.pbc))
    assert store.n_edge.tolist() == [2 * 19, 8 * 19, 4 * 19, 3 * 19, 3 * 2, 5 * 4, 60 * 19]
    assert (store.solid_angles == 0).all() and (store.relative_weights == 0).all()
    with pytest.raises(ValueError, match="settings must be one of"):
        featurize.graph_settings("neighbour_list", {"settings": "all"})


def test_store_path_equals_the_host_arrays(params):
    """Registered LstmNet on the padded Batch == NeighbourListLSTM on pad_sequences, same params."""
    structures = crystals() + molecules()
    ours = apply(params, padded(store_of(structures)))
    np.testing.assert_allclose(ours[:8], host_predictions(params, structures), rtol=1e-6, atol=1e-7)
    assert (ours[7:] == 0).all() and len(np.unique(ours[:7])) == 7


def test_padding_rows_and_graphs_do_not_change_predictions(params):
    store = store_of(crystals() + molecules())
    a = apply(params, padded(store))
    loose = batching.Bucket(BUCKET.n_node + 37, BUCKET.n_edge + 101, BUCKET.n_graph + 3, ((nl.ATOM_ORDERS, 301),))
    b = apply(params, padded(store, loose))
    np.testing.assert_array_equal(b[:7], a[:7])
    assert (b[7:] == 0).all()
    # a structure alone, or after others, predicts the same
    np.testing.assert_allclose(apply(params, padded(store, indices=[3]))[0], a[3], rtol=1e-6)
    np.testing.assert_allclose(apply(params, padded(store, indices=[6, 3, 0]))[:3], a[[6, 3, 0]], rtol=1e-6)


def test_invariant_to_atom_order_and_rotation(params):
    rng = np.random.default_rng(0)
    originals, moved = [], []
    for atoms in crystals() + molecules():
        shuffled = atoms[rng.permutation(len(atoms))]
        if atoms.pbc.all():  # rotation: the crystal's fractional coordinates, hence its order, are kept
            shuffled.set_cell(shuffled.cell.array @ Rotation.random(random_state=1).as_matrix().T, scale_atoms=True)
        originals.append(atoms)
        moved.append(shuffled)
    a = apply(params, padded(store_of(originals)))
    b = apply(params, padded(store_of(moved)))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_settings_augmentation_and_average(params):
    """MgO2's xz swap reorders its atoms: 'swaps' stores 4 orders, 2 of them different; augment
    draws one per step, average_settings gives their mean, each as the host path on that setting."""
    atoms = crystals()[3]
    store = store_of([atoms, crystals()[0]], "swaps")
    kept = nl.equivalent_settings(atoms.numbers, atoms.positions, atoms.cell.array)
    assert kept == [nl.IDENTITY, (1, 0, 2), (0, 2, 1), (2, 1, 0)]  # distinct settings ...
    assert store.extras[nl.ATOM_ORDERS].counts.tolist() == [4 * 3, 1 * 2]  # ... all stored; NaCl's are one
    per_setting = host_predictions(params, [atoms] * 4, kept)[:4]
    assert np.ptp(per_setting) > 1e-6  # the setting matters
    batch = padded(store)
    plain = apply(params, batch)
    np.testing.assert_allclose(plain[0], per_setting[0], rtol=1e-6)
    averaged = apply(params, batch, (("average_settings", True),))
    np.testing.assert_allclose(averaged[:2], [per_setting.mean(), plain[1]], rtol=1e-5)
    drawn = np.array([apply(params, batch, (("augment", True),), train=True, key=k)[:2] for k in range(12)])
    np.testing.assert_allclose(drawn[:, 1], plain[1], rtol=1e-6)
    nearest = np.abs(drawn[:, :1] - per_setting[None]).argmin(1)  # the setting each draw read
    np.testing.assert_allclose(drawn[:, 0], per_setting[nearest], rtol=1e-6)
    assert {0, 3} <= set(nearest)  # the xy and yz swaps keep the order (test_lstm), the xz swap does not


def test_store_is_cached_by_its_settings(tmp_path):
    structures = [from_atoms(a) for a in crystals()]
    reads = []

    def read():
        reads.append(1)
        return structures, {"y": np.arange(4.0)}

    for settings in ("original", "original", "swaps"):
        made = featurize.featurized_store("lstm_fixture", read, featurize.NeighbourListSettings(settings=settings),
                                          cache_dir=tmp_path, num_workers=1)
    assert len(reads) == 2 and made.extras[nl.ATOM_ORDERS].counts[3] == 4 * 3
    assert sorted(p.name for p in (tmp_path / "lstm_fixture").iterdir() if p.is_dir()) == [
        f"nl1-k19-t0.001-{s}-ring0-store{graphs.STORE_FORMAT_VERSION}" for s in ("original", "swaps")]


def test_registry_entry():
    spec = models.get_spec("lstm")
    assert spec.node_scores is None and spec.num_elements(spec.default_config()) == 95
    assert spec.default_config() == {"max_atomic_number": 94, "embedding_dim": 32, "atom_features": 64,
                                     "crystal_features": 64, "head_features": [64], "centre_factor": 1.0,
                                     "num_neighbours": 19, "augment": False, "average_settings": False}
    assert float(spec.regularizer({}, 1.0)) == 0.0
    with pytest.raises(ValueError, match="unknown key"):
        models.build_model({"name": "lstm", "hidden": 3})


@pytest.fixture(scope="module")
def mp_run(tmp_path_factory):
    from scannet_jax.configs import mp as mp_config

    config = mp_config.get_config("gap,tiny,lstm,augment")
    assert config.model.to_dict() == {**models.default_model_config("lstm").to_dict(), **SMALL,
                                      "head_features": list(SMALL["head_features"]), "augment": True}
    config.optimizer.update(lr=3e-3, min_lr=3e-3)  # 40 crystals, 5 epochs: a faster constant rate
    config.num_epochs = 5
    config.batch_size = 8
    config.eval_batch_size = 8
    workdir = tmp_path_factory.mktemp("mp_lstm")
    data, results = train_on_mp_subset(config, workdir)
    return config, data, workdir, results


def test_tiny_lstm_trains_on_mp_band_gaps(mp_run):
    config, data, workdir, results = mp_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val_mae" in r]
    assert len(epochs) == config.num_epochs
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert results["num_structures"] == {"train": 24, "validation": 8, "test": 8}
    for split in ("train", "validation", "test"):
        assert np.isfinite(results["mae"][split]) and np.isfinite(results["rmse"][split])
    assert results["compile_counts"]["train"] == 1
    assert data.store.extras[nl.ATOM_ORDERS].counts.sum() > data.store.n_node.sum()  # several settings stored


def test_lstm_best_checkpoint_restores(mp_run):
    """best/ reproduces the reported test MAE through steps.model_outputs (the run's augment=True
    network is the plain one in inference, so the plain jitted apply serves)."""
    from scannet_jax import checkpoints, steps

    config, data, workdir, results = mp_run
    assert config.model.augment and not config.model.average_settings
    pretrained = checkpoints.load_pretrained(workdir)
    batch = batching.pad_batch(data.store, data.indices("test"), BUCKET, data.target)
    predictions, _ = steps.model_outputs(lambda v, b, train: jitted((), train)(v, b, 0),
                                         {"params": pretrained.params, **pretrained.model_state}, batch,
                                         pretrained.scaler["mean"], pretrained.scaler["std"])
    predictions = np.asarray(predictions)[:8]
    targets = data.store.targets[data.target][data.indices("test")]
    assert np.abs(predictions - targets).mean() == pytest.approx(results["mae"]["test"], rel=1e-4, abs=1e-6)


def test_one_atom_molecule_and_crystal(params):
    """A lone atom has no neighbours (an empty list ends the first LSTM at the centre); a 1-atom
    crystal lists 19 of its own images."""
    store = featurize.build_store([Structure(np.array([8]), np.zeros((1, 3))), from_atoms(bulk("Cu", "fcc", a=3.6))],
                                  featurize.NeighbourListSettings(), targets={"y": [0.0, 0.0]}, num_workers=1,
                                  progress=False)
    assert store.n_edge.tolist() == [0, 19] and (store.senders == 0).all()
    np.testing.assert_allclose(store.distances[:12], 3.6 / np.sqrt(2), rtol=1e-6)  # 12 nearest, then 6 at a
    y = apply(params, padded(store))
    assert np.isfinite(y).all() and y[0] != 0


def test_predictor_averages_over_swapped_settings(mp_run):
    """Predictor(average_settings=True) gives the mean of the plain predictions of the crystal
    written in each of its distinct axis-swapped settings (same atoms, cell rows permuted)."""
    from scannet_jax import predict

    config, data, workdir, results = mp_run
    plain = predict.Predictor.from_workdir(workdir, num_workers=1)
    averaged = predict.Predictor.from_workdir(workdir, num_workers=1, average_settings=True)
    crystal = ase.Atoms("LiMgAlO", scaled_positions=[[0.1, 0.2, 0.3], [0.55, 0.1, 0.7], [0.3, 0.6, 0.05],
                                                     [0.8, 0.75, 0.45]],
                        cell=[[3.1, 0.0, 0.0], [0.4, 3.7, 0.0], [0.3, 0.2, 4.4]], pbc=True)
    perms = nl.equivalent_settings(crystal.numbers, crystal.positions, np.asarray(crystal.cell))
    assert len(perms) == 4  # a triclinic cell: every swap is a different setting
    values = [plain(ase.Atoms(crystal.numbers, crystal.positions, cell=np.asarray(crystal.cell)[list(p)], pbc=True),
                    allow_unseen_elements=True).value for p in perms]
    assert len(set(np.round(values, 6))) > 1  # the network depends on the setting
    mean = averaged(crystal, allow_unseen_elements=True).value
    assert mean == pytest.approx(np.mean(values), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="the scannplus network has no crystal settings to average over"):
        predict.Predictor.pretrained("scannplus-mp-gap", average_settings=True)
