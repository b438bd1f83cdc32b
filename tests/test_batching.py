"""Tests for scannet_jax.batching: bucket choice, padding layout/invariance, masks, the batch plan."""

import dataclasses
import itertools
import threading

import jax
import jraph
import numpy as np
import pytest

from scannet_jax import batching
from scannet_jax.batching import Bucket
from scannet_jax.graphs import GraphStore

from test_graphs import Edges, random_edges


def make_store(num: int, seed: int = 0, max_atoms: int = 29) -> GraphStore:
    """QM9-like sizes: 3..max_atoms atoms, ~3 edges per atom; one target with NaN entries."""
    rng = np.random.default_rng(seed)
    numbers = [rng.integers(1, 10, int(rng.integers(3, max_atoms + 1))) for _ in range(num)]
    target = rng.normal(size=num)
    target[::11] = np.nan
    return GraphStore.from_structures(numbers, [random_edges(rng, len(z)) for z in numbers],
                                      targets={"homo": target},
                                      ring_aromatic=[rng.integers(0, 2, (len(z), 2)) for z in numbers])


@pytest.fixture(scope="module")
def store() -> GraphStore:
    return make_store(3000)


def test_pad_batch_layout_matches_jraph(store):
    idx = np.array([5, 17, 2])
    bucket = Bucket(n_node=128, n_edge=512, n_graph=6)
    got = batching.pad_batch(store, idx, bucket, "homo")
    graphs = [store.graph(int(s), "homo") for s in idx]
    want = jraph.pad_with_graphs(jraph.batch_np(graphs), bucket.n_node, bucket.n_edge, bucket.n_graph)
    want.globals["index"][3:] = -1  # the one deliberate difference: padding graphs get index -1
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(x, y)
    assert got.senders.dtype == np.int32 and got.n_node.dtype == np.int32
    assert got.globals["index"].tolist() == [5, 17, 2, -1, -1, -1]
    num_real_nodes = int(store.n_node[idx].sum())
    assert (got.senders[store.n_edge[idx].sum():] == num_real_nodes).all()  # padding edges -> first pad node


def tiny_store() -> GraphStore:
    """Two hand-made structures: water-like (3 atoms, 4 edges) and a diatomic (2 atoms, 2 edges)."""
    edges = [Edges(receivers=np.array([0, 0, 1, 2]), senders=np.array([1, 2, 0, 0]),
                   distances=np.array([0.5, 0.75, 0.5, 0.75]), solid_angles=np.array([1.0, 2.0, 3.0, 4.0]),
                   weights=np.array([0.25, 0.5, 0.75, 1.0])),
             Edges(receivers=np.array([0, 1]), senders=np.array([1, 0]), distances=np.array([1.5, 1.5]),
                   solid_angles=np.array([5.0, 6.0]), weights=np.array([1.0, 1.0]))]
    return GraphStore.from_structures([np.array([8, 1, 1]), np.array([6, 1])], edges,
                                      targets={"homo": [0.25, -0.5]}, index=[10, 11],
                                      ring_aromatic=[np.array([[1, 0], [0, 0], [0, 1]]), np.array([[0, 0], [1, 1]])])


