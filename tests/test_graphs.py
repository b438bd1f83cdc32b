"""Tests for scannet_jax.graphs: CSR packing, subset/concat, save/load with verification."""

import json
from typing import NamedTuple

import jax
import numpy as np
import pytest

from scannet_jax import graphs
from scannet_jax.graphs import CorruptStoreError, GraphStore, concat_ranges


class Edges(NamedTuple):
    receivers: np.ndarray
    senders: np.ndarray
    distances: np.ndarray
    solid_angles: np.ndarray
    weights: np.ndarray


def random_edges(rng: np.random.Generator, num_atoms: int) -> Edges:
    num_edges = int(rng.integers(0, 3 * num_atoms + 1))
    receivers = np.sort(rng.integers(0, num_atoms, num_edges))
    return Edges(receivers, rng.integers(0, num_atoms, num_edges), rng.uniform(0.8, 4.0, num_edges),
                 rng.uniform(0.4, 3.0, num_edges), rng.uniform(0.2, 1.0, num_edges))


def random_store(num: int = 7, seed: int = 0, ring: bool = True) -> tuple[GraphStore, list, list, list]:
    rng = np.random.default_rng(seed)
    numbers = [rng.integers(1, 10, int(rng.integers(1, 9))) for _ in range(num)]
    edges = [random_edges(rng, len(z)) for z in numbers]
    rings = [rng.integers(0, 2, (len(z), 2)).astype(np.float32) for z in numbers] if ring else None
    store = GraphStore.from_structures(numbers, edges, targets={"homo": rng.normal(size=num)},
                                       index=np.arange(num) + 100, ring_aromatic=rings)
    return store, numbers, edges, rings


def test_concat_ranges():
    got = concat_ranges(np.array([5, 0, 9]), np.array([2, 0, 3]))
    np.testing.assert_array_equal(got, [5, 6, 9, 10, 11])


def test_from_structures_layout_and_dtypes():
    store, numbers, edges, rings = random_store()
    assert store.num_structures == 7 and len(store) == 7
    np.testing.assert_array_equal(store.n_node, [len(z) for z in numbers])
    np.testing.assert_array_equal(store.n_edge, [len(e.receivers) for e in edges])
    assert store.atomic_numbers.dtype == np.int32 and store.senders.dtype == np.int32
    assert store.distances.dtype == np.float32 and store.targets["homo"].dtype == np.float64
    for s in range(7):
        g = store.graph(s, "homo")
        np.testing.assert_array_equal(g.nodes["atomic_numbers"], numbers[s])
        np.testing.assert_array_equal(g.senders, edges[s].senders)
        np.testing.assert_allclose(g.edges["solid_angles"], edges[s].solid_angles, rtol=1e-6)
        np.testing.assert_array_equal(g.nodes["ring_aromatic"], rings[s])
        assert g.globals["index"][0] == 100 + s
        assert g.globals["target"][0] == np.float32(store.targets["homo"][s])


def test_subset_and_concat_round_trip():
    store, *_ = random_store()
    order = np.array([4, 0, 6, 2])
    sub = store.subset(order)
    np.testing.assert_array_equal(sub.index, store.index[order])
    for k, s in enumerate(order):
        a, b = sub.graph(k, "homo"), store.graph(s, "homo")
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    joined = GraphStore.concat([store.subset([0, 1, 2]), store.subset([3, 4, 5, 6])])
    for name in ("atomic_numbers", "node_ptr", "edge_ptr", "senders", "distances", "index", "ring_aromatic"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(store, name))
    np.testing.assert_array_equal(joined.targets["homo"], store.targets["homo"])
    with pytest.raises(IndexError):
        store.subset([7])


