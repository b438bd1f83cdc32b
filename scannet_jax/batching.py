"""Fixed-size padded batches from a `GraphStore`: the one batching path of training,
evaluation and benchmarks (NumPy; only `graph_masks` runs under jit).

`BatchPlan` cuts a split (positions in a store) into global batches, one padded chunk per
device, in a deterministic, resumable order; `device_batches` pads them ahead in a background
thread and places them on the mesh. Every batch is padded to one of a few `Bucket` shapes so
that a jitted step compiles once per bucket. The layout is jraph's `pad_with_graphs`: the real
graphs, then one graph holding every padding node and edge (padding edges point at the first
padding node, padding Z = 0), then empty graphs. Batches are gathered from the CSR arrays with
vectorised index arithmetic (no per-graph Python loop), so a CPU thread prepares thousands of
batches of 128 QM9 molecules per second.

A store with extra sets (`graphs.ExtraSet`, e.g. ALIGNN's triplets) gives a `Batch`: the same
GraphsTuple plus each set padded to its own bucket size, index fields made batch-global, padding
rows in the padding graph pointing at the first padding row of the set they index (so segment
ops over them stay in range). A store without extra sets gives the plain GraphsTuple as before.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from scannet_jax import parallel
from scannet_jax.graphs import BUILTIN_SETS, GraphStore, concat_ranges

T = TypeVar("T")


class Bucket(NamedTuple):
    """Padded sizes of one batch shape (totals over the batch, padding graph included).

    ``extras`` holds (name, rows) of every extra set of the store, sorted by name; () for a store
    without extra sets.
    """

    n_node: int
    n_edge: int
    n_graph: int
    extras: tuple[tuple[str, int], ...] = ()

    def size(self, name: str) -> int:
        """Padded rows of set ``name``: "nodes", "edges" or an extra set.

        Raises:
          ValueError: if the bucket has no size for that set.
        """
        if name in BUILTIN_SETS:
            return self.n_node if name == "nodes" else self.n_edge
        for extra, rows in self.extras:
            if extra == name:
                return rows
        raise ValueError(f"{self} has no size for the extra set {name!r}")


class ExtraBatch(NamedTuple):
    """One extra set of a padded batch: R rows, R its size in the batch's `Bucket`."""

    fields: dict[str, np.ndarray]  # name -> [R, ...]; index fields int32 batch-global, features as stored
    n_row: np.ndarray  # int32 [G], rows of each graph (the padding graph holds every padding row)


class Batch(NamedTuple):
    """A padded batch of a store with extra sets (`pad_batch`); a Flax module reads
    ``batch.graphs`` as any GraphsTuple and ``batch.extras[name].fields[field]``."""

    graphs: jraph.GraphsTuple
    extras: dict[str, ExtraBatch]


def padding_rows(store: GraphStore) -> dict[str, int]:
    """Padding rows every batch of ``store`` needs per set ("nodes", "edges", each extra set): the
    one padding node of jraph's layout, and one row in every set that an index field refers to
    (its padding entries point there). Without extra sets: one node, no edge, as before them."""
    if not store.extras:
        return {"nodes": 1, "edges": 0}
    referred = {target for extra in store.extras.values() for target in extra.refers.values()}
    return {"nodes": 1, "edges": int("edges" in referred), **{name: int(name in referred) for name in store.extras}}


def _sets(store: GraphStore) -> tuple[str, ...]:
    """Names of the store's sets in bucket order: nodes, edges, then the extra sets by name."""
    return (*BUILTIN_SETS, *sorted(store.extras))