def test_pad_batch_equals_a_hand_computed_batch():
    """Structures [1, 0] into Bucket(8, 8, 4): every array, dtype and shape written out by hand."""
    got = batching.pad_batch(tiny_store(), [1, 0], Bucket(8, 8, 4), "homo")
    f32, i32 = np.float32, np.int32
    want = jraph.GraphsTuple(
        nodes={"atomic_numbers": np.array([6, 1, 8, 1, 1, 0, 0, 0], i32),
               "ring_aromatic": np.array([[0, 0], [1, 1], [1, 0], [0, 0], [0, 1], [0, 0], [0, 0], [0, 0]], f32)},
        edges={"distances": np.array([1.5, 1.5, 0.5, 0.75, 0.5, 0.75, 0, 0], f32),
               "solid_angles": np.array([5, 6, 1, 2, 3, 4, 0, 0], f32),
               "relative_weights": np.array([1, 1, 0.25, 0.5, 0.75, 1, 0, 0], f32)},
        senders=np.array([1, 0, 3, 4, 2, 2, 5, 5], i32),  # structure 0 shifted by 2; padding -> node 5
        receivers=np.array([0, 1, 2, 2, 3, 4, 5, 5], i32),
        n_node=np.array([2, 3, 3, 0], i32), n_edge=np.array([2, 4, 2, 0], i32),
        globals={"target": np.array([-0.5, 0.25, 0, 0], f32), "index": np.array([11, 10, -1, -1], i32)})
    assert type(got) is jraph.GraphsTuple and jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert type(x) is np.ndarray and x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)
    nan = batching.pad_batch(tiny_store(), [0], Bucket(4, 4, 2), None).globals["target"]
    assert np.isnan(nan[0]) and nan[1] == 0 and nan.dtype == np.float32


def test_memory_mapped_store_pads_like_the_in_memory_one(tmp_path, store):
    store.save(tmp_path / "s")
    loaded = GraphStore.load(tmp_path / "s")
    idx, bucket = np.array([7, 3, 2999, 0]), Bucket(192, 512, 6)
    for x, y in zip(jax.tree.leaves(batching.pad_batch(loaded, idx, bucket, "homo")),
                    jax.tree.leaves(batching.pad_batch(store, idx, bucket, "homo"))):
        assert type(x) is np.ndarray and x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_padding_then_unpadding_keeps_every_real_graph(store):
    idx = np.array([9, 0, 31, 4, 4])
    for bucket in (Bucket(200, 600, 6), Bucket(448, 1024, 17)):
        padded = batching.pad_batch(store, idx, bucket, "homo")
        for k, s in enumerate(idx):
            for x, y in zip(jax.tree.leaves(batching.unpad_graph(padded, k)),
                            jax.tree.leaves(store.graph(int(s), "homo"))):
                np.testing.assert_array_equal(x, y)


def test_pad_batch_rejects_overflow(store):
    idx = np.array([1, 2])
    n = int(store.n_node[idx].sum())
    with pytest.raises(ValueError, match="does not fit"):
        batching.pad_batch(store, idx, Bucket(n, 10_000, 3), "homo")  # no room for the padding node
    with pytest.raises(ValueError, match="does not fit"):
        batching.pad_batch(store, idx, Bucket(n + 1, 10_000, 2), "homo")  # no room for the padding graph


def test_graph_masks_under_jit(store):
    idx = np.array([3, 1, 4, 1, 5])
    padded = batching.pad_batch(store, idx, Bucket(256, 640, 9), "homo")
    node_mask, edge_mask, graph_mask = jax.jit(batching.graph_masks)(padded)
    assert graph_mask.tolist() == [True] * 5 + [False] * 4
    assert int(node_mask.sum()) == store.n_node[idx].sum() and not node_mask[int(store.n_node[idx].sum())]
    assert int(edge_mask.sum()) == store.n_edge[idx].sum()
    assert node_mask.dtype == bool and node_mask.shape == (256,) and edge_mask.shape == (640,)


def test_nan_targets_stay_nan(store):
    padded = batching.pad_batch(store, np.array([0, 11, 1]), Bucket(128, 512, 4), "homo")
    assert np.isnan(padded.globals["target"][:2]).all() and np.isfinite(padded.globals["target"][2:]).all()


def test_worst_case_bucket_fits_the_largest_structures(store):
    idx = np.arange(len(store))
    worst = batching.worst_case_bucket(store, idx, 64)
    by_nodes = np.argsort(store.n_node)[-64:]
    by_edges = np.argsort(store.n_edge)[-64:]
    for batch in (by_nodes, by_edges):
        batching.pad_batch(store, batch, worst, "homo")  # raises if it does not fit


