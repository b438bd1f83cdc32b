"""All neighbours within a cutoff radius: the atom graph of MEGNet and AMDNet (zoo-reference.md §2.5).

AMDNet's atom graph is pymatgen's `MinimumDistanceNNAll` with a 5 Å cutoff, i.e. every periodic
image of every atom within the cutoff of the centre (both directions, the centre itself excluded).
This module builds the same list with vectorised NumPy and a k-d tree, in the conventions of
`scannet_jax.neighbors.Neighbors` (receivers = centre atom i, senders = neighbour j, the image of j
at ``positions[j] + shifts @ cell``). NumPy only.
"""

from __future__ import annotations

from typing import NamedTuple

import ase
import numpy as np
from scipy.spatial import cKDTree

DEFAULT_CUTOFF = 5.0  # Å, AMDNet's atom_cutoff
_SELF_TOLERANCE = 1e-8  # Å; a pair this close is the centre itself


class RadiusNeighbors(NamedTuple):
    """Directed neighbour pairs within a cutoff, one row per edge, sorted by receiver, then distance."""

    receivers: np.ndarray  # [E] int64, centre atom i
    senders: np.ndarray  # [E] int64, neighbour atom j
    distances: np.ndarray  # [E] float64, Å, |r_j + shift @ cell - r_i|
    shifts: np.ndarray  # [E, 3] int64, image of j is at positions[j] + shifts @ cell


def radius_neighbors(atoms: ase.Atoms, *, cutoff: float = DEFAULT_CUTOFF) -> RadiusNeighbors:
    """Every neighbour within `cutoff` of every atom of `atoms`, periodic along its pbc axes.

    Args:
      atoms: the structure; periodic along the axes where ``atoms.pbc`` is True (a molecule when
        all are False).
      cutoff: radius in Å; pairs with distance <= cutoff are kept.

    Returns:
      The edges as `RadiusNeighbors`. An atom with no neighbour within the cutoff has no edge.

    Raises:
      ValueError: non-positive cutoff, or a periodic axis with a degenerate cell vector.
    """
    return radius_neighbors_from_arrays(atoms.get_positions(), np.asarray(atoms.cell[:]),
                                        np.asarray(atoms.pbc, bool), cutoff=cutoff)


def radius_neighbors_from_arrays(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, *,
                                 cutoff: float = DEFAULT_CUTOFF) -> RadiusNeighbors:
    """`radius_neighbors` on plain arrays.

    Args:
      positions: [N, 3] Cartesian coordinates in Å.
      cell: [3, 3] lattice vectors as rows, Å (ignored along non-periodic axes).
      pbc: [3] bool, periodic axes.
      cutoff: radius in Å.

    Returns:
      `RadiusNeighbors`, sorted by receiver, then distance, then sender.
    """
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    positions = np.asarray(positions, np.float64).reshape(-1, 3)
    cell = np.asarray(cell, np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, bool).reshape(3)
    # Wrap periodic coordinates into the home cell, remembering the integer offset of each atom.
    offsets = np.zeros((len(positions), 3), np.int64)
    if pbc.any():
        if abs(np.linalg.det(cell)) < 1e-12 and pbc.all():
            raise ValueError("periodic structure with a degenerate cell")
        frac = positions @ np.linalg.pinv(cell)
        offsets[:, pbc] = np.floor(frac[:, pbc]).astype(np.int64)
    home = positions - offsets @ cell
    images = _lattice_images(cell, pbc, cutoff)  # [K, 3]
    # Points of every image of every atom: point p = k * N + j.
    points = (home[None, :, :] + (images @ cell)[:, None, :]).reshape(-1, 3)
    pairs = cKDTree(home).sparse_distance_matrix(cKDTree(points), cutoff, output_type="ndarray")
    keep = pairs["v"] > _SELF_TOLERANCE
    receivers = pairs["i"][keep].astype(np.int64)
    image, senders = np.divmod(pairs["j"][keep].astype(np.int64), len(positions))
    distances = pairs["v"][keep]
    # In the caller's coordinates: r_j + s @ cell - r_i with s = image + offset_i - offset_j.
    shifts = images[image] + offsets[receivers] - offsets[senders]
    order = np.lexsort((senders, distances, receivers))
    return RadiusNeighbors(receivers[order], senders[order], distances[order], shifts[order])


def _lattice_images(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    """Integer image vectors [K, 3] covering every pair within `cutoff` of home-cell atoms.

    Along a periodic axis k, the lattice planes are 1/|b_k| apart (b the reciprocal vectors), and
    two home-cell atoms differ by less than one cell in fractional coordinates, so images up to
    ceil(cutoff |b_k|) + 1 cells away suffice.
    """
    reach = np.zeros(3, np.int64)
    if pbc.any():
        reciprocal = np.linalg.pinv(cell).T  # rows b_k, with a_i . b_k = δ_ik
        norms = np.linalg.norm(reciprocal, axis=1)
        if np.any(norms[pbc] == 0) or not np.all(np.isfinite(norms[pbc])):
            raise ValueError("periodic axis with a degenerate cell vector")
        reach[pbc] = np.ceil(cutoff * norms[pbc]).astype(np.int64) + 1
    axes = [np.arange(-r, r + 1) for r in reach]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
