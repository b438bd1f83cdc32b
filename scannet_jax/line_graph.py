"""ALIGNN's line graph of a bond graph and its padding (zoo-reference.md §1.3), NumPy only.

One line-graph node per directed bond of the atom graph (same order), one line-graph edge (a
triplet) per pair of bonds k1 = a -> b, k2 = b -> c that meet at atom b, with the message flowing
from k1 to k2 (`senders` = k1, `receivers` = k2), as DGL's `g.line_graph(shared=True)` with its
default `backtracking=True`: c = a (the reverse bond, cos θ = +1) and bonds to other images of a
are kept. Only k1 = k2 (a bond from an atom to its own image followed by itself) is excluded, as
in DGL. Bond vectors follow `knn.KnnNeighbors`: vectors[k] = x_sender − x_receiver, so the bond
angle at b is between vectors[k1] (b -> a) and −vectors[k2] (b -> c).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from scannet_jax.knn import KnnNeighbors

if TYPE_CHECKING:  # jraph (hence JAX) is imported by the two padded-graph helpers only, so the
    import jraph  # featuriser's workers (datasets/featurize.py) stay free of JAX


class LineGraph(NamedTuple):
    """Triplets of one structure (T line-graph edges), sorted by receiver, then sender."""

    senders: np.ndarray  # [T] int64, incoming bond k1 = a -> b (index into the atom graph's edges)
    receivers: np.ndarray  # [T] int64, outgoing bond k2 = b -> c
    cosines: np.ndarray  # [T] float64, cos of the angle a-b-c, clipped to [-1, 1]


def line_graph(senders: np.ndarray, receivers: np.ndarray, vectors: np.ndarray) -> LineGraph:
    """Line graph of one structure's bond graph.

    Args:
      senders: [E] int, sender atom of each bond.
      receivers: [E] int, receiver (centre) atom of each bond.
      vectors: [E, 3] float, Å, x_sender (at its image) − x_receiver.

    Returns:
      `LineGraph` with T = Σ_k2 in-degree(sender(k2)) − (number of bonds from an atom to its own
      image) triplets.
    """
    senders = np.asarray(senders, np.int64)
    receivers = np.asarray(receivers, np.int64)
    vectors = np.asarray(vectors, np.float64)
    num_atoms = int(max(senders.max(initial=-1), receivers.max(initial=-1))) + 1
    by_receiver = np.argsort(receivers, kind="stable")  # incoming bonds of each atom, contiguous
    in_degree = np.bincount(receivers, minlength=num_atoms)
    in_ptr = np.concatenate([[0], np.cumsum(in_degree)])
    counts = in_degree[senders]  # k1 candidates of each k2
    k2 = np.repeat(np.arange(len(senders)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    k1 = by_receiver[in_ptr[senders[k2]] + offsets]
    keep = k1 != k2
    k1, k2 = k1[keep], k2[keep]
    r1, r2 = vectors[k1], -vectors[k2]
    cos = np.einsum("td,td->t", r1, r2) / (np.linalg.norm(r1, axis=1) * np.linalg.norm(r2, axis=1))
    return LineGraph(senders=k1, receivers=k2, cosines=np.clip(cos, -1.0, 1.0))


def alignn_graphs(numbers: np.ndarray, neighbors: KnnNeighbors) -> tuple[jraph.GraphsTuple, jraph.GraphsTuple]:
    """One structure's inputs of `alignn.ALIGNN`: its atom graph and its line graph.

    Args:
      numbers: [N] atomic numbers Z (> 0).
      neighbors: its bonds (`knn.knn_neighbors`).

    Returns:
      (graph, line): `graph` has nodes {"atomic_numbers": int32 [N]}, edges {"vectors": float32
      [E, 3] Å, "distances": float32 [E] Å}, int32 senders/receivers [E]; `line` has one node per
      bond (nodes None, n_node [E]), edges {"cosines": float32 [T]}, int32 senders/receivers [T]
      (bond indices). Both have one graph and globals None.
    """
    import jraph

    numbers = np.asarray(numbers)
    lg = line_graph(neighbors.senders, neighbors.receivers, neighbors.vectors)
    num_bonds = len(neighbors.senders)
    graph = jraph.GraphsTuple(
        nodes={"atomic_numbers": numbers.astype(np.int32)},
        edges={"vectors": np.asarray(neighbors.vectors, np.float32),
               "distances": np.asarray(neighbors.distances, np.float32)},
        senders=np.asarray(neighbors.senders, np.int32), receivers=np.asarray(neighbors.receivers, np.int32),
        n_node=np.array([len(numbers)], np.int32), n_edge=np.array([num_bonds], np.int32), globals=None)
    line = jraph.GraphsTuple(
        nodes=None, edges={"cosines": np.asarray(lg.cosines, np.float32)},
        senders=np.asarray(lg.senders, np.int32), receivers=np.asarray(lg.receivers, np.int32),
        n_node=np.array([num_bonds], np.int32), n_edge=np.array([len(lg.senders)], np.int32), globals=None)
    return graph, line


def pad_alignn_batch(
    pairs: Sequence[tuple[jraph.GraphsTuple, jraph.GraphsTuple]], *, n_node: int, n_edge: int, n_triplet: int,
    n_graph: int,
) -> tuple[jraph.GraphsTuple, jraph.GraphsTuple]:
    """Batches `alignn_graphs` outputs and pads both graphs to fixed budgets (jraph layout).

    The atom graph is padded with `jraph.pad_with_graphs(n_node, n_edge, n_graph)`; the line graph
    with `n_node = n_edge`, so line-graph node k is atom-graph edge k, padding included: the line
    graph's padding graph owns exactly the atom graph's padding bonds, and padding triplets point at
    the first of them.

    Args:
      pairs: (graph, line) of each structure, in batch order.
      n_node: atom budget (> total atoms).
      n_edge: bond budget (> total bonds: the line graph's padding graph needs a node).
      n_triplet: triplet budget (>= total triplets).
      n_graph: graph budget (> number of structures).

    Returns:
      (graph, line), padded.

    Raises:
      ValueError: naming the budget that is too small.
    """
    import jraph

    graph = jraph.batch_np([g for g, _ in pairs])
    line = jraph.batch_np([lg for _, lg in pairs])
    totals = {"n_node": (n_node, int(graph.n_node.sum()) + 1), "n_edge": (n_edge, int(graph.n_edge.sum()) + 1),
              "n_triplet": (n_triplet, int(line.n_edge.sum())), "n_graph": (n_graph, len(pairs) + 1)}
    for name, (budget, needed) in totals.items():
        if budget < needed:
            raise ValueError(f"pad_alignn_batch: {name}={budget} is too small, this batch needs >= {needed}")
    return (jraph.pad_with_graphs(graph, n_node=n_node, n_edge=n_edge, n_graph=n_graph),
            jraph.pad_with_graphs(line, n_node=n_edge, n_edge=n_triplet, n_graph=n_graph))
