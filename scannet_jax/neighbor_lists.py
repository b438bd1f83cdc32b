"""Nearest-neighbour lists and atom orderings: the input of the LSTM band-gap model (zoo-reference.md §3).

Per atom, the K = 19 nearest other atoms (periodic images included for crystals), sorted by
distance (§3.2 step 1), and the order of the atoms by fractional coordinates (§3.2 step 4). NumPy
only; `scannet_jax.lstm.NeighbourListLSTM` consumes the arrays of `pad_sequences`, and the
``neighbour_list`` graph builder (datasets/featurize.py) stores the lists as edges and the atom
orders of `setting_orders` as the extra set ``atom_orders``.

**Tie rule.** Distances are grouped into *shells*: sorted candidate distances of one centre atom
whose consecutive gaps are at most `tolerance` (1e-3 Å by default) belong to one shell
(single-linkage, so the grouping does not depend on where a rounding grid falls). Neighbours are
ordered by (shell, Z ascending, distance, atom index, lattice shift), and the first K are kept; a
shell cut by the K-th place therefore keeps its lowest-Z members. Shell and Z are functions of the
geometry alone, so the model input, the (Z, distance) sequence, is invariant to rotation,
translation, the choice of cell and the order of the atoms (up to distance noise below the
tolerance). The last two keys only decide which of several neighbours with the same Z in the same
shell is reported in `indices` / `shifts`; the model cannot tell them apart.

**Fill.** A molecule with fewer than K other atoms lists all of them; the remaining places have
`mask` False, index -1, distance 0 and shift 0, and `sequence_inputs` writes Z = 0 there (0 is the
padding element everywhere in this project), which the model treats as the end of the sequence.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple, Sequence

import numpy as np

from scannet_jax.neighbors import MIN_DISTANCE
from scannet_jax.radius_graph import RadiusNeighbors, radius_neighbors_from_arrays

NUM_NEIGHBOURS = 19  # §3.2 step 1: "the 19 atoms nearest to the atom"
TIE_TOLERANCE = 1e-3  # Å, largest gap between distances of one shell
MOLECULE_RADIUS = 5.0  # Å, first search radius for molecules (grown by 1.5x until the lists are exact)
FRACTIONAL_TOLERANCE = 1e-6  # fractional coordinates closer than this count as equal in the ordering
IDENTITY = (0, 1, 2)
# §3.3 augmentation: the original setting and the xy, yz and xz swaps of the lattice axes.
AXIS_SWAPS = (IDENTITY, (1, 0, 2), (0, 2, 1), (2, 1, 0))
AXIS_PERMUTATIONS = tuple(itertools.permutations(range(3)))  # all six, for the sensitivity measurement
NUM_SETTINGS_MAX = len(AXIS_PERMUTATIONS)  # most settings a structure can have stored
# Which axis permutations a ``neighbour_list`` store keeps the atom orders of (`setting_orders`).
SETTINGS = {"original": (IDENTITY,), "swaps": AXIS_SWAPS, "permutations": AXIS_PERMUTATIONS}
ATOM_ORDERS = "atom_orders"  # the store's extra set of atom orders (datasets/featurize.py)


class NeighbourLists(NamedTuple):
    """The K nearest neighbours of each of the N atoms of one structure."""

    indices: np.ndarray  # [N, K] int64, atom index of each neighbour; -1 on fill
    distances: np.ndarray  # [N, K] float64, Å, |r_j + shift @ cell - r_i|; 0 on fill
    shifts: np.ndarray  # [N, K, 3] int64, lattice image of j (0 for molecules and on fill)
    mask: np.ndarray  # [N, K] bool, False on fill (molecules with fewer than K other atoms)


class SequenceInputs(NamedTuple):
    """One structure as the LSTM model reads it: atoms in model order, their neighbour lists."""

    atomic_numbers: np.ndarray  # [N] int32, Z of the atoms in model order
    neighbour_numbers: np.ndarray  # [N, K] int32, Z of the neighbours, distance-sorted; 0 on fill
    neighbour_distances: np.ndarray  # [N, K] float32, Å; 0 on fill
    order: np.ndarray  # [N] int64, original index of the atom in each row


def neighbour_lists(atoms: Any, *, num_neighbours: int = NUM_NEIGHBOURS,
                    tolerance: float = TIE_TOLERANCE) -> NeighbourLists:
    """`nearest_neighbour_lists` of an `ase.Atoms`."""
    return nearest_neighbour_lists(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc,
                                   num_neighbours=num_neighbours, tolerance=tolerance)


def nearest_neighbour_lists(
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray | None = None,
    pbc: Any = (False, False, False),
    *,
    num_neighbours: int = NUM_NEIGHBOURS,
    tolerance: float = TIE_TOLERANCE,
) -> NeighbourLists:
    """The `num_neighbours` nearest other atoms of every atom, ties broken by the module's rule.

    Crystals: every periodic image counts (also images of the atom itself). The lists are exact:
    every atom and image within a search radius (`radius_graph.radius_neighbors_from_arrays`) is
    a candidate, and the radius grows by 1.5x until, for every atom, the shell of the K-th neighbour
    is closed by a farther candidate inside it (or, in a molecule, every other atom is in).

    The arguments are the fields of `structures.Structure` in order, so
    ``nearest_neighbour_lists(*structure)`` works.

    Args:
      numbers: [N] atomic numbers (the tie rule uses them).
      positions: [N, 3] Cartesian coordinates, Å.
      cell: [3, 3] lattice vectors as rows, Å (crystals; ignored for molecules).
      pbc: three bools, all False (molecule) or all True (crystal).
      num_neighbours: K.
      tolerance: largest distance gap within a shell, Å.

    Returns:
      `NeighbourLists`; row i lists atom i's neighbours in the module's order.

    Raises:
      ValueError: bad shapes, no atoms, non-finite positions, mixed pbc, singular cell, or two
        atoms (or an atom and an image) closer than `neighbors.MIN_DISTANCE` (except exactly
        coincident ones, under 1e-8 Å, which the radius search drops as the atom itself).
    """
    numbers, positions, cell, periodic = _validate(numbers, positions, cell, pbc)
    n = len(numbers)
    if periodic:
        # Radius of a sphere holding K + 1 atoms at the crystal's mean density, with a margin.
        radius = 1.5 * (3 * (num_neighbours + 1) * abs(np.linalg.det(cell)) / (4 * np.pi * n)) ** (1 / 3)
    else:
        radius = MOLECULE_RADIUS
    while True:
        pairs = radius_neighbors_from_arrays(positions, cell, np.full(3, periodic), cutoff=radius)
        dist, idx, shifts = _rows(pairs, n)
        exhausted = np.zeros(n, bool) if periodic else np.isfinite(dist).sum(1) == n - 1
        keep, shell, closed = _shells(dist, num_neighbours, tolerance, exhausted)
        if closed.all():
            break
        radius *= 1.5  # some K-th shell may continue past the radius
    z = np.where(keep, numbers[idx], 0)
    order = np.lexsort((shifts[..., 2], shifts[..., 1], shifts[..., 0], idx, np.where(keep, dist, 0.0), z,
                        np.where(keep, shell, np.iinfo(np.int64).max)), axis=-1)[:, :num_neighbours]
    width = order.shape[1]
    mask = np.zeros((n, num_neighbours), bool)
    mask[:, :width] = np.take_along_axis(keep, order, axis=1)
    indices = np.full((n, num_neighbours), -1, np.int64)
    indices[:, :width] = np.take_along_axis(idx, order, axis=1)
    indices[~mask] = -1
    out_shifts = np.zeros((n, num_neighbours, 3), np.int64)
    out_shifts[:, :width] = np.take_along_axis(shifts, order[..., None], axis=1)
    out_shifts[~mask] = 0
    vectors = positions[np.maximum(indices, 0)] + out_shifts @ cell - positions[:, None, :]
    distances = np.where(mask, np.linalg.norm(vectors, axis=-1), 0.0)
    close = np.argwhere(mask & (distances < MIN_DISTANCE))
    if len(close):
        i, c = close[0]
        raise ValueError(f"atoms {i} and {indices[i, c]} (image {out_shifts[i, c].tolist()}) are "
                         f"{distances[i, c]:.3g} Å apart (< {MIN_DISTANCE} Å)")
    return NeighbourLists(indices, distances, out_shifts, mask)


def _validate(numbers: Any, positions: Any, cell: Any, pbc: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    numbers = np.asarray(numbers, np.int64)
    positions = np.asarray(positions, np.float64)
    if numbers.ndim != 1 or positions.shape != (len(numbers), 3):
        raise ValueError(f"numbers [N] and positions [N, 3] expected, got {numbers.shape} and {positions.shape}")
    if len(numbers) == 0:
        raise ValueError("structure has no atoms")
    if not np.isfinite(positions).all():
        raise ValueError(f"atom {np.flatnonzero(~np.isfinite(positions).all(1))[0]}: non-finite position")
    pbc = np.broadcast_to(np.asarray(pbc, bool), (3,))
    if pbc.any() and not pbc.all():
        raise ValueError(f"pbc {tuple(bool(p) for p in pbc)} is not supported: all False (molecule) or all True")
    periodic = bool(pbc.all())
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64).reshape(3, 3)
    if periodic:
        volume = abs(np.linalg.det(cell)) if np.isfinite(cell).all() else 0.0
        if volume < 1e-6 * max(np.linalg.norm(cell, axis=1).prod(), 1e-300):
            raise ValueError(f"periodic cell is singular or non-finite: {cell.tolist()}")
    return numbers, positions, cell, periodic


def _rows(pairs: RadiusNeighbors, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges sorted by receiver, then distance, as padded rows: distances [N, W] (inf on padding),
    neighbour indices [N, W] (0 on padding) and shifts [N, W, 3], W the largest neighbour count."""
    counts = np.bincount(pairs.receivers, minlength=n)
    width = int(counts.max()) if len(pairs.receivers) else 0
    column = np.arange(len(pairs.receivers)) - np.repeat(np.cumsum(counts) - counts, counts)
    dist = np.full((n, width), np.inf)
    idx = np.zeros((n, width), np.int64)
    shifts = np.zeros((n, width, 3), np.int64)
    dist[pairs.receivers, column] = pairs.distances
    idx[pairs.receivers, column] = pairs.senders
    shifts[pairs.receivers, column] = pairs.shifts
    return dist, idx, shifts


