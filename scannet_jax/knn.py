"""k-nearest-neighbour bond graph of ALIGNN (zoo-reference.md §1.2), vectorised NumPy.

The reference (`alignn.graphs.nearest_neighbor_edges` with jarvis `Atoms.get_all_neighbors`,
`use_canonize=True`) builds the graph in four steps, all reproduced here:

1. Every neighbour (j, image n) of every home atom i with 0.15 Å < d_ij <= r, where
   d_ij = |x_j + n·L − x_i| over the image grid of jarvis' `get_all_neighbors` (computed with the
   same floating-point operations, so ties are decided identically).
2. Cutoff growth: while some atom has fewer than k neighbours, r becomes max(a, b, c) if r is
   smaller than the longest lattice vector, else 2r.
3. k-NN with ties: atom i keeps every neighbour with d <= its k-th smallest distance.
4. Canonisation: a kept pair is stored once as (min(i, j), max(i, j), image) in a set, so a bond
   found from both ends counts once, then emitted in both directions. For a bond from an atom to
   its own image, both n and −n are in the set, so such a bond appears twice in each direction
   (one-atom cells: every bond is doubled), as in the reference.

Molecules (pbc all False) use no images. Departure (the reference has no molecular mode; it puts
molecules in a periodic box): growth doubles r, and an atom needs only min(k, N − 1) neighbours,
so a molecule of at most k + 1 atoms is a complete graph.

Edge order differs from the reference (a Python set's); the graph is the same multiset of
(sender, receiver, shift) and ALIGNN is invariant to the order.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

BOND_TOL = 0.15  # Å; jarvis `get_all_neighbors(bond_tol=0.15)`: closer pairs are not neighbours
_MIN_DISTANCE = 1e-8  # Å; jarvis' self-distance threshold
_MAX_PAIRS_PER_CHUNK = 2_000_000  # distances computed at once (memory bound of step 1)


class KnnNeighbors(NamedTuple):
    """Directed bonds of one structure (E edges), sorted by receiver, sender, shift.

    Same conventions as `neighbors.Neighbors`: the message of edge e flows from `senders[e]` to the
    centre atom `receivers[e]` (the reference's src -> dst).
    """

    receivers: np.ndarray  # [E] int64, centre atom i (the reference's dst)
    senders: np.ndarray  # [E] int64, neighbour atom j (the reference's src)
    distances: np.ndarray  # [E] float64, Å, |vectors|
    shifts: np.ndarray  # [E, 3] int64, image of j is at positions[j] + shifts @ cell
    vectors: np.ndarray  # [E, 3] float64, Å, positions[j] + shifts @ cell - positions[i]


def knn_neighbors(atoms: Any, *, cutoff: float = 8.0, max_neighbors: int = 12) -> KnnNeighbors:
    """ALIGNN's k-NN bond graph of an `ase.Atoms` (zoo-reference.md §1.2).

    Args:
      atoms: the structure; pbc all True (crystal) or all False (molecule).
      cutoff: initial search radius r in Å (the reference's default 8).
      max_neighbors: k (the reference's default 12).

    Returns:
      `KnnNeighbors`.

    Raises:
      ValueError: as `knn_from_arrays`.
    """
    return knn_from_arrays(atoms.positions, atoms.cell.array, atoms.pbc, cutoff=cutoff,
                           max_neighbors=max_neighbors)


def knn_from_arrays(
    positions: np.ndarray,
    cell: np.ndarray | None = None,
    pbc: Any = (False, False, False),
    *,
    cutoff: float = 8.0,
    max_neighbors: int = 12,
) -> KnnNeighbors:
    """`knn_neighbors` on plain arrays (picklable arguments, for worker pools).

    Args:
      positions: [N, 3] Cartesian coordinates, Å.
      cell: [3, 3] lattice vectors as rows, Å (ignored for molecules; may be None then).
      pbc: three bools, all True or all False.
      cutoff, max_neighbors: as in `knn_neighbors`.

    Raises:
      ValueError: no atoms, non-finite positions, mixed pbc, singular cell, cutoff <= 0,
        max_neighbors < 1, or a molecule with an atom that has no partner beyond 0.15 Å.
    """
    positions = np.asarray(positions, np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3 or positions.shape[0] == 0:
        raise ValueError(f"knn: positions must have shape [N>0, 3], got {positions.shape}")
    if not np.all(np.isfinite(positions)):
        raise ValueError("knn: non-finite position")
    if cutoff <= 0 or max_neighbors < 1:
        raise ValueError(f"knn: need cutoff > 0 and max_neighbors >= 1, got {cutoff}, {max_neighbors}")
    pbc = np.broadcast_to(np.asarray(pbc, bool), (3,))
    if pbc.any() != pbc.all():
        raise ValueError(f"knn: pbc must be all True or all False, got {pbc.tolist()}")
    if pbc.all():
        cell = np.asarray(cell, np.float64)
        if cell.shape != (3, 3) or abs(np.linalg.det(cell)) < 1e-9:
            raise ValueError("knn: a periodic structure needs a non-singular [3, 3] cell")
        i, j, shifts, d = _crystal_candidates(positions, cell, cutoff, max_neighbors)
    else:
        cell = np.zeros((3, 3))
        i, j, shifts, d = _molecule_candidates(positions, cutoff, max_neighbors)
    keep = d <= _kth_smallest(d, i, positions.shape[0], max_neighbors)[i]
    return _undirected(i[keep], j[keep], shifts[keep], positions, cell)


def _pairs_within(positions: np.ndarray, offsets: np.ndarray, images: np.ndarray, r: float):
    """(i, j, image, d) with BOND_TOL < d <= r, d = |offset + x_j - x_i|, jarvis' arithmetic."""
    n = positions.shape[0]
    lo, hi = positions.min(axis=0), positions.max(axis=0)
    gap = np.maximum(0.0, np.maximum(lo + offsets - hi, lo - hi - offsets))  # [M, 3] box-to-box distance
    near = np.sum(gap**2, axis=1) <= r * r  # images that can hold a pair within r (exact bound)
    offsets, images = offsets[near], images[near]
    out = []
    step = max(1, _MAX_PAIRS_PER_CHUNK // (n * n))
    for start in range(0, len(images), step):
        coords = offsets[start:start + step, None, :] + positions[None, :, :]  # [M, N(j), 3]
        z = (coords[:, :, None, :] - positions[None, None, :, :]) ** 2  # [M, N(j), N(i), 3]
        dist = np.sum(z, axis=-1) ** 0.5
        m, jj, ii = np.nonzero((dist <= r) & (dist > _MIN_DISTANCE) & (dist > BOND_TOL))
        out.append((ii, jj, images[start + m], dist[m, jj, ii]))
    return tuple(np.concatenate(parts) for parts in zip(*out))


def _crystal_candidates(positions, cell, cutoff, k):
    frac = positions @ np.linalg.inv(cell)
    lengths = np.linalg.norm(cell, axis=1)
    recip_lengths = np.linalg.norm(2 * np.pi * np.linalg.inv(cell).T, axis=1)
    r = cutoff
    while True:
        maxr = np.ceil((r + BOND_TOL) * recip_lengths / (2 * np.pi))
        nmin = np.floor(frac.min(axis=0)) - maxr
        nmax = np.ceil(frac.max(axis=0)) + maxr
        grid = np.meshgrid(*[np.arange(lo, hi) for lo, hi in zip(nmin, nmax)], indexing="ij")
        images = np.stack([g.ravel() for g in grid], axis=1)  # [M, 3] float, itertools.product order
        i, j, im, d = _pairs_within(positions, images @ cell, images, r)
        if np.bincount(i, minlength=len(positions)).min() >= k:
            return i, j, im.astype(np.int64), d
        r = lengths.max() if r < lengths.max() else 2 * r


def _molecule_candidates(positions, cutoff, k):
    n = positions.shape[0]
    need = min(k, n - 1)
    if need == 0:
        raise ValueError("knn: a molecule needs at least two atoms")
    r = cutoff
    extent = np.linalg.norm(positions.max(axis=0) - positions.min(axis=0))
    while True:
        i, j, im, d = _pairs_within(positions, np.zeros((1, 3)), np.zeros((1, 3)), r)
        if np.bincount(i, minlength=n).min() >= need:
            return i, j, im.astype(np.int64), d
        if r > extent:
            raise ValueError(f"knn: atom {np.argmin(np.bincount(i, minlength=n))} has no partner "
                             f"farther than {BOND_TOL} Å")
        r = 2 * r


def _kth_smallest(d: np.ndarray, i: np.ndarray, n: int, k: int) -> np.ndarray:
    """[N] the k-th smallest distance of each atom (the last one if it has fewer than k)."""
    order = np.lexsort((d, i))
    counts = np.bincount(i, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return d[order][starts + np.minimum(k, counts) - 1]


def _undirected(i, j, images, positions, cell) -> KnnNeighbors:
    """Canonical set of (min, max, image) keys, both directions of each (§1.2 steps 4-5)."""
    swap = j < i
    s = np.where(swap, j, i)
    t = np.where(swap, i, j)
    n = np.where(swap[:, None], -images, images)  # image of t relative to s
    keys = np.unique(np.column_stack([s, t, n]), axis=0)
    s, t, n = keys[:, 0], keys[:, 1], keys[:, 2:]
    # Edge s -> t (message into t): sender s at image -n relative to t; and t -> s with image n.
    senders = np.concatenate([s, t])
    receivers = np.concatenate([t, s])
    shifts = np.concatenate([-n, n])
    order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], senders, receivers))
    senders, receivers, shifts = senders[order], receivers[order], shifts[order]
    vectors = positions[senders] + shifts @ cell - positions[receivers]
    return KnnNeighbors(receivers=receivers, senders=senders, distances=np.linalg.norm(vectors, axis=1),
                        shifts=shifts, vectors=vectors)
