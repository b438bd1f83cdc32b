"""Tests for the QM9 reader and split, featurisation, the keyed cache and the tfds builder."""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from scannet_jax import datasets, graphs
from scannet_jax.datasets import featurize, qm9
from scannet_jax.graphs import GraphStore
from scannet_jax.structures import molecule

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "original"


@pytest.fixture(scope="module")
def first200() -> qm9.Qm9Molecules:
    return qm9.read_qm9(limit=200)


def test_read_slice_counts_and_units(first200):
    mol = first200
    assert len(mol) == 200 and mol.gdb_index[:3].tolist() == [1, 2, 3]
    assert mol.n_atoms[:3].tolist() == [5, 4, 3]  # CH4, NH3, H2O
    assert mol.numbers[:5].tolist() == [6, 1, 1, 1, 1]
    np.testing.assert_allclose(mol.positions[1], [0.002150416, -0.0060313176, 0.0019761204])
    np.testing.assert_allclose(mol.targets["homo"][0], -0.3877 * 27.211386)  # eV
    np.testing.assert_allclose(mol.targets["gap"][0], 0.5048 * 27.211386)
    np.testing.assert_allclose(mol.targets["alpha"][0], 13.21)  # bohr³
    np.testing.assert_allclose(mol.targets["cv"][0], 6.469)  # cal/(mol K)
    np.testing.assert_allclose(mol.targets["u0"][0], -40.47893 * 27.211386)
    assert set(mol.targets) == {"homo", "lumo", "gap", "alpha", "cv", "mu", "zpve", "u0", "r2"}
    assert mol.positions.shape == (mol.atom_ptr[-1], 3)
    s = mol.structure(2)
    assert s.numbers.tolist() == [8, 1, 1] and not s.periodic and not s.cell.any()


def test_read_full_dataset_count_and_unique_index():
    mol = qm9.read_qm9()
    assert len(mol) == qm9.NUM_MOLECULES == 130_831
    assert np.unique(mol.gdb_index).size == len(mol) and (np.diff(mol.gdb_index) > 0).all()
    assert mol.atom_ptr[-1] == mol.positions.shape[0] and mol.n_atoms.max() == 29
    assert set(np.unique(mol.numbers).tolist()) == {1, 6, 7, 8, 9}
    assert qm9.DOMAIN.elements == {1, 6, 7, 8, 9} and qm9.DOMAIN.max_atoms == mol.n_atoms.max()
    assert all(np.isfinite(v).all() for v in mol.targets.values())


def test_split_sizes_determinism_and_reference_recipe():
    n_atoms = np.random.default_rng(3).integers(3, 30, qm9.NUM_MOLECULES)
    splits = qm9.split_indices(n_atoms, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 110_000, "validation": 10_000, "test": 10_831}
    assert np.array_equal(np.sort(np.concatenate(list(splits.values()))), np.arange(qm9.NUM_MOLECULES))
    again = qm9.split_indices(n_atoms, seed=0)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    assert not np.array_equal(qm9.split_indices(n_atoms, seed=1)["train"], splits["train"])
    # The reference recipe literally: sort by atom count, seed the global legacy RNG, permute.
    state = np.random.get_state()
    try:
        np.random.seed(0)
        order = np.argsort(n_atoms, kind="stable")[np.random.permutation(qm9.NUM_MOLECULES)]
    finally:
        np.random.set_state(state)
    assert np.array_equal(np.concatenate([splits["train"], splits["validation"], splits["test"]]), order)


def test_split_of_a_slice_is_80_10_10():
    splits = qm9.split_indices(np.arange(200) % 7 + 3, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 160, "validation": 20, "test": 20}


def test_ring_flags_match_open_babel_fixture():
    nb = np.load(FIXTURES / "neighbours.npz")
    fwd = np.load(FIXTURES / "forward_scannplus_ring_seed0.npz")
    names = list(nb["names"])
    for j, name in enumerate(fwd["structure_names"]):
        k = names.index(name)
        a, b = nb["atom_ptr"][k], nb["atom_ptr"][k + 1]
        flags = featurize.ring_aromatic_flags(nb["Z"][a:b], nb["positions"][a:b])
        np.testing.assert_array_equal(flags, fwd["input/ring_aromatic"][j, :b - a], err_msg=str(name))