def _one_device(plan_batches):
    """The single device's GraphsTuple of each stacked batch."""
    return (jax.tree.map(lambda x: x[0], b) for b in plan_batches)


def test_choose_buckets_fits_every_batch_and_pads_little(store):
    train = np.arange(2500)
    buckets = batching.choose_buckets(store, train, 32, max_buckets=4)
    assert 2 <= len(buckets) <= 4
    assert all(b.n_graph == 33 for b in buckets)
    assert [b.n_edge for b in buckets] == sorted(b.n_edge for b in buckets)
    assert buckets[-1] == batching.worst_case_bucket(store, train, 32)
    assert batching.choose_buckets(store, train, 32) == buckets  # deterministic
    plan = batching.BatchPlan(store, train, "homo", 32, buckets)
    real = padded = 0
    shapes = set()
    for epoch in range(3):
        for graphs in _one_device(plan.batches(1, epoch)):
            shapes.add((graphs.n_node.shape, graphs.senders.shape))
            real += int(graphs.n_edge[graphs.globals["index"] >= 0].sum())
            padded += graphs.senders.shape[0]
    assert len(shapes) <= 4
    assert real / padded > 0.85
    efficiency = plan.padding_efficiency(1, 0)
    assert 0.85 < efficiency["edges"] <= 1 and 0 < efficiency["nodes"] <= 1


def test_iteration_is_deterministic_and_resumable(store):
    idx = np.arange(0, 3000, 3)
    plan = batching.BatchPlan(store, idx, "homo", 64, batching.choose_buckets(store, idx, 64))
    full = [g.globals["index"] for g in _one_device(plan.batches(7, 2))]
    again = [g.globals["index"] for g in _one_device(plan.batches(7, 2))]
    resumed = [g.globals["index"] for g in _one_device(plan.batches(7, 2, start=5))]
    assert len(full) == plan.num_batches() == batching.num_batches(len(idx), 64) == 16
    assert all(np.array_equal(a, b) for a, b in zip(full, again))
    assert len(resumed) == 11 and all(np.array_equal(a, b) for a, b in zip(full[5:], resumed))
    seen = np.concatenate([i[i >= 0] for i in full])
    assert sorted(seen) == sorted(store.index[idx])  # every structure once, last batch partial
    other_epoch = next(_one_device(plan.batches(7, 3)))
    assert not np.array_equal(other_epoch.globals["index"], full[0])
    in_order = next(_one_device(plan.batches(None, 2)))  # no seed: the split's own order
    assert in_order.globals["index"][:64].tolist() == idx[:64].tolist()


