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


def store_with_extras(seed: int = 0) -> GraphStore:
    """`random_store` plus per-edge pairs (indices into edges, a feature [T, 2]) and per-atom
    groups (an index into atoms) with links between the groups (indices into the groups)."""
    store, numbers, edges, _ = random_store(seed=seed)
    rng = np.random.default_rng(seed + 1)
    pairs, groups, links = [], [], []
    for z, e in zip(numbers, edges):
        num_edges, t = len(e.senders), int(rng.integers(0, 6))
        t = t if num_edges else 0
        pairs.append({"first": rng.integers(0, max(num_edges, 1), t), "second": rng.integers(0, max(num_edges, 1), t),
                      "angle": rng.normal(size=(t, 2)).astype(np.float32)})
        groups.append({"center": np.arange(len(z))[::2]})
        m = len(groups[-1]["center"])
        links.append({"a": rng.integers(0, m, 3), "b": rng.integers(0, m, 3)})
    store = store.with_extra("pairs", pairs, {"first": "edges", "second": "edges"})
    store = store.with_extra("groups", groups, {"center": "nodes"})
    return store.with_extra("links", links, {"a": "groups", "b": "groups"})


def assert_same_extras(a: GraphStore, b: GraphStore) -> None:
    assert a.extras.keys() == b.extras.keys()
    for name, x in a.extras.items():
        y = b.extras[name]
        np.testing.assert_array_equal(x.ptr, y.ptr)
        assert dict(x.refers) == dict(y.refers) and x.fields.keys() == y.fields.keys()
        for field, values in x.fields.items():
            assert values.dtype == y.fields[field].dtype, (name, field)
            np.testing.assert_array_equal(values, y.fields[field])


def test_with_extra_packs_and_validates():
    store = store_with_extras()
    pairs = store.extras["pairs"]
    assert pairs.fields["first"].dtype == np.int32 and pairs.fields["angle"].shape == (pairs.ptr[-1], 2)
    assert pairs.ptr.dtype == np.int64 and pairs.ptr[0] == 0 and len(pairs.counts) == len(store)
    np.testing.assert_array_equal(store.counts("groups"), (store.n_node + 1) // 2)
    parts = [{"k": np.zeros(1, int)} for _ in range(len(store))]
    parts[3] = {"k": np.array([store.n_edge[3]])}  # one past the last edge of structure 3
    with pytest.raises(ValueError, match="structure 3, row 0 has k .* outside .* of 'edges'"):
        store.with_extra("bad", parts, {"k": "edges"})
    with pytest.raises(ValueError, match="refers to 'nowhere'"):
        store.with_extra("bad", [{"k": np.zeros(0, int)}] * len(store), {"k": "nowhere"})
    with pytest.raises(ValueError, match="different lengths"):
        store.with_extra("bad", [{"k": np.zeros(1, int), "f": np.zeros(2)}] * len(store), {"k": "nodes"})
    with pytest.raises(ValueError, match="identifier other than"):
        store.with_extra("edges", [{"k": np.zeros(0, int)}] * len(store), {"k": "nodes"})
    with pytest.raises(ValueError, match="1-D integer"):
        graphs.ExtraSet(np.zeros(len(store) + 1, np.int64), {"k": np.zeros(0, np.float32)}, {"k": "nodes"})


def test_extra_sets_survive_subset_concat_save_load_and_the_writer(tmp_path):
    store = store_with_extras()
    order = np.array([4, 0, 6, 2])
    sub = store.subset(order)
    for name, x in store.extras.items():
        y = sub.extras[name]
        for k, s in enumerate(order):
            for field, values in x.fields.items():
                np.testing.assert_array_equal(y.fields[field][y.ptr[k]:y.ptr[k + 1]], values[x.ptr[s]:x.ptr[s + 1]])
    assert_same_extras(GraphStore.concat([store.subset([0, 1, 2]), store.subset([3, 4, 5, 6])]), store)
    with pytest.raises(ValueError, match="extra sets"):
        GraphStore.concat([store, random_store()[0]])
    store.save(tmp_path / "s")
    loaded = GraphStore.load(tmp_path / "s")
    assert_same_extras(loaded, store)
    assert isinstance(loaded.extras["pairs"].fields["angle"].base, np.memmap)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["extras"]["links"] == {"refers": {"a": "groups", "b": "groups"}}
    assert {"extra.pairs.ptr", "extra.pairs.angle", "extra.links.a"} <= set(manifest["files"])
    file = tmp_path / "s" / "extra.pairs.angle.npy"  # extra files are checksummed like the others
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="extra.pairs.angle.npy: checksum"):
        GraphStore.load(tmp_path / "s")
    # written part by part: three copies equal their concatenation
    from scannet_jax.graphs import StoreWriter

    rows = store._rows()
    with StoreWriter(tmp_path / "big", store, num_structures=3 * rows["structures"], num_atoms=3 * rows["nodes"],
                     num_edges=3 * rows["edges"], num_extra_rows={n: 3 * rows[n] for n in store.extras}) as writer:
        for _ in range(3):
            writer.append(store)
        writer.close()
    assert_same_extras(GraphStore.load(tmp_path / "big"), GraphStore.concat([store] * 3))
    with pytest.raises(ValueError, match="num_extra_rows"):
        StoreWriter(tmp_path / "x", store, num_structures=1, num_atoms=1, num_edges=1)
    with pytest.raises(ValueError, match="wrote .* of"):
        with StoreWriter(tmp_path / "half", store, num_structures=2 * rows["structures"], num_atoms=2 * rows["nodes"],
                         num_edges=2 * rows["edges"], num_extra_rows={n: 2 * rows[n] + 1 for n in store.extras}) as w:
            w.append(store)
            w.append(store)
            w.close()


def test_a_store_without_extra_sets_is_written_as_before(tmp_path):
    store, *_ = random_store()
    store.save(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert "extras" not in manifest and not any(name.startswith("extra.") for name in manifest["files"])
    assert GraphStore.load(tmp_path / "s").extras == {}