def _round_up(x: np.ndarray | int, multiple: int) -> np.ndarray:
    return -(-np.asarray(x) // multiple) * multiple


def worst_case_bucket(store: GraphStore, indices: np.ndarray, batch_size: int, round_to: int = 64) -> Bucket:
    """The smallest bucket (up to rounding) that fits ANY batch of `batch_size` of `indices`.

    Each set (atoms, edges, every extra set) gets, separately, the rows of the `batch_size`
    structures largest in it plus its `padding_rows` (one node for `pad_with_graphs`), so no
    batch of at most `batch_size` structures can overflow any of them.
    """
    k = min(batch_size, len(indices))
    pad = padding_rows(store)
    size = {}
    for name in _sets(store):
        largest = np.sort(store.counts(name)[indices])[::-1][:k].sum()
        size[name] = int(_round_up(max(largest + pad[name], 1), round_to))
    return Bucket(size["nodes"], size["edges"], batch_size + 1, tuple((n, size[n]) for n in sorted(store.extras)))


def _sample_batch_totals(counts: np.ndarray, batch_size: int, num_batches: int, seed: int) -> np.ndarray:
    """Totals of `num_batches` full batches from shuffled epochs.

    Args:
      counts: int [L, S], rows per structure of L sets.

    Returns:
      int64 [L, num_batches].
    """
    rng = np.random.default_rng(seed)
    per_epoch = counts.shape[1] // batch_size
    epochs = -(-num_batches // per_epoch)
    totals = []
    for _ in range(epochs):
        order = rng.permutation(counts.shape[1])[: per_epoch * batch_size]
        totals.append(counts[:, order].reshape(len(counts), per_epoch, batch_size).sum(2))
    return np.concatenate(totals, axis=1)[:, :num_batches]


def _best_thresholds(sorted_edges: np.ndarray, num: int, grid: int = 200) -> list[int]:
    """`num` edge thresholds (the last = the maximum) minimising the summed padded edges.

    Dynamic programme over candidate thresholds at `grid` quantiles of the sampled totals; a
    bucket ending at threshold t_b after t_a costs (#batches in (t_a, t_b]) * t_b.
    """
    cands = np.unique(np.quantile(sorted_edges, np.linspace(0, 1, grid + 1), method="higher"))
    counts = np.searchsorted(sorted_edges, cands, side="right")
    g = len(cands)
    num = min(num, g)
    cost = np.full((num + 1, g), np.inf)
    back = np.zeros((num + 1, g), np.int64)
    cost[1] = counts * cands
    for k in range(2, num + 1):
        for b in range(g):
            prev = cost[k - 1, :b] + (counts[b] - counts[:b]) * cands[b]
            if prev.size:
                back[k, b] = int(np.argmin(prev))
                cost[k, b] = prev[back[k, b]]
    # the best plan with at most `num` buckets ending at the largest candidate
    k = int(np.argmin(cost[1:, g - 1])) + 1
    b, chosen = g - 1, []
    while k >= 1:
        chosen.append(int(cands[b]))
        b, k = back[k, b], k - 1
    return sorted(chosen)


def choose_buckets(
    store: GraphStore,
    indices: np.ndarray | None,
    batch_size: int,
    *,
    max_buckets: int = 4,
    num_sample_batches: int = 20_000,
    round_to: int = 64,
    seed: int = 0,
) -> list[Bucket]:
    """Chooses at most `max_buckets` batch shapes from the data set's size distribution.

    The totals of many simulated shuffled batches are computed; `max_buckets - 1` edge thresholds
    (the last one = the largest simulated total) are placed to minimise the expected number of
    padded edges, and each such bucket gets the largest node total (and extra-set total) seen
    among the batches it would take, plus `padding_rows`. The last bucket is `worst_case_bucket`:
    it fits any batch of `batch_size` structures of `indices` and is used only by a batch that
    fits no other.

    Args:
      store: the data set.
      indices: positions in `store` that will be batched (None = all).
      batch_size: structures per batch.
      max_buckets: number of shapes, >= 1 (the worst-case bucket included).
      num_sample_batches: simulated batches used to place the thresholds.
      round_to: every budget but n_graph is rounded up to a multiple of this.
      seed: seed of the simulation (the result is deterministic).

    Returns:
      Buckets sorted by size, all with n_graph = batch_size + 1; every batch of at most
      `batch_size` structures of `indices` fits the last one.
    """
    if max_buckets < 1 or batch_size < 1:
        raise ValueError(f"max_buckets ({max_buckets}) and batch_size ({batch_size}) must be >= 1")
    indices = np.arange(len(store)) if indices is None else np.asarray(indices, np.int64)
    if indices.size == 0:
        raise ValueError("choose_buckets needs at least one structure")
    worst = worst_case_bucket(store, indices, batch_size, round_to)
    if max_buckets == 1 or len(indices) < batch_size:
        return [worst]
    sets, pad = _sets(store), padding_rows(store)
    totals = _sample_batch_totals(np.stack([store.counts(name)[indices] for name in sets]), batch_size,
                                  num_sample_batches, seed)
    totals = totals[:, np.argsort(totals[1], kind="stable")]  # by edge total
    buckets = []
    for t in _best_thresholds(totals[1], max_buckets - 1):
        taken = totals[1] <= t
        size = {name: int(_round_up(max(totals[i][taken].max() + pad[name], 1), round_to))
                for i, name in enumerate(sets) if name != "edges"}
        bucket = Bucket(size["nodes"], int(_round_up(t + pad["edges"], round_to)), batch_size + 1,
                        tuple((n, size[n]) for n in sets[2:]))
        if bucket.n_node < worst.n_node and bucket.n_edge < worst.n_edge and bucket not in buckets:
            buckets.append(bucket)
    return buckets + [worst]


def _fits(bucket: Bucket, totals: dict[str, int], n_graph: int, padding: dict[str, int]) -> bool:
    """Whether a batch of ``n_graph`` graphs with real rows ``totals`` per set fits ``bucket``
    (with ``padding`` rows per set, and one padding graph)."""
    if (n_graph + 1 > bucket.n_graph or totals["nodes"] + padding["nodes"] > bucket.n_node
            or totals["edges"] + padding["edges"] > bucket.n_edge):
        return False
    return all(rows + padding[name] <= bucket.size(name) for name, rows in totals.items() if name not in BUILTIN_SETS)


def _totals(store: GraphStore, indices: np.ndarray) -> dict[str, int]:
    """Real rows of structures ``indices`` in every set of ``store``."""
    return {name: int(store.counts(name)[indices].sum()) for name in _sets(store)}


def select_bucket(n_node: int, n_edge: int, n_graph: int, buckets: Sequence[Bucket],
                  extras: dict[str, int] | None = None, padding: dict[str, int] | None = None) -> Bucket:
    """The first bucket (in the given order, smallest first) that fits these real totals.

    Args:
      n_node, n_edge, n_graph: real atoms, edges and graphs of the batch.
      buckets: candidates.
      extras: real rows of each extra set of the batch.
      padding: padding rows needed per set (`padding_rows` of the store); by default one node and
        none of any other set.

    Raises:
      ValueError: if no bucket fits.
    """
    totals = {"nodes": n_node, "edges": n_edge, **(extras or {})}
    padding = {"nodes": 1, "edges": 0, **dict.fromkeys(extras or {}, 0), **(padding or {})}
    for bucket in buckets:
        if _fits(bucket, totals, n_graph, padding):
            return bucket
    raise ValueError(f"no bucket fits a batch of {n_graph} graphs, {n_node} nodes, {n_edge} edges"
                     f"{'' if not extras else f', extra rows {extras}'}; largest is {buckets[-1] if buckets else None}")


def _gather(values: np.ndarray, src: np.ndarray, size: int, fill: float = 0) -> np.ndarray:
    """``values[src]`` padded with ``fill`` to ``size`` rows, gathered straight into the result.

    Args:
      values: [R, ...] array of a store.
      src: int [M] rows to take, all in range (M <= size).
      size: rows of the result.
      fill: value of rows M..size-1.

    Returns:
      [size, ...] array of ``values.dtype``.
    """
    out = np.empty((size, *values.shape[1:]), values.dtype)
    np.take(values, src, axis=0, out=out[:len(src)], mode="clip")  # "clip": no buffered bounds check
    out[len(src):] = fill
    return out


def _shifted(local: np.ndarray, src: np.ndarray, shift: np.ndarray, size: int, fill: int) -> np.ndarray:
    """Batch-global indices ``local[src] + shift`` as int32 [size], padded with ``fill``.

    Args:
      local: int [R] indices local to each structure (e.g. a store's senders, into its atoms).
      src: int [M] rows to take.
      shift: int32 [M] first batch row, in the set indexed, of each taken row's graph.
      size: rows of the result.
      fill: index of the padding rows (the first padding row of the set indexed).
    """
    out = np.empty(size, np.int32)
    np.add(local[src], shift, out=out[:len(src)])
    out[len(src):] = fill
    return out


def _per_graph(counts: np.ndarray, padding: int, n_graph: int) -> np.ndarray:
    """int32 [n_graph]: ``counts`` of the real graphs, ``padding`` rows in the padding graph, then
    zeros (jraph's `pad_with_graphs` layout)."""
    out = np.zeros(n_graph, np.int32)
    out[:len(counts)] = counts
    out[len(counts)] = padding
    return out


def _offsets(counts: np.ndarray) -> np.ndarray:
    """int32 [B], first batch row of each graph (exclusive cumulative sum of ``counts``)."""
    return (np.cumsum(counts) - counts).astype(np.int32)


def pad_batch(
    store: GraphStore, indices: Sequence[int] | np.ndarray, bucket: Bucket, target_name: str | None
) -> jraph.GraphsTuple | Batch:
    """Gathers structures `indices` of `store` into one padded GraphsTuple of shape `bucket`.

    Args:
      store: the data set.
      indices: [B] positions in `store`, B + 1 <= bucket.n_graph.
      bucket: padded sizes.
      target_name: key of `store.targets` written to globals["target"] (raw, NaN kept); None
        writes NaN.

    Returns:
      GraphsTuple with nodes {"atomic_numbers" int32 [n_node] (0 on padding), optionally
      "ring_aromatic" float32 [n_node, 2]}, edges {"distances", "solid_angles",
      "relative_weights"} float32 [n_edge], senders/receivers int32 [n_edge] (batch-global
      node indices; padding edges point at the first padding node), n_node/n_edge int32
      [n_graph], globals {"target" float32 [n_graph] (0 on padding), "index" int32 [n_graph]
      (store.index; -1 on padding)}. If the store has extra sets, a `Batch` of that GraphsTuple
      and, per set, an `ExtraBatch` of ``bucket.size(name)`` rows: features as stored (0 on
      padding rows), index fields int32 batch-global (padding rows point at the first padding
      row of the set they refer to), ``n_row`` int32 [n_graph] laid out like ``n_edge``.

    Raises:
      ValueError: if the structures do not fit the bucket.
    """
    indices = np.asarray(indices, np.int64)
    n_node, n_edge = store.n_node[indices], store.n_edge[indices]
    num_graphs, num_nodes, num_edges = len(indices), int(n_node.sum()), int(n_edge.sum())
    counts = {"nodes": n_node, "edges": n_edge, **{name: x.counts[indices] for name, x in store.extras.items()}}
    totals = {"nodes": num_nodes, "edges": num_edges, **{name: int(counts[name].sum()) for name in store.extras}}
    if not _fits(bucket, totals, num_graphs, padding_rows(store)):
        extra = {name: totals[name] for name in store.extras}
        needs = ", and a padding row in every set that an index field refers to" if extra else ""
        raise ValueError(f"batch of {num_graphs} graphs, {num_nodes} nodes, {num_edges} edges"
                         f"{f', extra rows {extra}' if extra else ''} does not fit {bucket} (one padding node "
                         f"and one padding graph are needed{needs})")
    node_src = concat_ranges(store.node_ptr[indices], n_node)
    edge_src = concat_ranges(store.edge_ptr[indices], n_edge)
    nodes = {"atomic_numbers": _gather(store.atomic_numbers, node_src, bucket.n_node)}
    if store.ring_aromatic is not None:
        nodes["ring_aromatic"] = _gather(store.ring_aromatic, node_src, bucket.n_node)
    edges = {name: _gather(getattr(store, name), edge_src, bucket.n_edge)
             for name in ("distances", "solid_angles", "relative_weights")}
    edge_shift = np.repeat(_offsets(n_node), n_edge)  # int32 [num_edges], first batch node of each edge's graph
    senders = _shifted(store.senders, edge_src, edge_shift, bucket.n_edge, num_nodes)
    receivers = _shifted(store.receivers, edge_src, edge_shift, bucket.n_edge, num_nodes)
    target = np.zeros(bucket.n_graph, np.float32)
    target[:num_graphs] = np.nan if target_name is None else store.targets[target_name][indices]
    index = np.full(bucket.n_graph, -1, np.int32)
    index[:num_graphs] = store.index[indices]
    graphs = jraph.GraphsTuple(nodes=nodes, edges=edges, senders=senders, receivers=receivers,
                               n_node=_per_graph(n_node, bucket.n_node - num_nodes, bucket.n_graph),
                               n_edge=_per_graph(n_edge, bucket.n_edge - num_edges, bucket.n_graph),
                               globals={"target": target, "index": index})
    if not store.extras:
        return graphs
    extras = {}
    for name, extra in store.extras.items():
        size, rows = bucket.size(name), counts[name]
        src = concat_ranges(extra.ptr[indices], rows)
        fields = {}
        for field, values in extra.fields.items():
            target_set = extra.refers.get(field)
            if target_set is None:
                fields[field] = _gather(values, src, size)
            else:  # local index -> batch index: offset by the first row of its graph in the target set
                shift = np.repeat(_offsets(counts[target_set]), rows)
                fields[field] = _shifted(values, src, shift, size, totals[target_set])
        extras[name] = ExtraBatch(fields, _per_graph(rows, size - totals[name], bucket.n_graph))
    return Batch(graphs, extras)


def graph_masks(graphs: jraph.GraphsTuple) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masks of real nodes [n_node], edges [n_edge] and graphs [n_graph] (bool; jit-safe).

    Only valid for the `pad_batch` (jraph `pad_with_graphs`) layout; uses static shapes only.
    """
    return (jraph.get_node_padding_mask(graphs), jraph.get_edge_padding_mask(graphs),
            jraph.get_graph_padding_mask(graphs))


def extra_masks(batch: Batch) -> dict[str, jax.Array]:
    """Masks of the real rows [R] of every extra set of a `pad_batch` batch (bool; jit-safe)."""
    graph_mask = jraph.get_graph_padding_mask(batch.graphs)
    return {name: jnp.repeat(graph_mask, extra.n_row, total_repeat_length=next(iter(extra.fields.values())).shape[0])
            for name, extra in batch.extras.items()}


def unpad_graph(graphs: jraph.GraphsTuple, k: int) -> jraph.GraphsTuple:
    """Real graph `k` of a padded NumPy batch as a single unpadded GraphsTuple (local indices)."""
    n_node, n_edge = np.asarray(graphs.n_node), np.asarray(graphs.n_edge)
    a, e = int(n_node[:k].sum()), int(n_edge[:k].sum())
    b, f = a + int(n_node[k]), e + int(n_edge[k])
    take = lambda tree, lo, hi: jax.tree.map(lambda x: np.asarray(x)[lo:hi], tree)  # noqa: E731
    return jraph.GraphsTuple(
        nodes=take(graphs.nodes, a, b), edges=take(graphs.edges, e, f),
        senders=np.asarray(graphs.senders)[e:f] - a, receivers=np.asarray(graphs.receivers)[e:f] - a,
        n_node=n_node[k:k + 1], n_edge=n_edge[k:k + 1], globals=take(graphs.globals, k, k + 1))


def epoch_order(indices: np.ndarray, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which `indices` are visited in `epoch`: a permutation fixed by (seed, epoch)."""
    indices = np.asarray(indices, np.int64)
    if not shuffle:
        return indices
    return indices[np.random.default_rng([seed, epoch]).permutation(len(indices))]


def num_batches(num_structures: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Batches per epoch."""
    return num_structures // batch_size if drop_remainder else -(-num_structures // batch_size)


@dataclasses.dataclass
class BatchPlan:
    """How a split is cut into steps: one global batch per step, one padded chunk per device.

    Global batch k of an epoch holds ``order(seed, epoch)[k * batch_size:(k + 1) * batch_size]``;
    it is split into ``num_devices`` near-equal contiguous chunks (``np.array_split``), all padded
    to the smallest bucket that holds every chunk, so all devices share one shape. The plan is
    the same on every process, but a process pads only the chunks of its own devices.

    Attributes:
      store: the data set (the split is a set of positions in it; nothing is copied).
      indices: int64 [S], positions of the split's structures in ``store``.
      target: name of the target in ``store.targets``.
      batch_size: global batch size (over all devices).
      buckets: padded shapes of one device's chunk, smallest first.
      num_devices: devices in the mesh.
      local_devices: positions in the mesh of the devices this process feeds.
    """

    store: GraphStore
    indices: np.ndarray
    target: str | None
    batch_size: int
    buckets: list[Bucket]
    num_devices: int = 1
    local_devices: range = range(1)

    def __len__(self) -> int:
        return len(self.indices)

    def num_batches(self) -> int:
        return num_batches(len(self.indices), self.batch_size)

    def order(self, seed: int | None, epoch: int) -> np.ndarray:
        """Store positions in the order of ``epoch``: shuffled by (seed, epoch), or as given if
        seed is None."""
        return epoch_order(self.indices, seed=seed or 0, epoch=epoch, shuffle=seed is not None)

    def chunks(self, indices: np.ndarray) -> list[np.ndarray]:
        return np.array_split(np.asarray(indices, np.int64), self.num_devices)

    def bucket_for(self, chunks: list[np.ndarray]) -> Bucket:
        """Smallest bucket that holds every chunk of the global batch."""
        padding = padding_rows(self.store)

        def first_fit(chunk: np.ndarray) -> Bucket:
            totals = _totals(self.store, chunk)
            return select_bucket(totals.pop("nodes"), totals.pop("edges"), len(chunk), self.buckets, totals, padding)

        return max((first_fit(c) for c in chunks), key=self.buckets.index)

    def batch(self, indices: np.ndarray) -> jraph.GraphsTuple | Batch:
        """This process's padded chunks of one global batch (store positions), stacked: every
        leaf [L, ...] for L local devices (a `Batch` if the store has extra sets)."""
        chunks = self.chunks(indices)
        bucket = self.bucket_for(chunks)
        padded = [pad_batch(self.store, chunks[d], bucket, self.target) for d in self.local_devices]
        if len(padded) == 1:  # a view with a leading axis: no copy of the fresh arrays
            return jax.tree.map(lambda x: x[None], padded[0])
        return jax.tree.map(lambda *xs: np.stack(xs), *padded)

    def batches(self, seed: int | None, epoch: int, start: int = 0) -> Iterator[jraph.GraphsTuple | Batch]:
        """Batches of ``epoch`` from batch number ``start`` on (resuming mid-epoch yields exactly
        the tail of the uninterrupted sequence)."""
        order = self.order(seed, epoch)
        for b in range(start, self.num_batches()):
            yield self.batch(order[b * self.batch_size:(b + 1) * self.batch_size])

    def padding_efficiency(self, seed: int | None = 0, epoch: int = 0) -> dict[str, float]:
        """Fraction of the padded node / edge / graph (and extra-set row) slots holding real data
        over one epoch."""
        sets = _sets(self.store)
        keys = (*sets[:2], "graphs", *sets[2:])
        real, padded = dict.fromkeys(keys, 0), dict.fromkeys(keys, 0)
        order = self.order(seed, epoch)
        for b in range(self.num_batches()):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            bucket = self.bucket_for(self.chunks(batch))
            for name, rows in _totals(self.store, batch).items():
                real[name] += rows
                padded[name] += bucket.size(name) * self.num_devices
            real["graphs"] += len(batch)
            padded["graphs"] += bucket.n_graph * self.num_devices
        return {name: real[name] / padded[name] for name in real}


def make_plan(store: GraphStore, indices: np.ndarray, target: str | None, batch_size: int, num_buckets: int,
              mesh: jax.sharding.Mesh, bucket_indices: np.ndarray | None = None) -> BatchPlan:
    """A `BatchPlan` whose buckets come from the full size distribution of ``bucket_indices``
    (default ``indices``) at this mesh's per-device batch size. Evaluation plans of all splits
    share one ``bucket_indices`` so that they share shapes, hence compilations.

    Raises:
      ValueError: if this process's devices are not contiguous in the mesh.
    """
    num_devices = mesh.devices.size
    local = {d.id for d in jax.local_devices()}
    positions = [i for i, d in enumerate(mesh.devices.flat) if d.id in local]
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise ValueError(f"this process's devices are not contiguous in the mesh: {positions}")
    per_device = math.ceil(batch_size / num_devices)
    indices = np.asarray(indices, np.int64)
    buckets = choose_buckets(store, indices if bucket_indices is None else bucket_indices, per_device,
                             max_buckets=num_buckets)
    return BatchPlan(store, indices, target, batch_size, list(buckets), num_devices,
                     range(positions[0], positions[-1] + 1))


def device_batches(plan: BatchPlan, mesh: jax.sharding.Mesh, seed: int | None, epoch: int, start: int,
                   buffer_size: int) -> Iterator[jraph.GraphsTuple]:
    """Global device batches of ``epoch`` from batch ``start`` on, padded and transferred by a
    background thread ahead of use (none if ``buffer_size`` is 0)."""
    batches = (parallel.shard_batch(b, mesh) for b in plan.batches(seed, epoch, start))
    return prefetch(batches, buffer_size) if buffer_size > 0 else batches


_DONE = object()


def prefetch(iterable: Iterable[T], buffer_size: int = 4) -> Iterator[T]:
    """Runs `iterable` in a background thread, keeping up to `buffer_size` items ready.

    NumPy releases the GIL in its gathers, so batch preparation overlaps the device step.
    Exceptions from the producer are re-raised in the consumer; closing the returned generator
    stops the thread.
    """
    items: queue.Queue = queue.Queue(maxsize=buffer_size)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put((_DONE, err))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item, err = items.get()
            if item is _DONE:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=1.0)