def test_plan_splits_a_global_batch_over_devices(store):
    idx = np.arange(40, 80)
    buckets = batching.choose_buckets(store, np.arange(len(store)), 10)
    plan = batching.BatchPlan(store, idx, "homo", 40, buckets, num_devices=4, local_devices=range(4))
    stacked = plan.batch(idx)
    assert stacked.n_node.shape == (4, 11) and stacked.nodes["atomic_numbers"].ndim == 2
    bucket = Bucket(stacked.nodes["atomic_numbers"].shape[1], stacked.senders.shape[1], 11)
    assert bucket in buckets and bucket == plan.bucket_for(plan.chunks(idx))
    for d in range(4):
        want = batching.pad_batch(store, idx[10 * d:10 * d + 10], bucket, "homo")
        for x, y in zip(jax.tree.leaves(stacked), jax.tree.leaves(want)):
            np.testing.assert_array_equal(x[d], y)
    # a process feeding devices 2 and 3 of 4 pads only their chunks, with the global bucket
    mine = batching.BatchPlan(store, idx, "homo", 40, buckets, num_devices=4, local_devices=range(2, 4)).batch(idx)
    for x, y in zip(jax.tree.leaves(mine), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(x, y[2:])
    two = batching.BatchPlan(store, idx, "homo", 20, buckets, num_devices=2, local_devices=range(2))
    batches = list(two.batches(None, 0))
    assert len(batches) == 2 and batches[0].n_node.shape == (2, 11)


def test_prefetch_keeps_order_and_propagates_errors():
    assert list(batching.prefetch(iter(range(50)), buffer_size=3)) == list(range(50))

    def failing():
        yield 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(batching.prefetch(failing()))
    before = threading.active_count()
    gen = batching.prefetch(itertools.count(), buffer_size=2)
    assert next(gen) == 0
    gen.close()
    assert threading.active_count() == before


# --- extra index sets ----------------------------------------------------------------------------


def alignn_store(max_neighbors: int = 3) -> tuple[GraphStore, list]:
    """H2O and CH4 with ALIGNN's k-NN bonds and their line graphs ("triplets", indices into edges)."""
    from ase.build import molecule

    from scannet_jax.knn import knn_neighbors
    from scannet_jax.line_graph import line_graph

    mols = [molecule("H2O"), molecule("CH4")]
    bonds = [knn_neighbors(m, cutoff=3.0, max_neighbors=max_neighbors) for m in mols]
    edges = [Edges(b.receivers, b.senders, b.distances, np.ones(len(b.senders)), np.ones(len(b.senders)))
             for b in bonds]
    store = GraphStore.from_structures([m.numbers for m in mols], edges, targets={"homo": [1.0, 2.0]})
    lines = [line_graph(b.senders, b.receivers, b.vectors) for b in bonds]
    parts = [{"senders": lg.senders, "receivers": lg.receivers, "cosines": lg.cosines.astype(np.float32)}
             for lg in lines]
    return store.with_extra("triplets", parts, {"senders": "edges", "receivers": "edges"}), list(zip(mols, bonds))


def test_triplets_point_at_the_right_edges_of_the_batch():
    from scannet_jax.line_graph import alignn_graphs, pad_alignn_batch

    store, mols = alignn_store()
    idx = np.array([1, 0])  # CH4 first: H2O's triplets must be shifted by CH4's edges
    bucket = batching.worst_case_bucket(store, idx, 2, round_to=8)
    assert dict(bucket.extras) == {"triplets": bucket.size("triplets")} and bucket.n_edge > store.n_edge.sum()
    batch = batching.pad_batch(store, idx, bucket, "homo")
    assert isinstance(batch, batching.Batch)
    graphs, triplets = batch.graphs, batch.extras["triplets"]
    assert set(triplets.fields) == {"senders", "receivers", "cosines"}
    assert triplets.fields["senders"].dtype == np.int32 and triplets.fields["cosines"].dtype == np.float32
    num_edges, num_triplets = int(store.n_edge.sum()), int(store.extras["triplets"].counts.sum())
    k1, k2 = triplets.fields["senders"][:num_triplets], triplets.fields["receivers"][:num_triplets]
    # a triplet (k1 = a -> b, k2 = b -> c) joins two edges of the batch that meet at atom b
    np.testing.assert_array_equal(graphs.receivers[k1], graphs.senders[k2])
    positions = np.concatenate([m.positions for m, _ in (mols[1], mols[0])])
    r1 = positions[graphs.senders[k1]] - positions[graphs.receivers[k1]]
    r2 = positions[graphs.receivers[k2]] - positions[graphs.senders[k2]]
    cos = np.einsum("td,td->t", r1, r2) / np.linalg.norm(r1, axis=1) / np.linalg.norm(r2, axis=1)
    np.testing.assert_allclose(triplets.fields["cosines"][:num_triplets], cos, atol=1e-6)
    # the first graph's triplets are CH4's, unshifted; the second graph's are H2O's, shifted by CH4's edges
    t_ch4 = int(store.extras["triplets"].counts[1])
    assert k1[:t_ch4].max() < store.n_edge[1] and k1[t_ch4:].min() >= store.n_edge[1]
    # padding triplets point at the first padding edge, which belongs to the padding graph
    assert (triplets.fields["senders"][num_triplets:] == num_edges).all()
    assert (triplets.fields["receivers"][num_triplets:] == num_edges).all()
    assert (triplets.fields["cosines"][num_triplets:] == 0).all()
    assert triplets.n_row.tolist() == [t_ch4, num_triplets - t_ch4, bucket.size("triplets") - num_triplets]
    # the same numbers as line_graph.pad_alignn_batch (ALIGNN's own padding of the line graph)
    pairs = [alignn_graphs(m.numbers, b) for m, b in (mols[1], mols[0])]
    _, line = pad_alignn_batch(pairs, n_node=bucket.n_node, n_edge=bucket.n_edge,
                               n_triplet=bucket.size("triplets"), n_graph=bucket.n_graph)
    np.testing.assert_array_equal(triplets.fields["senders"], line.senders)
    np.testing.assert_array_equal(triplets.fields["receivers"], line.receivers)
    np.testing.assert_array_equal(triplets.fields["cosines"], line.edges["cosines"])
    np.testing.assert_array_equal(triplets.n_row, line.n_edge)
    np.testing.assert_array_equal(graphs.n_edge, line.n_node)


def test_a_batch_without_extra_sets_is_the_plain_graphs_tuple():
    store, _ = alignn_store()
    plain = dataclasses.replace(store, extras={})
    bucket = batching.worst_case_bucket(store, np.arange(2), 2)
    with_extras = batching.pad_batch(store, [1, 0], bucket, "homo")
    without = batching.pad_batch(plain, [1, 0], Bucket(*bucket[:3]), "homo")
    assert type(without) is jraph.GraphsTuple
    for x, y in zip(jax.tree.leaves(with_extras.graphs), jax.tree.leaves(without)):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    assert batching.worst_case_bucket(plain, np.arange(2), 2).extras == ()
    assert batching.padding_rows(plain) == {"nodes": 1, "edges": 0}
    assert batching.padding_rows(store) == {"nodes": 1, "edges": 1, "triplets": 0}


def with_random_extras(store: GraphStore, seed: int = 0) -> GraphStore:
    """Triplet-like rows per edge (indices into edges) and motif-like rows (into nodes) with edges
    between the motifs (indices into the motifs), of very uneven sizes."""
    rng = np.random.default_rng(seed)
    trip, motifs, links = [], [], []
    for e, n in zip(store.n_edge, store.n_node):
        t = int(rng.integers(0, 4 * e + 1)) if e else 0
        trip.append({"senders": rng.integers(0, max(e, 1), t), "receivers": rng.integers(0, max(e, 1), t),
                     "cosines": rng.uniform(-1, 1, t).astype(np.float32)})
        m = int(rng.integers(1, n + 1))
        motifs.append({"centers": rng.choice(n, m, replace=False),
                       "features": rng.normal(size=(m, 3)).astype(np.float32)})
        k = int(rng.integers(0, 2 * m + 1))
        links.append({"senders": rng.integers(0, m, k), "receivers": rng.integers(0, m, k),
                      "sharing": rng.integers(0, 4, k).astype(np.int8)})
    store = store.with_extra("triplets", trip, {"senders": "edges", "receivers": "edges"})
    store = store.with_extra("motifs", motifs, {"centers": "nodes"})
    return store.with_extra("motif_edges", links, {"senders": "motifs", "receivers": "motifs"})


def check_extra_batch(store: GraphStore, idx: np.ndarray, batch: batching.Batch) -> None:
    """Every set of ``batch``: rows and features as in the store, indices shifted by their graph's
    offset in the set they refer to, padding rows pointing at that set's first padding row."""
    counts = {name: store.counts(name)[idx] for name in ("nodes", "edges", *store.extras)}
    for name, extra in store.extras.items():
        got = batch.extras[name]
        rows = np.concatenate([np.arange(extra.ptr[s], extra.ptr[s + 1]) for s in idx]).astype(np.int64)
        real = len(rows)
        assert got.n_row[:len(idx)].tolist() == counts[name].tolist()
        assert all(len(v) == got.n_row.sum() for v in got.fields.values())
        for field, values in extra.fields.items():
            padded = got.fields[field]
            if field in extra.refers:
                target = extra.refers[field]
                offset = np.repeat(np.cumsum(counts[target]) - counts[target], counts[name])
                np.testing.assert_array_equal(padded[:real], values[rows] + offset)
                assert padded.dtype == np.int32 and (padded[real:] == counts[target].sum()).all()
            else:
                np.testing.assert_array_equal(padded[:real], values[rows])
                assert padded.dtype == values.dtype and (padded[real:] == 0).all()


def test_worst_case_and_chosen_buckets_fit_every_batch_with_extra_sets():
    store = with_random_extras(make_store(600, seed=3))
    train = np.arange(500)
    worst = batching.worst_case_bucket(store, train, 16)
    assert [n for n, _ in worst.extras] == ["motif_edges", "motifs", "triplets"]
    pad = batching.padding_rows(store)
    assert pad == {"nodes": 1, "edges": 1, "motif_edges": 0, "motifs": 1, "triplets": 0}
    for name in ("nodes", "edges", *store.extras):  # the 16 largest in each set, separately
        largest = np.argsort(store.counts(name)[train], kind="stable")[-16:]
        assert store.counts(name)[largest].sum() + pad[name] <= worst.size(name)
        check_extra_batch(store, largest, batching.pad_batch(store, largest, worst, "homo"))
    buckets = batching.choose_buckets(store, train, 16, max_buckets=4)
    assert buckets[-1] == worst and all(len(b.extras) == 3 for b in buckets)
    plan = batching.BatchPlan(store, train, "homo", 16, buckets)
    used = set()
    for stacked in plan.batches(5, 0):
        assert isinstance(stacked, batching.Batch) and stacked.graphs.n_node.shape == (1, 17)
        used.add(stacked.extras["triplets"].fields["senders"].shape)
    assert len(used) >= 2  # the smaller buckets are used too
    efficiency = plan.padding_efficiency(5, 0)
    assert set(efficiency) == {"nodes", "edges", "graphs", *store.extras}
    assert all(0 < v <= 1 for v in efficiency.values())
    order = plan.order(5, 0)
    for b in range(plan.num_batches()):  # every batch: exactly what the store holds
        chunk = order[16 * b:16 * (b + 1)]
        check_extra_batch(store, chunk, batching.pad_batch(store, chunk, plan.bucket_for([chunk]), "homo"))
    with pytest.raises(ValueError, match="extra rows"):
        tight = worst._replace(extras=tuple((n, 1) for n, _ in worst.extras))
        batching.pad_batch(store, np.argsort(store.counts("triplets"))[-16:], tight, "homo")


def test_extra_sets_over_devices_and_masks_under_jit():
    store = with_random_extras(make_store(200, seed=4))
    idx = np.arange(40)
    buckets = batching.choose_buckets(store, idx, 10)
    plan = batching.BatchPlan(store, idx, "homo", 40, buckets, num_devices=4, local_devices=range(4))
    stacked = plan.batch(idx)
    bucket = plan.bucket_for(plan.chunks(idx))
    for d in range(4):
        want = batching.pad_batch(store, idx[10 * d:10 * d + 10], bucket, "homo")
        for x, y in zip(jax.tree.leaves(stacked), jax.tree.leaves(want)):
            np.testing.assert_array_equal(x[d], y)
    one = jax.tree.map(lambda x: x[1], stacked)
    masks = jax.jit(batching.extra_masks)(one)
    for name, mask in masks.items():
        real = int(store.counts(name)[idx[10:20]].sum())
        assert mask.dtype == bool and mask.shape == (bucket.size(name),)
        assert int(mask.sum()) == real and bool(mask[:real].all())