def test_ring_flags_on_heteroaromatics():
    nb = np.load(FIXTURES / "neighbours.npz")
    names = list(nb["names"])

    def flags(name):
        k = names.index(name)
        a, b = nb["atom_ptr"][k], nb["atom_ptr"][k + 1]
        return featurize.ring_aromatic_flags(nb["Z"][a:b], nb["positions"][a:b]).astype(int).T.tolist()

    assert flags("qm9_000050_N1C=CC=C1") == [[1] * 5 + [0] * 5, [1] * 5 + [0] * 5]  # pyrrole
    # a furan fused to a non-aromatic 6-ring (sp3 C-OH): only the furan atoms are aromatic
    assert flags("qm9_030033_OC1C=CC2=COC=C12") == [[0] + [1] * 8 + [0] * 6, [0] * 4 + [1] * 5 + [0] * 6]
    assert flags("qm9_013230_C#CCCC1CCC1")[1] == [0] * 20  # cyclobutane: ring, not aromatic


def test_featurize_errors_name_the_structure(monkeypatch):
    def fail_on_oxygen(structure, settings, ring):
        if 8 in structure.numbers:
            raise ValueError("no Voronoi cell")
        return None

    monkeypatch.setattr(featurize, "featurize_one", fail_on_oxygen)
    structures = [molecule(np.array([z, 1]), np.array([[0.0, 0, 0], [0, 0, 1.0]])) for z in (6, 7, 8)]
    with pytest.raises(featurize.FeaturizationError, match="structure 2: ValueError: no Voronoi cell"):
        list(featurize.featurize_structures(structures, None, num_workers=1, progress=False))


def test_cache_path_is_keyed(tmp_path):
    class Settings:
        def __init__(self, key):
            self._key = key

        def key(self):
            return self._key

    a = featurize.cache_path(tmp_path, "qm9", Settings("exact-v1"), ring=False)
    assert a == tmp_path / "qm9" / f"exact-v1-ring0-store{graphs.STORE_FORMAT_VERSION}"
    assert a != featurize.cache_path(tmp_path, "qm9", Settings("exact-v1"), ring=True)
    assert a != featurize.cache_path(tmp_path, "qm9", Settings("exact-v2"), ring=False)
    assert a != featurize.cache_path(tmp_path, "md", Settings("exact-v1"), ring=False)


def test_cached_store_round_trip_and_rebuild(tmp_path, caplog, monkeypatch):
    from test_graphs import random_store

    store = random_store()[0]
    builds = []

    def build():
        builds.append(1)
        return store

    meta = {"dataset": "toy", "featurizer": "k1", "ring": True}
    path = tmp_path / "key" / "graphs"
    first = featurize.cached_store(path, build, metadata=meta, invalidate=tmp_path / "key")
    second = featurize.cached_store(path, build, metadata=meta, invalidate=tmp_path / "key")
    assert len(builds) == 1 and np.array_equal(second.distances, first.distances)
    (tmp_path / "key" / "tfds_leftover").mkdir()
    victim = path / "senders.npy"
    victim.write_bytes(victim.read_bytes()[:-8])  # truncated file
    with caplog.at_level(logging.WARNING):
        rebuilt = featurize.cached_store(path, build, metadata=meta, invalidate=tmp_path / "key")
    assert len(builds) == 2 and "unusable and will be rebuilt" in caplog.text and "senders.npy" in caplog.text
    assert not (tmp_path / "key" / "tfds_leftover").exists()  # the whole keyed directory was dropped
    np.testing.assert_array_equal(rebuilt.senders, store.senders)
    featurize.cached_store(path, build, metadata={**meta, "featurizer": "k2"})  # made differently
    assert len(builds) == 3
    GraphStore.load(path, expect={**meta, "featurizer": "k2"})
    monkeypatch.setattr(graphs, "STORE_FORMAT_VERSION", graphs.STORE_FORMAT_VERSION + 1)  # new store format
    featurize.cached_store(path, build, metadata={**meta, "featurizer": "k2"})
    assert len(builds) == 4


def _build_cache_slowly(args: tuple[str, str]) -> int:
    """Worker of the test below: builds the toy cache, logging each build call to a file."""
    import time

    from test_graphs import random_store

    path, log_file = args

    def build():
        with open(log_file, "a") as f:
            f.write("built\n")
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        return random_store()[0]

    store = featurize.cached_store(Path(path) / "key" / "graphs", build, metadata={"dataset": "toy"},
                                   invalidate=Path(path) / "key")
    return len(store)


