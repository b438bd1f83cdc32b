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
from typing import NamedTuple

import jraph
import numpy as np


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


def line_graph_tuple(lg: LineGraph, num_bonds: int) -> jraph.GraphsTuple:
    """One structure's line graph as a single-graph GraphsTuple.

    Args:
      lg: its triplets.
      num_bonds: E, the number of edges of its atom graph (= line-graph nodes).

    Returns:
      GraphsTuple with nodes None, edges {"cosines": float32 [T]}, int32 senders/receivers [T]
      (bond indices), n_node [E], n_edge [T], globals None.
    """
    return jraph.GraphsTuple(
        nodes=None, edges={"cosines": np.asarray(lg.cosines, np.float32)},
        senders=np.asarray(lg.senders, np.int32), receivers=np.asarray(lg.receivers, np.int32),
        n_node=np.array([num_bonds], np.int32), n_edge=np.array([len(lg.senders)], np.int32), globals=None)


def pad_line_graphs(line_graphs: Sequence[jraph.GraphsTuple], *, n_bond: int, n_triplet: int,
                    n_graph: int) -> jraph.GraphsTuple:
    """Batches single-structure line graphs and pads them to match a padded atom-graph batch.

    If the atom graphs of the same structures, in the same order, are batched and padded with
    `jraph.pad_with_graphs(graphs, n_node, n_edge=n_bond, n_graph)`, then line-graph node k is atom
    graph edge k (padding included): the line graph's padding graph owns the atom graph's padding
    edges and its padding triplets point at the first of them.

    Args:
      line_graphs: `line_graph_tuple` outputs.
      n_bond: the atom graph's edge budget (> total bonds: the padding graph needs one bond).
      n_triplet: triplet budget (>= total triplets).
      n_graph: graph budget, the same as the atom graph's.

    Returns:
      The padded line-graph GraphsTuple (jraph `pad_with_graphs` layout).

    Raises:
      ValueError: a budget is too small.
    """
    batch = jraph.batch_np(list(line_graphs))
    bonds, triplets = int(batch.n_node.sum()), int(batch.n_edge.sum())
    if n_bond <= bonds or n_triplet < triplets or n_graph <= len(line_graphs):
        raise ValueError(f"pad_line_graphs: budgets (bonds {n_bond}, triplets {n_triplet}, graphs {n_graph}) "
                         f"must exceed {bonds} bonds, reach {triplets} triplets and exceed {len(line_graphs)} "
                         "graphs")
    return jraph.pad_with_graphs(batch, n_node=n_bond, n_edge=n_triplet, n_graph=n_graph)
