"""ALIGNN's k-NN bond graph and line graph against the reference package (tests/fixtures/alignn)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import ase
import numpy as np
import pytest

from scannet_jax.knn import knn_from_arrays, knn_neighbors
from scannet_jax.line_graph import alignn_graphs, line_graph, pad_alignn_batch

FIXTURES = Path(__file__).parent / "fixtures" / "alignn"
GRAPHS = np.load(FIXTURES / "graphs.npz")
NAMES = json.loads((FIXTURES / "meta.json").read_text())["structures"]


def reference_bonds(name: str) -> tuple[list[tuple], np.ndarray]:
    """The reference's bonds as (receiver, sender, shift) keys in our convention, and their vectors.

    Reference edge src -> dst carries r = x_dst(image) - x_src; ours: sender = src, receiver = dst,
    vector = x_sender(image) - x_receiver = -r, shift = image of the sender.
    """
    pos, cell = GRAPHS[f"{name}.positions"], GRAPHS[f"{name}.cell"]
    src, dst = GRAPHS[f"{name}.src"], GRAPHS[f"{name}.dst"]
    vectors = -GRAPHS[f"{name}.r"].astype(np.float64)
    shifts = np.rint((vectors - (pos[src] - pos[dst])) @ np.linalg.inv(cell)).astype(int)
    keys = [(int(d), int(s), tuple(n)) for d, s, n in zip(dst, src, shifts.tolist())]
    return keys, vectors


def our_bonds(nb) -> list[tuple]:
    return [(int(r), int(s), tuple(n)) for r, s, n in zip(nb.receivers, nb.senders, nb.shifts.tolist())]


@pytest.mark.parametrize("name", NAMES)
def test_bonds_match_reference(name):
    nb = knn_from_arrays(GRAPHS[f"{name}.positions"], GRAPHS[f"{name}.cell"], True)
    ref_keys, ref_vectors = reference_bonds(name)
    assert Counter(our_bonds(nb)) == Counter(ref_keys)
    # Same vectors per key (the reference's are float32): pair them up in key order.
    ours = sorted(zip(our_bonds(nb), nb.vectors.tolist()))
    ref = sorted(zip(ref_keys, ref_vectors.tolist()))
    np.testing.assert_allclose([v for _, v in ours], [v for _, v in ref], atol=2e-6)
    np.testing.assert_allclose(nb.distances, np.linalg.norm(nb.vectors, axis=1), rtol=1e-12)
    # Conventions of neighbors.Neighbors: vector = x_sender + shift @ cell - x_receiver, sorted by receiver.
    pos, cell = GRAPHS[f"{name}.positions"], GRAPHS[f"{name}.cell"]
    np.testing.assert_allclose(nb.vectors, pos[nb.senders] + nb.shifts @ cell - pos[nb.receivers], atol=1e-12)
    assert np.all(np.diff(nb.receivers) >= 0)


@pytest.mark.parametrize("name", NAMES)
def test_line_graph_matches_reference(name):
    nb = knn_from_arrays(GRAPHS[f"{name}.positions"], GRAPHS[f"{name}.cell"], True)
    lg = line_graph(nb.senders, nb.receivers, nb.vectors)
    ours_keys = our_bonds(nb)
    ref_keys, _ = reference_bonds(name)
    ref = sorted((ref_keys[a], ref_keys[b], float(c)) for a, b, c in
                 zip(GRAPHS[f"{name}.lg_src"], GRAPHS[f"{name}.lg_dst"], GRAPHS[f"{name}.cosines"]))
    ours = sorted((ours_keys[a], ours_keys[b], float(c)) for a, b, c in zip(lg.senders, lg.receivers, lg.cosines))
    assert [t[:2] for t in ours] == [t[:2] for t in ref]
    np.testing.assert_allclose([t[2] for t in ours], [t[2] for t in ref], atol=1e-6)
    assert np.all(lg.senders != lg.receivers)
    np.testing.assert_array_equal(nb.receivers[lg.senders], nb.senders[lg.receivers])  # k1 = a->b, k2 = b->c


def test_known_reference_counts():
    """zoo-reference.md §1.1: rocksalt NaCl has 60 bonds and 1,752 triplets; a one-atom cell doubles bonds."""
    nacl = knn_from_arrays(GRAPHS["nacl.positions"], GRAPHS["nacl.cell"], True)
    assert len(nacl.senders) == 60
    assert len(line_graph(nacl.senders, nacl.receivers, nacl.vectors).senders) == 1752
    cu = knn_from_arrays(GRAPHS["cu_fcc.positions"], GRAPHS["cu_fcc.cell"], True)
    assert len(cu.senders) == 24 and set(Counter(our_bonds(cu)).values()) == {2}  # 12 bonds, each twice


def test_cutoff_growth_periodic():
    """One atom in a 9 Å cube: nothing within 8 Å, r -> 9 (6 neighbours) -> 18; the 12th distance is
    9√2, so the 6 + 12 nearest images are kept, each found as n and -n: 36 directed bonds."""
    nb = knn_from_arrays(np.zeros((1, 3)), 9.0 * np.eye(3), True)
    assert len(nb.senders) == 36
    assert Counter(np.round(nb.distances, 9)) == {9.0: 12, round(9 * np.sqrt(2), 9): 24}


def test_molecule_complete_graph_and_triplets():
    """A molecule of at most k + 1 atoms is a complete graph, no images; water by hand."""
    water = ase.Atoms("OH2", positions=[[0, 0, 0.1173], [0, 0.7572, -0.4692], [0, -0.7572, -0.4692]])
    nb = knn_neighbors(water)
    assert our_bonds(nb) == [(0, 1, (0, 0, 0)), (0, 2, (0, 0, 0)), (1, 0, (0, 0, 0)), (1, 2, (0, 0, 0)),
                             (2, 0, (0, 0, 0)), (2, 1, (0, 0, 0))]
    lg = line_graph(nb.senders, nb.receivers, nb.vectors)
    assert len(lg.senders) == 12  # each bond b -> c follows both bonds into b
    hoh = [c for a, b, c in zip(lg.senders, lg.receivers, lg.cosines)
           if nb.receivers[a] == 0 and {nb.senders[a], nb.receivers[b]} == {1, 2}]
    u, v = water.positions[1] - water.positions[0], water.positions[2] - water.positions[0]
    np.testing.assert_allclose(hoh, np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v), rtol=1e-12)
    back = [c for a, b, c in zip(lg.senders, lg.receivers, lg.cosines)
            if nb.senders[a] == nb.receivers[b] and nb.receivers[a] == nb.senders[b]]
    assert len(back) == 6 and np.allclose(back, 1.0)  # backtracking pairs kept, cos = +1


def brute_force_knn(positions, k):
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    kth = np.sort(d, axis=1)[:, k - 1]
    pairs = {(min(i, j), max(i, j)) for i in range(len(d)) for j in range(len(d)) if d[i, j] <= kth[i]}
    return Counter([(t, s, (0, 0, 0)) for s, t in pairs] + [(s, t, (0, 0, 0)) for s, t in pairs])


def test_molecule_knn_and_growth():
    """30 atoms in two clusters 25 Å apart: k-NN (union of both ends) by brute force; the small
    cluster (10 atoms) has only 9 partners within 8 Å, so r grows until the other cluster is in."""
    rng = np.random.default_rng(3)
    big = rng.uniform(0, 6, size=(20, 3))
    small = rng.uniform(0, 3, size=(10, 3)) + [25.0, 0, 0]
    positions = np.concatenate([big, small])
    nb = knn_from_arrays(positions)
    assert Counter(our_bonds(nb)) == brute_force_knn(positions, 12)
    assert nb.distances.max() > 20


def test_permutation_and_rotation():
    pos, cell = GRAPHS["triclinic.positions"], GRAPHS["triclinic.cell"]
    base = knn_from_arrays(pos, cell, True)
    perm = np.array([2, 0, 3, 1])
    permuted = knn_from_arrays(pos[perm], cell, True)
    assert Counter((int(perm[r]), int(perm[s]), n) for r, s, n in our_bonds(permuted)) == Counter(our_bonds(base))
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = knn_from_arrays(pos @ q.T, cell @ q.T, True)
    assert our_bonds(rotated) == our_bonds(base)
    np.testing.assert_allclose(rotated.distances, base.distances, rtol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="pbc must be all True or all False"):
        knn_from_arrays(np.zeros((2, 3)), np.eye(3), (True, False, True))
    with pytest.raises(ValueError, match="non-singular"):
        knn_from_arrays(np.zeros((1, 3)), np.zeros((3, 3)), True)
    with pytest.raises(ValueError, match="at least two atoms"):
        knn_from_arrays(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="no partner"):
        knn_from_arrays(np.array([[0, 0, 0], [0.1, 0, 0]]))


def test_pad_alignn_batch_layout_and_budgets():
    pairs = [alignn_graphs(GRAPHS[f"{n}.numbers"], knn_from_arrays(GRAPHS[f"{n}.positions"], GRAPHS[f"{n}.cell"], True))
             for n in ("nacl", "cu_fcc")]
    graph, line = pad_alignn_batch(pairs, n_node=8, n_edge=100, n_triplet=3000, n_graph=4)
    np.testing.assert_array_equal(line.n_node, graph.n_edge)  # line node k = bond k, padding included
    assert line.n_edge.tolist() == [1752, 552, 696, 0]
    assert line.senders.max() < graph.senders.shape[0]
    np.testing.assert_array_equal(line.senders[1752:1752 + 552], pairs[1][1].senders + 60)  # offset by bonds
    with pytest.raises(ValueError, match="n_edge=84 is too small"):
        pad_alignn_batch(pairs, n_node=8, n_edge=84, n_triplet=3000, n_graph=4)
    with pytest.raises(ValueError, match="n_triplet=100 is too small"):
        pad_alignn_batch(pairs, n_node=8, n_edge=100, n_triplet=100, n_graph=4)