def _shells(dist: np.ndarray, k: int, tolerance: float, exhausted: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which candidates may enter the lists, and whether each row's K-th shell is known to be complete.

    Args:
      dist: [N, W] sorted candidate distances per centre (every atom and image within the search
        radius), inf on padding.
      k: K.
      tolerance: shell gap, Å.
      exhausted: [N] True where every other atom is a candidate (molecules), so nothing is missing.

    Returns:
      keep [N, W] (candidates in the shells up to that of the K-th), shell [N, W] (shell number of
      each candidate, 0 for the nearest), closed [N].
    """
    finite = np.isfinite(dist)
    shell = np.cumsum(np.diff(np.where(finite, dist, 0.0), prepend=0.0, axis=1) > tolerance, axis=1)
    if dist.shape[1] < k:
        return finite, shell, exhausted
    last = shell[:, k - 1]
    enough = finite[:, k - 1]
    keep = finite & (~enough[:, None] | (shell <= last[:, None]))
    closed = (enough & (finite & (shell > last[:, None])).any(axis=1)) | exhausted
    return keep, shell, closed


def atom_order(positions: np.ndarray, cell: np.ndarray | None, pbc: Any, axes: Sequence[int] = IDENTITY,
               tolerance: float = FRACTIONAL_TOLERANCE) -> np.ndarray:
    """The source's atom order (§3.2 step 4): fractional coordinates ascending, lexicographically.

    Crystals: fractional coordinates wrapped into [0, 1), compared first on axis `axes[0]`, then
    `axes[1]`, then `axes[2]`; values closer than `tolerance` count as equal (rounded to that grid,
    1 - ε wraps to 0). `axes` is the lattice-axis permutation of a setting (`equivalent_settings`):
    swapping two lattice vectors and the matching fractional coordinates leaves every Cartesian
    position unchanged and only reorders the keys. Molecules (extension; the source has crystals
    only): the Cartesian coordinates in Å, same rule; the order then depends on orientation, as the
    crystal order depends on the setting and on the origin (experiments/lstm_sensitivity.py
    measures both effects on the model).

    Args:
      positions: [N, 3] Cartesian coordinates, Å.
      cell: [3, 3] lattice vectors as rows, Å (crystals).
      pbc: all True (crystal) or all False (molecule).
      axes: the permutation of the lattice axes.
      tolerance: equality tolerance of the keys (fractional for crystals, Å for molecules).

    Returns:
      [N] int64, the atom index in each place.
    """
    positions = np.asarray(positions, np.float64)
    if np.asarray(pbc, bool).all():
        coords = positions @ np.linalg.inv(np.asarray(cell, np.float64).reshape(3, 3))
        steps = round(1 / tolerance)
        keys = np.round((coords - np.floor(coords)) * steps).astype(np.int64) % steps
    else:
        keys = np.round(positions / tolerance).astype(np.int64)
    axes = list(axes)
    return np.lexsort((np.arange(len(positions)), keys[:, axes[2]], keys[:, axes[1]], keys[:, axes[0]]))


def sequence_inputs(numbers: np.ndarray, lists: NeighbourLists, order: np.ndarray) -> SequenceInputs:
    """The model's arrays of one structure: rows in `order`, neighbours as (Z, distance), Z 0 on fill.

    Args:
      numbers: [N] atomic numbers.
      lists: the structure's `NeighbourLists` (the same for every setting of a crystal).
      order: [N] atom order (`atom_order`).
    """
    numbers = np.asarray(numbers, np.int32)
    neighbour_numbers = np.where(lists.mask, numbers[np.maximum(lists.indices, 0)], 0).astype(np.int32)
    return SequenceInputs(numbers[order], neighbour_numbers[order],
                          lists.distances[order].astype(np.float32), np.asarray(order, np.int64))


def equivalent_settings(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray,
                        permutations: Sequence[Sequence[int]] = AXIS_SWAPS, *,
                        tolerance: float = FRACTIONAL_TOLERANCE) -> list[tuple[int, int, int]]:
    """The distinct settings of a crystal among those made by permuting its lattice axes (§3.3).

    A setting with permutation p has lattice vectors `cell[p]` and fractional coordinates
    `frac[:, p]`: the same crystal, atoms at the same Cartesian positions. Two settings are
    identical when their metric tensors agree (relative 1e-6) and their sets of (Z, fractional
    coordinates mod 1) agree within `tolerance`; the model sees the same input for both. The
    source drops settings identical to the original; this drops every setting identical to an
    earlier one in `permutations` (the same when the first is the identity; it also keeps
    test-time averages from counting one setting twice).

    Args:
      numbers: [N] atomic numbers.
      positions: [N, 3] Cartesian coordinates, Å.
      cell: [3, 3] lattice vectors as rows, Å.
      permutations: candidate axis permutations, e.g. `AXIS_SWAPS` (the source's) or
        `AXIS_PERMUTATIONS`.
      tolerance: fractional-coordinate tolerance.

    Returns:
      The kept permutations, in the given order.
    """
    numbers = np.asarray(numbers)
    cell = np.asarray(cell, np.float64).reshape(3, 3)
    frac = np.asarray(positions, np.float64) @ np.linalg.inv(cell)
    metric = cell @ cell.T
    kept: list[tuple[int, int, int]] = []
    for perm in map(tuple, permutations):
        p = list(perm)
        if not any(_same_setting(metric, numbers, frac, p, list(q), tolerance) for q in kept):
            kept.append(perm)  # type: ignore[arg-type]
    return kept


def _same_setting(metric: np.ndarray, numbers: np.ndarray, frac: np.ndarray, p: list[int], q: list[int],
                  tolerance: float) -> bool:
    if not np.allclose(metric[np.ix_(p, p)], metric[np.ix_(q, q)], rtol=0, atol=1e-6 * np.abs(metric).max()):
        return False
    diff = frac[:, None, p] - frac[None, :, q]  # [N, N, 3]
    diff -= np.round(diff)
    match = (np.abs(diff) <= tolerance).all(-1) & (numbers[:, None] == numbers[None, :])
    return bool(match.any(axis=1).all() and match.any(axis=0).all())


def average_over_settings(predictions: np.ndarray, structure_index: np.ndarray, num_structures: int
                          ) -> np.ndarray:
    """Test-time averaging: the mean prediction over the settings of each structure.

    Args:
      predictions: [S] one prediction per setting.
      structure_index: [S] int, the structure each setting belongs to.
      num_structures: number of structures.

    Returns:
      [num_structures] float64 means (NaN for a structure without settings).
    """
    counts = np.bincount(structure_index, minlength=num_structures)
    sums = np.bincount(structure_index, weights=np.asarray(predictions, np.float64), minlength=num_structures)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def setting_orders(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray | None, pbc: Any,
                   permutations: Sequence[Sequence[int]] = (IDENTITY,)
                   ) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The atom orders of a structure's distinct settings, one after the other (a store's ``atom_orders``).

    Crystals: the settings kept by `equivalent_settings` among `permutations` (the first, normally
    the identity, always kept); molecules have one setting, the Cartesian order (`atom_order`).

    Args:
      numbers: [N] atomic numbers.
      positions: [N, 3] Cartesian coordinates, Å.
      cell: [3, 3] lattice vectors as rows, Å (crystals).
      pbc: all True (crystal) or all False (molecule).
      permutations: candidate axis permutations (`SETTINGS`).

    Returns:
      ([T * N] int64 atom indices, the T kept permutations).
    """
    if np.asarray(pbc, bool).all():
        kept = equivalent_settings(numbers, positions, cell, permutations)
    else:
        kept = [tuple(permutations[0])]  # type: ignore[list-item]
    return np.concatenate([atom_order(positions, cell, pbc, p) for p in kept]), kept


def pad_sequences(structures: Sequence[SequenceInputs], num_atoms: int, num_graphs: int | None = None
                  ) -> dict[str, np.ndarray]:
    """Stacks structures into `lstm.NeighbourListLSTM`'s inputs (one sequence per structure).

    Structure g's atoms (already in model order) take rows g * A .. g * A + n_g - 1 of the flat
    atom arrays; the sequences of `sequence` list them one structure after the other.

    Args:
      structures: the batch's structures.
      num_atoms: A, the atom bucket of one structure (at least the largest structure's atom count).
      num_graphs: G (at least len(structures)); defaults to len(structures). Extra rows are empty.

    Returns:
      `atomic_numbers` [G * A] int32, `neighbour_numbers` [G * A, K] int32, `neighbour_distances`
      [G * A, K] float32 (Å), all 0 on padding; `sequence` [G * A] int32 (0 after the last real
      atom), `sequence_lengths` [G] int32.

    Raises:
      ValueError: a structure has more than `num_atoms` atoms, or more structures than `num_graphs`.
    """
    num_graphs = len(structures) if num_graphs is None else num_graphs
    if len(structures) > num_graphs:
        raise ValueError(f"{len(structures)} structures do not fit in {num_graphs} graphs")
    k = structures[0].neighbour_numbers.shape[1] if structures else NUM_NEIGHBOURS
    size = num_graphs * num_atoms
    batch = {"atomic_numbers": np.zeros(size, np.int32),
             "neighbour_numbers": np.zeros((size, k), np.int32),
             "neighbour_distances": np.zeros((size, k), np.float32),
             "sequence": np.zeros(size, np.int32),
             "sequence_lengths": np.zeros(num_graphs, np.int32)}
    for g, s in enumerate(structures):
        n = len(s.atomic_numbers)
        if n > num_atoms:
            raise ValueError(f"structure {g} has {n} atoms, more than the bucket's {num_atoms}")
        rows = slice(g * num_atoms, g * num_atoms + n)
        batch["atomic_numbers"][rows] = s.atomic_numbers
        batch["neighbour_numbers"][rows] = s.neighbour_numbers
        batch["neighbour_distances"][rows] = s.neighbour_distances
        batch["sequence_lengths"][g] = n
    places = np.concatenate([np.arange(g * num_atoms, g * num_atoms + len(s.atomic_numbers))
                             for g, s in enumerate(structures)] + [np.zeros(0, np.int64)])
    batch["sequence"][:len(places)] = places
    return batch