def test_concurrent_processes_build_the_cache_once(tmp_path):
    import multiprocessing

    log_file = tmp_path / "builds.txt"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        sizes = pool.map(_build_cache_slowly, [(str(tmp_path), str(log_file))] * 2, chunksize=1)
    assert log_file.read_text() == "built\n"
    assert sizes[0] == sizes[1] > 0


@pytest.fixture(scope="module")
def settings():
    from scannet_jax.neighbors import FeaturizerSettings

    return FeaturizerSettings()


def test_tfds_builder_round_trip_without_tensorflow(tmp_path, settings, first200):
    import grain

    from scannet_jax.datasets import qm9_tfds

    source = qm9_tfds.open_data_source(tmp_path, settings, ring=True, limit=40, num_workers=1)
    assert len(source) == 40
    records = list(grain.MapDataset.source(source))
    order = [int(r["index"]) for r in records]
    assert sorted(order) == list(range(40)) and order != list(range(40))  # tfds shuffles records
    for r in records:
        s = int(r["index"])
        assert r["gdb_index"] == first200.gdb_index[s]
        np.testing.assert_array_equal(r["atomic_numbers"], first200.structure(s).numbers)
        assert r["targets"]["homo"] == first200.targets["homo"][s]  # float64, bit for bit
        want = featurize.featurize_one(first200.structure(s), settings, ring=True)
        np.testing.assert_array_equal(r["senders"], want.senders)
        np.testing.assert_array_equal(r["receivers"], want.receivers)
        np.testing.assert_array_equal(r["solid_angles"], want.solid_angles)
        np.testing.assert_array_equal(r["ring_aromatic"], want.ring_aromatic)
    store = qm9_tfds.store_from_source(source, ring=True, expected=40)
    np.testing.assert_array_equal(store.index, np.arange(40))
    np.testing.assert_array_equal(store.n_node, first200.n_atoms[:40])
    assert "tensorflow" not in sys.modules


def test_load_qm9_builds_once_then_loads_the_cache(tmp_path, settings):
    import time

    store, splits = datasets.load("qm9", featurizer=settings, source=datasets.Source(limit=100), cache_dir=tmp_path, num_workers=2)
    assert len(store) == 100 and {k: len(v) for k, v in splits.items()} == {"train": 80, "validation": 10,
                                                                         "test": 10}
    keyed = featurize.cache_path(tmp_path, "qm9-first100", settings, ring=False)
    assert (keyed / "graphs" / "manifest.json").exists() and (keyed / "tfds").is_dir()
    start = time.perf_counter()
    again, splits_again = datasets.load("qm9", featurizer=settings, source=datasets.Source(limit=100), cache_dir=tmp_path)
    assert time.perf_counter() - start < 5
    np.testing.assert_array_equal(again.distances, store.distances)
    assert all(np.array_equal(splits[k], splits_again[k]) for k in splits)
    # parallel featurisation (2 spawned workers) equals in-process featurisation
    molecules = qm9.read_qm9(limit=100)
    inline = [featurize.featurize_one(molecules.structure(s), settings, ring=False) for s in (0, 57, 99)]
    for s, want in zip((0, 57, 99), inline):
        g = store.graph(s)
        np.testing.assert_array_equal(g.senders, want.senders)
        np.testing.assert_array_equal(g.edges["distances"], want.distances)


def test_build_store_packs_featurized_structures(settings, first200):
    structures = [first200.structure(s) for s in (7, 3, 150)]
    store = featurize.build_store(structures, settings, targets={"gap": [1.0, np.nan, 3.0]}, index=[7, 3, 150],
                                  ring=True, num_workers=1, progress=False)
    assert store.index.tolist() == [7, 3, 150] and np.isnan(store.targets["gap"][1])
    for k, structure in enumerate(structures):
        want = featurize.featurize_one(structure, settings, ring=True)
        g = store.graph(k)
        np.testing.assert_array_equal(g.nodes["atomic_numbers"], structure.numbers)
        np.testing.assert_array_equal(g.receivers, want.receivers)
        np.testing.assert_array_equal(g.edges["relative_weights"], want.weights)
        np.testing.assert_array_equal(g.nodes["ring_aromatic"], want.ring_aromatic)