def test_bad_input_names_structure_and_atom():
    rng = np.random.default_rng(1)
    good = random_edges(rng, 3)
    with pytest.raises(ValueError, match="structure 1: atom 2 has atomic number 0"):
        GraphStore.from_structures([np.array([1, 6]), np.array([1, 6, 0])], [random_edges(rng, 2), good])
    bad = good._replace(senders=np.full_like(good.senders, 3))
    if len(bad.senders):
        with pytest.raises(ValueError, match="structure 0: edge 0 has sender 3 outside"):
            GraphStore.from_structures([np.array([1, 6, 8])], [bad])


def test_save_load_round_trip_and_metadata(tmp_path):
    store, *_ = random_store()
    store.save(tmp_path / "s", {"featurizer": "abc"})
    loaded = GraphStore.load(tmp_path / "s", expect={"featurizer": "abc"})
    for name in ("atomic_numbers", "node_ptr", "edge_ptr", "senders", "receivers", "distances",
                 "solid_angles", "relative_weights", "index", "ring_aromatic"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(store, name))
        assert getattr(loaded, name).dtype == getattr(store, name).dtype
    np.testing.assert_array_equal(loaded.targets["homo"], store.targets["homo"])
    with pytest.raises(CorruptStoreError, match="metadata 'featurizer'"):
        GraphStore.load(tmp_path / "s", expect={"featurizer": "xyz"})
    store.save(tmp_path / "s")  # overwriting leaves no temporary directories behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_load_detects_truncation_checksum_and_version(tmp_path):
    store, *_ = random_store()
    store.save(tmp_path / "s")
    file = tmp_path / "s" / "distances.npy"
    data = file.read_bytes()
    file.write_bytes(data[:-4])
    with pytest.raises(CorruptStoreError, match="distances.npy: .* bytes"):
        GraphStore.load(tmp_path / "s")
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    file.write_bytes(bytes(flipped))
    with pytest.raises(CorruptStoreError, match="distances.npy: checksum"):
        GraphStore.load(tmp_path / "s")
    file.write_bytes(data)
    GraphStore.load(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["format_version"] = graphs.STORE_FORMAT_VERSION + 1
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptStoreError, match="format version"):
        GraphStore.load(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(CorruptStoreError, match="manifest.json: missing"):
        GraphStore.load(tmp_path / "s")


def test_store_writer_appends_parts_into_one_mapped_store(tmp_path):
    """Three copies written part by part equal GraphStore.concat of them; the loaded arrays are
    memory-mapped; a writer left without close() leaves nothing behind."""
    from scannet_jax.graphs import StoreWriter

    store = random_store()[0]
    n, a, e = store.num_structures, int(store.node_ptr[-1]), int(store.edge_ptr[-1])
    with StoreWriter(tmp_path / "big", store, num_structures=3 * n, num_atoms=3 * a, num_edges=3 * e) as writer:
        for k in range(3):
            writer.append(store, index=store.index + k * n)
        writer.close({"copies": 3})
    loaded = GraphStore.load(tmp_path / "big", expect={"copies": 3})
    expected = GraphStore.concat([store] * 3)
    for name in ("atomic_numbers", "node_ptr", "edge_ptr", "senders", "receivers", "distances", "solid_angles",
                 "relative_weights", "ring_aromatic"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(expected, name), err_msg=name)
    np.testing.assert_array_equal(loaded.index, np.concatenate([store.index + k * n for k in range(3)]))
    # a plain ndarray (no np.memmap subclass overhead per gather) over the read-only mapping
    assert type(loaded.distances) is np.ndarray and isinstance(loaded.distances.base, np.memmap)
    assert not loaded.distances.flags.writeable
    with pytest.raises(ValueError, match=r"wrote \(7, .*\) \(structures, atoms, edges\) of \(14, "):
        with StoreWriter(tmp_path / "half", store, num_structures=2 * n, num_atoms=2 * a, num_edges=2 * e) as writer:
            writer.append(store)
            writer.close()
    with pytest.raises(ValueError, match="beyond the store's totals"):
        with StoreWriter(tmp_path / "over", store, num_structures=n, num_atoms=a, num_edges=e) as writer:
            writer.append(store)
            writer.append(store)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]  # no half-written directory
