"""Tests for the QM9 reader and split, featurisation, and the keyed store cache every data set
goes through (`featurize.featurized_store`)."""

import logging
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
    (tmp_path / "key" / "leftover").mkdir()
    victim = path / "senders.npy"
    victim.write_bytes(victim.read_bytes()[:-8])  # truncated file
    with caplog.at_level(logging.WARNING):
        rebuilt = featurize.cached_store(path, build, metadata=meta, invalidate=tmp_path / "key")
    assert len(builds) == 2 and "unusable and will be rebuilt" in caplog.text and "senders.npy" in caplog.text
    assert not (tmp_path / "key" / "leftover").exists()  # the whole keyed directory was dropped
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


STORE_ARRAYS = ("atomic_numbers", "node_ptr", "edge_ptr", "senders", "receivers", "distances", "solid_angles",
                "relative_weights", "index", "ring_aromatic")


def _assert_same_store(got: GraphStore, want: GraphStore) -> None:
    for name in STORE_ARRAYS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert set(got.targets) == set(want.targets)
    for name, values in want.targets.items():
        np.testing.assert_array_equal(got.targets[name], values, err_msg=name)


def _counting(monkeypatch) -> list[int]:
    """Counts `qm9.read_qm9` calls (one per store built: the cache path reads the CSVs only to build)."""
    calls, read = [], qm9.read_qm9

    def counted(limit=None):
        calls.append(limit)
        return read(limit)

    monkeypatch.setattr(qm9, "read_qm9", counted)
    return calls


def test_load_qm9_featurizes_into_the_store_once(tmp_path, settings, monkeypatch):
    import sys

    molecules = qm9.read_qm9(limit=100)
    calls = _counting(monkeypatch)
    store, splits = datasets.load("qm9", featurizer=settings, source=datasets.Source(limit=100), cache_dir=tmp_path,
                                  ring=True, num_workers=2)
    assert calls == [100] and len(store) == 100
    assert {k: len(v) for k, v in splits.items()} == {"train": 80, "validation": 10, "test": 10}
    assert all(np.array_equal(splits[k], v) for k, v in qm9.split_indices(store.n_node, seed=0).items())
    # Content: the molecules in dataset order, targets bit for bit, and (2 spawned workers) the
    # same edges and ring flags as featurising each molecule in this process.
    np.testing.assert_array_equal(store.index, np.arange(100))
    np.testing.assert_array_equal(store.n_node, molecules.n_atoms)
    np.testing.assert_array_equal(store.atomic_numbers, molecules.numbers)
    assert set(store.targets) == set(qm9.TARGET_COLUMNS)
    for name, values in molecules.targets.items():
        assert store.targets[name].dtype == np.float64 and np.array_equal(store.targets[name], values)
    for s in range(100):
        want = featurize.featurize_one(molecules.structure(s), settings, ring=True)
        g = store.graph(s)
        np.testing.assert_array_equal(g.senders, want.senders)
        np.testing.assert_array_equal(g.receivers, want.receivers)
        np.testing.assert_array_equal(g.edges["distances"], want.distances)
        np.testing.assert_array_equal(g.edges["solid_angles"], want.solid_angles)
        np.testing.assert_array_equal(g.edges["relative_weights"], want.weights)
        np.testing.assert_array_equal(g.nodes["ring_aromatic"], want.ring_aromatic)
    # One on-disk copy: the keyed directory holds the store and nothing else.
    keyed = featurize.cache_path(tmp_path, "qm9-first100", settings, ring=True)
    assert [p.name for p in keyed.iterdir()] == ["graphs"] and (keyed / "graphs" / "manifest.json").exists()
    # Reuse: the second load reads the store, neither the CSVs nor the featuriser.
    monkeypatch.setattr(featurize, "build_store", lambda *a, **k: pytest.fail("featurised again"))
    again, splits_again = datasets.load("qm9", featurizer=settings, source=datasets.Source(limit=100),
                                        cache_dir=tmp_path, ring=True)
    assert calls == [100]
    _assert_same_store(again, store)
    assert all(np.array_equal(splits[k], splits_again[k]) for k in splits)
    assert not any(m == "tensorflow" or m.startswith(("tensorflow.", "tensorflow_datasets", "grain"))
                   for m in sys.modules)


def test_qm9_cache_is_keyed_by_featurizer_settings_and_ring(tmp_path, settings, monkeypatch):
    from scannet_jax.neighbors import FeaturizerSettings

    calls = _counting(monkeypatch)

    def load(s: FeaturizerSettings, ring: bool = False) -> GraphStore:
        return qm9.load(s, cache_dir=tmp_path, ring=ring, limit=20, num_workers=1)[0]

    base = load(settings)
    short = load(FeaturizerSettings(cutoff=2.0))
    with_ring = load(settings, ring=True)
    assert len(calls) == 3
    dirs = {featurize.cache_path(tmp_path, "qm9-first20", s, r) for s, r in
            ((settings, False), (FeaturizerSettings(cutoff=2.0), False), (settings, True))}
    assert len(dirs) == 3 and all((d / "graphs" / "manifest.json").exists() for d in dirs)
    assert short.edge_ptr[-1] < base.edge_ptr[-1] and short.distances.max() <= 2.0  # a shorter cutoff
    assert base.ring_aromatic is None and with_ring.ring_aromatic.shape == (base.node_ptr[-1], 2)
    np.testing.assert_array_equal(load(settings).distances, base.distances)  # each key keeps its store
    assert len(calls) == 3


def test_half_written_qm9_cache_is_not_reused(tmp_path, settings, monkeypatch, caplog):
    calls = _counting(monkeypatch)
    store, _ = qm9.load(settings, cache_dir=tmp_path, limit=20, num_workers=1)
    graphs_dir = featurize.cache_path(tmp_path, "qm9-first20", settings, ring=False) / "graphs"
    # A store directory cut short: an array truncated and no manifest (it is written last).
    (graphs_dir / "manifest.json").unlink()
    victim = graphs_dir / "distances.npy"
    victim.write_bytes(victim.read_bytes()[:-16])
    with caplog.at_level(logging.WARNING):
        rebuilt, _ = qm9.load(settings, cache_dir=tmp_path, limit=20, num_workers=1)
    assert len(calls) == 2 and "unusable and will be rebuilt" in caplog.text and "manifest" in caplog.text
    _assert_same_store(rebuilt, store)
    # A writer killed before its rename leaves only its temporary directory: not a store.
    GraphStore.load(graphs_dir)
    other = tmp_path / "other"
    keyed = featurize.cache_path(other, "qm9-first20", settings, ring=False)
    keyed.mkdir(parents=True)
    (keyed / ".graphs.tmp-deadbeef").mkdir()
    (keyed / ".graphs.tmp-deadbeef" / "distances.npy").write_bytes(victim.read_bytes()[:100])
    qm9.load(settings, cache_dir=other, limit=20, num_workers=1)
    assert len(calls) == 3 and (keyed / "graphs" / "manifest.json").exists()


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
