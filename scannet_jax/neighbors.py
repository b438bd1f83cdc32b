"""Voronoi neighbours of atoms: the input graph of SCANN (scann-reference.md §1).

Two definitions (`mode`):

* ``"exact"`` (default, §1.2): the Voronoi diagram of the structure itself. A molecule
  (pbc all False) is tessellated as a finite point set: no periodic images, every facet
  between two atoms is kept, and the solid angle of an unbounded facet is computed exactly
  (it is finite). A crystal (pbc all True) uses the Voronoi cell of the infinite periodic
  structure, built from every image that can bound a cell (see `_crystal_points`). Each cell's
  solid angles are the normal-cone solid angles of one convex hull, that of the cell's polar
  dual (`_cone_solid_angles`), so degenerate (symmetric) input needs no topological decision.
* ``"original"`` (§1.1): the original's pymatgen `VoronoiNN` procedure, bugs included
  (float32 cast, 10 Å box for molecules, cutoff sphere of 7 Å with its retries, unbounded facets
  dropped). Kept to reproduce `shared/fixtures/neighbours*.npz` and models trained on them.

See docs/neighbors.md for the definitions, error bounds and how the modes differ.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
from scipy.spatial import ConvexHull, Voronoi

NEIGHBORS_VERSION = 4  # 1: first exact mode (10d2cc2); 2: missed facets beyond the ghost points;
# 3: ghosts + check at infinity + clipping (wrong on symmetric molecules); 4: one dual hull per cell
MODES = ("exact", "original")
MAX_ATOMIC_NUMBER = 94
MIN_DISTANCE = 0.1  # Å; closer atoms are rejected
# Exact mode. A facet with Ω below ZERO_FACET is not a facet (the zero-area rule: facets that
# degenerate to a point or a segment come out at rounding level, ~1e-15 sr, in any orientation).
ZERO_FACET = 1e-9  # sr
# A value within TIE_TOLERANCE of a threshold (Ω = w_t, ρ = ρ_t, d = d_t) counts as on it and is
# kept, so that rounding in a rotated copy cannot move a symmetric structure's edge across it.
TIE_TOLERANCE = 1e-9  # sr for Ω, 1 for ρ, Å for d
# A molecule is planar (linear) when its third (second) singular value is below _FLAT times the
# first; it is then handled in its plane (on its line). Ω moves by O(_FLAT) sr across the switch.
_FLAT = 1e-10
_CHECK_TOLERANCE = 1e-9  # sr, the per-cell 4π check (`_check_cells`)
# Memory (docs/neighbors.md, "Memory"): a cell whose every-site list (all atoms of a molecule, every
# image within D of a crystal's atom) has at most _EXHAUSTIVE points uses it, as version 4 did
# (same bits); larger structures build each cell from a certified candidate list (`_certified_cell`).
# Cells are processed _BATCH_POINTS dual points at a time, so temporaries do not grow with N².
_EXHAUSTIVE = 256
_FIRST_CANDIDATES = 48  # a certified list starts from the sites within the distance of this many
_BATCH_POINTS = 1 << 16
_VERTEX_MARGIN = 1e-9  # relative: a cell vertex's ball is searched this much larger
_CONE_TOLERANCE = 1e-12  # relative: a site this close to a recession face's plane is on it
_MAX_ROUNDS = 8  # rounds of adding candidates before a cell falls back to every site
_THIN = 1e-6  # relative thickness below which a candidate list is too flat for its hull (radius doubles)


class Neighbors(NamedTuple):
    """Directed Voronoi edges of one structure (E edges), sorted by receiver (stable)."""

    receivers: np.ndarray  # [E] int64, centre atom i (the attention query)
    senders: np.ndarray  # [E] int64, neighbour atom j (the key)
    distances: np.ndarray  # [E] float64, Å, |r_j + shift @ cell - r_i|
    solid_angles: np.ndarray  # [E] float64, Ω_ij in sr
    weights: np.ndarray  # [E] float64, ρ_ij = Ω_ij / max_k Ω_ik
    shifts: np.ndarray  # [E, 3] int64, image of j is at positions[j] + shifts @ cell


@dataclasses.dataclass(frozen=True)
class FeaturizerSettings:
    """What a neighbour cache is keyed by (the arguments of `voronoi_neighbors`)."""

    mode: str = "exact"
    cutoff: float = 4.0  # Å
    min_solid_angle: float = 0.4  # sr
    min_relative_weight: float = 0.2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"FeaturizerSettings: mode must be one of {MODES}, got {self.mode!r}")

    def key(self) -> str:
        """Stable directory name, e.g. ``nb2-exact-d4-w0.4-r0.2`` (includes NEIGHBORS_VERSION)."""
        return (f"nb{NEIGHBORS_VERSION}-{self.mode}-d{self.cutoff:g}-w{self.min_solid_angle:g}"
                f"-r{self.min_relative_weight:g}")


def voronoi_neighbors(
    atoms: Any,
    *,
    cutoff: float = 4.0,
    min_solid_angle: float = 0.4,
    min_relative_weight: float = 0.2,
    mode: str = "exact",
) -> Neighbors:
    """Voronoi neighbours of every atom of an `ase.Atoms` (scann-reference.md §1).

    An edge i <- j (image `shift` of j) is kept when atoms i and j share a Voronoi facet with
    solid angle Ω_ij >= `min_solid_angle` seen from i, relative weight
    ρ_ij = Ω_ij / max_k Ω_ik >= `min_relative_weight` (maximum over all facets of i's cell) and
    distance d_ij <= `cutoff`.

    Args:
      atoms: the structure; pbc must be all False (molecule) or all True (crystal).
      cutoff: d_t in Å.
      min_solid_angle: w_t in sr.
      min_relative_weight: floor on ρ.
      mode: "exact" or "original" (module docstring).

    Returns:
      `Neighbors`, sorted by receiver, then sender, then shift. Exact mode: molecules have no
      image edges (shifts 0); Ω is a continuous function of the positions computed to rounding
      (~1e-14 sr), the same in every orientation, origin and atom order; facets below
      ZERO_FACET sr are not facets, and values within TIE_TOLERANCE of a threshold are kept
      (docs/neighbors.md). Original mode: distances use the float32-rounded positions, and for a
      molecule `shifts` refer to the original's box diag(max(10, extent + 0.1)) Å, not to
      `atoms.cell`.

    A left-handed cell (det < 0) is a valid lattice: the edges are those of the same crystal
    given with a right-handed cell (same receivers, senders, image vectors ``shifts @ cell``,
    distances, Ω and ρ; edges between the same two atoms may come in another order, as the
    shifts refer to the cell given). A one-atom cell has only image edges (bcc Fe: 14 edges,
    all i = j = 0).

    Raises:
      ValueError: empty structure, non-finite position, Z outside 1..94, two atoms closer than
        0.1 Å (in a crystal also across a cell boundary: names both atoms and the image),
        mixed pbc, singular cell (zero volume), unknown mode; exact mode, a cell that fails its
        4π check (names the formula and the atom; not seen on any input so far).
    """
    return neighbors_from_arrays(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc,
                                 cutoff=cutoff, min_solid_angle=min_solid_angle,
                                 min_relative_weight=min_relative_weight, mode=mode)


def neighbors_from_arrays(
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray | None = None,
    pbc: Any = (False, False, False),
    *,
    cutoff: float = 4.0,
    min_solid_angle: float = 0.4,
    min_relative_weight: float = 0.2,
    mode: str = "exact",
) -> Neighbors:
    """`voronoi_neighbors` on plain arrays (picklable arguments, for worker pools).

    Args:
      numbers: [N] atomic numbers.
      positions: [N, 3] Cartesian coordinates, Å.
      cell: [3, 3] lattice vectors as rows, Å (ignored for molecules; may be None then).
      pbc: three bools, all False or all True.
      cutoff, min_solid_angle, min_relative_weight, mode: as in `voronoi_neighbors`.
    """
    numbers, positions, cell, periodic = _validate(numbers, positions, cell, pbc, mode)
    if mode == "exact":
        ridges = _exact_crystal(numbers, positions, cell) if periodic else _exact_molecule(numbers, positions)
        return _select(ridges, positions, cell, cutoff, min_solid_angle, min_relative_weight, TIE_TOLERANCE)
    positions, cell, ridges = _original_facets(positions, cell, periodic)
    return _select(ridges, positions, cell, cutoff, min_solid_angle, min_relative_weight, 0.0)


class Facets(NamedTuple):
    """All facets of the cells of the home atoms (F directed facets, unfiltered)."""

    centers: np.ndarray  # [F] int64, i
    neighbors: np.ndarray  # [F] int64, j
    shifts: np.ndarray  # [F, 3] int64, lattice image of j
    solid_angles: np.ndarray  # [F] float64, sr


def _validate(numbers: Any, positions: Any, cell: Any, pbc: Any, mode: str
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    numbers = np.asarray(numbers)
    positions = np.asarray(positions, np.float64)
    if numbers.ndim != 1 or positions.shape != (len(numbers), 3):
        raise ValueError(f"numbers [N] and positions [N, 3] expected, got {numbers.shape} and {positions.shape}")
    if len(numbers) == 0:
        raise ValueError("structure has no atoms")
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if len(bad):
        raise ValueError(f"atom {bad[0]}: non-finite position {positions[bad[0]].tolist()}")
    bad = np.flatnonzero((numbers < 1) | (numbers > MAX_ATOMIC_NUMBER))
    if len(bad):
        raise ValueError(f"atom {bad[0]}: atomic number {numbers[bad[0]]} outside 1..{MAX_ATOMIC_NUMBER}")
    pbc = np.broadcast_to(np.asarray(pbc, bool), (3,))
    if pbc.any() and not pbc.all():
        raise ValueError(f"pbc {tuple(bool(p) for p in pbc)} is not supported: a structure is either a molecule "
                         "(all False) or a 3-D crystal (all True); slabs and wires have no defined Voronoi "
                         "cell convention here")
    periodic = bool(pbc.all())
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64).reshape(3, 3)
    if periodic:
        if not np.isfinite(cell).all():
            raise ValueError(f"cell has non-finite entries: {cell.tolist()}")
        volume = abs(np.linalg.det(cell))
        if volume < 1e-6 * max(np.linalg.norm(cell, axis=1).prod(), 1e-300):
            raise ValueError(f"periodic cell is singular (volume {volume:.3g} Å^3; a crystal needs three linearly "
                             f"independent lattice vectors): {cell.tolist()}")
        _check_close_images(positions, cell)
    else:
        _check_close_pairs(positions)
    return numbers, positions, cell, periodic


def _check_close_pairs(positions: np.ndarray) -> None:
    """Raises naming the first pair of atoms closer than MIN_DISTANCE (molecules)."""
    if len(positions) < 2:
        return
    from scipy.spatial import cKDTree
    pairs = cKDTree(positions).query_pairs(MIN_DISTANCE, output_type="ndarray")
    if len(pairs):
        i, j = sorted(pairs[np.lexsort(pairs.T[::-1])][0])
        d = np.linalg.norm(positions[i] - positions[j])
        raise ValueError(f"atoms {i} and {j} are {d:.3g} Å apart (< {MIN_DISTANCE} Å)")


def _check_close_images(positions: np.ndarray, cell: np.ndarray) -> None:
    """Raises naming the first pair of sites (i <= j, then the closest image) closer than
    MIN_DISTANCE in any images (crystals).

    The sites wrapped into the Minkowski-reduced cell are queried against their images in that
    cell and its 26 neighbours with a KD-tree (time and memory linear in N; the [N, N, 27]
    distances it replaces took 150 MiB at 300 atoms, 1.7 GB at 1,000).
    """
    from ase.geometry import minkowski_reduce
    from scipy.spatial import cKDTree

    n = len(positions)
    reduced, op = minkowski_reduce(cell)
    frac = positions @ np.linalg.inv(reduced)
    home = np.floor(frac)
    wrapped = (frac - home) @ reduced
    grid = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    images = (wrapped[None] + (grid @ reduced)[:, None]).reshape(-1, 3)  # [27 N, 3], image g of j at g N + j
    close = cKDTree(wrapped).sparse_distance_matrix(cKDTree(images), MIN_DISTANCE, output_type="ndarray")
    i, j, g = close["i"], close["j"] % n, close["j"] // n
    keep = (i <= j) & (close["v"] < MIN_DISTANCE) & ~((i == j) & (g == 13))  # grid[13] = 0: i itself
    if keep.any():
        k = np.flatnonzero(keep)[np.lexsort((close["v"][keep], j[keep], i[keep]))[0]]
        shift = (home[i[k]] - home[j[k]] + grid[g[k]]).astype(int) @ op
        raise ValueError(f"atoms {i[k]} and {j[k]} (image {shift.tolist()}) are {close['v'][k]:.3g} Å apart "
                         f"(< {MIN_DISTANCE} Å)")

def _exact_molecule(numbers: np.ndarray, positions: np.ndarray) -> Facets:
    """Facets of the Voronoi diagram of the atoms alone (no images), from one dual hull per atom.

    Coordinates are taken in the molecule's principal axes: a molecule planar or linear to
    `_FLAT` (relative singular values of its centred coordinates) is handled in its plane or on
    its line, and the singular values whiten the hulls whose faces Qhull finds (their angles are
    measured unscaled; `_cone_solid_angles`). Each cell's hull is built from every atom when the
    molecule has at most `_EXHAUSTIVE` atoms or is flat (in batches of rows, `_BATCH_POINTS`
    dual points at a time), otherwise from a certified candidate list (`_certified_cell`). Each
    cell is checked against the molecule's own convex hull (`_check_cells`).
    """
    n = len(positions)
    if n == 1:
        return _no_facets()
    rel = positions - positions.mean(axis=0)
    _, sigma, axes = np.linalg.svd(rel, full_matrices=False)
    dim = int((sigma > _FLAT * sigma[0]).sum())
    coords = rel @ axes[:dim].T  # [N, dim], principal axes
    scale = sigma[:dim]
    at_infinity = _cone_solid_angles(coords, np.array([0, n]), scale)  # the recession cone of every cell
    if dim == 3 and n > _EXHAUSTIVE:
        center, member, omega = _certified_molecule_cells(coords, scale)
        itself = member == center
        _check_cells(numbers, np.bincount(center[~itself], omega[~itself], n), omega[itself], at_infinity)
        keep = ~itself & (omega >= ZERO_FACET)
        return Facets(center[keep], member[keep], np.zeros((int(keep.sum()), 3), np.int64), omega[keep])
    rows = max(1, _BATCH_POINTS // n)
    facets, origin, parts = np.zeros(n), np.zeros(n), []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        offset = coords[None, :, :] - coords[start:stop, None, :]  # [B, N, dim], r_k - r_i
        square = np.einsum("ikd,ikd->ik", offset, offset)
        square[np.arange(stop - start), np.arange(start, stop)] = 1.0
        dual = 2 * offset / square[..., None]  # dual[i, i] = 0: the centre is the origin of its polytope
        block = _cone_solid_angles(dual.reshape(-1, dim), np.arange(0, (stop - start) * n + 1, n),
                                   scale).reshape(stop - start, n)
        origin[start:stop] = block[np.arange(stop - start), np.arange(start, stop)]
        facets[start:stop] = block.sum(axis=1) - origin[start:stop]
        i, j = np.nonzero(block >= ZERO_FACET)
        i += start
        off = i != j
        parts.append((i[off], j[off], block[i[off] - start, j[off]]))
    _check_cells(numbers, facets, origin, at_infinity)
    i, j, omega = (np.concatenate(x) for x in zip(*parts))
    return Facets(i.astype(np.int64), j.astype(np.int64), np.zeros((len(i), 3), np.int64), omega)


def _certified_molecule_cells(coords: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal-cone solid angles of every cell of a 3-D molecule from certified candidate lists.

    Each cell starts from the atoms within the distance of its `_FIRST_CANDIDATES`-th nearest
    atom; `_certified_cell` adds atoms until no atom outside the list can change the dual hull,
    or falls back to every atom. The molecule's hull vertices generate the cone that holds every
    r_k - r_i, which the cells on its surface need (their recession cones).

    Args:
      coords: [N, 3] principal-axis coordinates, Å; scale: [3] their singular values.

    Returns:
      centre [C], member [C] (atom indices, sorted by centre then member) and Ω [C] in sr, over
      every cell's candidates (the centre itself included: Ω there is the cell's recession cone).
    """
    from scipy.spatial import cKDTree

    n = len(coords)
    tree = cKDTree(coords)
    first = tree.query(coords, min(_FIRST_CANDIDATES, n))[0][:, -1]  # [N] Å
    surface = ConvexHull(coords / scale).vertices
    batch = _DefectBatch()
    for i in range(n):
        cone = surface[surface != i]
        cell = _certified_cell(coords, tree, i, float(first[i]), np.inf, scale, coords[cone] - coords[i], cone)
        if cell is None:
            members = np.arange(n)
            dual = _molecule_dual(coords, i, members)
            cell = members, dual, ConvexHull(dual / scale, qhull_options="Qt").simplices
        batch.add(i, *cell)
    return batch.result()


def _molecule_dual(coords: np.ndarray, i: int, members: np.ndarray) -> np.ndarray:
    """[M, 3] polar dual points 2 (r_k - r_i) / |r_k - r_i|^2 of the members of i's cell (i -> 0),
    with the rounding of the every-atom path (einsum) so that a full list gives the same bits."""
    offset = coords[members] - coords[i]
    square = np.einsum("kd,kd->k", offset, offset)
    square[members == i] = 1.0
    return 2 * offset / square[:, None]


def _crystal_dual(points: np.ndarray, i: int, members: np.ndarray) -> np.ndarray:
    """[M, 3] polar dual points of the members (indices into points) of home atom i's cell (i -> 0)."""
    offset = points[members] - points[i]
    square = _dot(offset, offset)
    square[members == i] = 1.0
    return 2 * offset / square[:, None]


def _certified_cell(sites: np.ndarray, tree: Any, i: int, radius: float, complete: float, scale: np.ndarray | None,
                    cone_directions: np.ndarray | None, cone_sites: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The dual hull of site i's cell from a candidate list that provably changes nothing.

    Candidates C: the sites within `radius` of r_i plus those added in earlier rounds. With H the
    hull of C's dual points, the hull of ALL dual points is H exactly when every other site's
    a_k lies in H. A face of H at distance δ > 0 from the origin is the cell vertex w = n̂/δ
    (relative to r_i), and a_k crosses it iff a_k·w > 1, i.e. iff r_k lies inside the ball
    about r_i + w through r_i: that ball is searched in the KD-tree (unless it lies within
    `radius` of r_i, where every site is a candidate already). A face through the origin (δ = 0,
    the cell unbounded) is crossed iff n̂·(r_k - r_i) > 0; every r_k - r_i is a non-negative
    combination of `cone_directions` (r_v - r_i over the molecule's hull vertices v), so those are
    tested. Sites found are added and the hull rebuilt, until none is found.

    Args:
      sites: [P, 3] positions, Å (a crystal's images, home atoms first); tree: cKDTree of sites.
      i: index of the centre in sites. radius: first candidate radius, Å. complete: the tree holds
        every site within this distance of r_i (inf for a molecule), Å.
      scale: [3] per-axis spread for Qhull's combinatorics (molecules) or None (crystals).
      cone_directions: [V, 3] generators of the cone of all r_k - r_i, Å, with cone_sites [V]
        their site indices; None for a crystal (its cells are bounded: a face through the origin
        only means too few candidates, so the radius doubles).

    Returns:
      (members [M] sorted site indices, dual points [M, 3], hull triangles [T, 3] into them), or
      None when the certificate needs sites beyond `complete`, a candidate is itself on the wrong
      side of a recession face (rounding on a flat surface), or after `_MAX_ROUNDS` rounds (a
      round whose candidates are flat to `_THIN`, as in a planar patch, doubles the radius).
    """
    center = sites[i]
    extra = np.zeros(0, np.int64)
    dual_of = _crystal_dual if cone_directions is None else _molecule_dual
    for _ in range(_MAX_ROUNDS):
        members = np.union1d(np.asarray(tree.query_ball_point(center, radius), np.int64), extra)
        dual = dual_of(sites, i, members)
        shape = dual if scale is None else dual / scale
        spread = np.linalg.svd(shape - shape.mean(axis=0), compute_uv=False)
        if spread[-1] <= _THIN * spread[0]:  # flat candidates (a planar patch): Qhull fails or errs
            radius *= 2
            if radius > complete:
                return None
            continue
        hull = ConvexHull(shape, qhull_options="Qt")
        normal, offset = hull.equations[:, :3], hull.equations[:, 3]
        if scale is not None:  # the plane m·(p / s) + e = 0 is (m / s)·p + e = 0
            normal = normal / scale
        length = np.linalg.norm(normal, axis=1)
        unit, delta = normal / length[:, None], -offset / length
        self_row = int(np.searchsorted(members, i))
        at_origin = (hull.simplices == self_row).any(axis=1) | (delta <= 1e-12 * np.abs(dual).max())
        found = []
        if at_origin.any():
            if cone_directions is None:
                radius *= 2
                if radius > complete:
                    return None
                continue
            side = cone_directions @ unit[at_origin].T  # [V, F0]
            crossing = (side > _CONE_TOLERANCE * np.linalg.norm(cone_directions, axis=1)[:, None]).any(axis=1)
            if np.isin(cone_sites[crossing], members).any():
                return None
            found.append(cone_sites[crossing])
        reach = 1 / delta[~at_origin] * (1 + _VERTEX_MARGIN)  # [F] radius of each vertex ball, Å
        outside = 2 * reach > radius
        if outside.any():
            if 2 * reach[outside].max() > complete:
                return None
            vertices = center + unit[~at_origin][outside] / delta[~at_origin][outside, None]
            hits = tree.query_ball_point(vertices, reach[outside])
            found.append(np.fromiter((k for h in hits for k in h), np.int64))
        new = np.setdiff1d(np.concatenate(found) if found else extra[:0], members)
        if not len(new):
            return members, dual, hull.simplices
        extra = np.union1d(extra, new)
    return None


class _DefectBatch:
    """Cells' dual points and hull triangles, gathered until `_BATCH_POINTS` points, then their
    normal-cone solid angles (`_angular_defects`) in one vectorised pass."""

    def __init__(self) -> None:
        self._cells: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        self._size = 0
        self._done: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, center: int, members: np.ndarray, dual: np.ndarray, triangles: np.ndarray) -> None:
        """One cell: its centre, members [M], dual points [M, 3] and triangles [T, 3] into them."""
        self._cells.append((center, members, dual, triangles))
        self._size += len(members)
        if self._size >= _BATCH_POINTS:
            self._flush()

    def _flush(self) -> None:
        if not self._cells:
            return
        sizes = np.array([len(c[1]) for c in self._cells])
        starts = np.cumsum(sizes) - sizes
        tri = np.concatenate([c[3] + s for c, s in zip(self._cells, starts)])
        omega = _angular_defects(np.concatenate([c[2] for c in self._cells]), tri)
        self._done.append((np.repeat([c[0] for c in self._cells], sizes).astype(np.int64),
                           np.concatenate([c[1] for c in self._cells]).astype(np.int64), omega))
        self._cells, self._size = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """centre [C], member [C], Ω [C] sr, in the order the cells were added."""
        self._flush()
        return tuple(np.concatenate(x) for x in zip(*self._done))


def _exact_crystal(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray) -> Facets:
    """Facets of the cells of the periodic structure (see `_crystal_points` for exactness).

    When the ball of radius D (`_crystal_reach`) holds at most `_EXHAUSTIVE` sites per atom (on
    average), each cell's hull is built from all of them; otherwise from certified candidate
    lists (`_certified_cell`) among the images within U <= D of the home atoms, U doubling (up to
    D, where the exhaustive list is used) when a cell needs more. Cells go `_BATCH_POINTS` dual
    points at a time.
    """
    from scipy.spatial import cKDTree

    n = len(positions)
    volume = abs(np.linalg.det(cell))
    reach = _crystal_reach(cell)
    spacing = (3 * volume / (4 * np.pi * n)) ** (1 / 3)  # Å: a ball of radius r holds ~ (r / spacing)^3 sites
    exhaustive = (reach / spacing) ** 3 <= _EXHAUSTIVE
    first = spacing * _FIRST_CANDIDATES ** (1 / 3)
    union = reach if exhaustive else min(reach, 3 * first)
    points, atom_of, shifts = _crystal_points(positions, cell, union)
    tree = None if exhaustive else cKDTree(points)
    groups = []
    batch = _DefectBatch()
    for i in range(n):
        while True:
            cell_i = None if exhaustive else _certified_cell(points, tree, i, first, union, None, None, None)
            if cell_i is not None or exhaustive or union >= reach:
                break
            union = min(reach, 2 * union)
            points, atom_of, shifts = _crystal_points(positions, cell, union)
            tree = cKDTree(points)
        if cell_i is None:  # every image within D: exact
            offset = points - positions[i]
            square = _dot(offset, offset)
            near = np.flatnonzero(square <= reach**2)  # i itself (offset 0) included: the origin
            square[i] = 1.0
            dual = 2 * offset[near] / square[near, None]
            cell_i = near, dual, ConvexHull(dual, qhull_options="Qt").simplices
        batch.add(i, *cell_i)
        groups.append((atom_of[cell_i[0]], shifts[cell_i[0]]))  # a larger union renumbers the points
    center, _, omega = batch.result()
    sites = np.concatenate([g[0] for g in groups])
    images = np.concatenate([g[1] for g in groups])
    itself = (sites == center) & ~images.any(axis=1)
    _check_cells(numbers, np.bincount(center[~itself], omega[~itself], n), omega[itself], np.zeros(n))
    keep = ~itself & (omega >= ZERO_FACET)
    return Facets(center[keep], sites[keep].astype(np.int64), images[keep].astype(np.int64), omega[keep])


def _no_facets() -> Facets:
    empty = np.zeros(0, np.int64)
    return Facets(empty, empty, np.zeros((0, 3), np.int64), np.zeros(0))


def _cone_solid_angles(points: np.ndarray, bounds: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """Solid angle of the outer normal cone at every point of the convex hull of each group.

    For group g (points[bounds[g]:bounds[g + 1]], in R^dim, dim = 1, 2 or 3 spanning R^3's first
    dim axes), the normal cone at a point v of its hull P is {d ∈ R^3 : d·v >= d·w for all w in
    P}; it is a proper cone only at vertices, and the cones of all vertices tile the sphere (their
    solid angles sum to 4π). In 3-D the solid angle is the angular defect 2π - Σ (face angles at
    v) over the hull's triangles (qhull, triangulated output "Qt"): a point in the interior of a
    face or an edge, or on a facet qhull merged, gets 2π - 2π = 0 (to rounding) whatever the
    triangulation; in 2-D it is the lune 2·(π - interior angle); in 1-D each end of the segment gets
    a hemisphere, 2π; a single point, 4π. Every angle is an atan2 of a cross and a dot product of
    input points, so Ω is a continuous function of the points (no topological decision).

    Which points and triangles form the hull is found on points / scale: an affine map leaves a
    hull's faces unchanged, and dividing each principal axis by its spread makes a nearly flat
    molecule's hulls round (Qhull's facet normals on a hull of relative thickness t carry errors
    ~1e-16 / t, enough to drop a 1e-7 sr facet at t = 1e-8). The angles use the points themselves.

    Args:
      points: [P, dim] coordinates; bounds: [G + 1] group offsets into points.
      scale: [dim] per-axis spread for the hull's combinatorics (None: 1).

    Returns:
      [P] solid angles in sr (0 at points that are not hull vertices).
    """
    omega = np.zeros(len(points))
    dim = points.shape[1]
    round_points = points if scale is None else points / scale
    if dim == 3:
        corners = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            corners.append(ConvexHull(round_points[start:stop], qhull_options="Qt").simplices + start)
        return _angular_defects(points, np.concatenate(corners))
    for start, stop in zip(bounds[:-1], bounds[1:]):
        group = points[start:stop]
        if stop - start == 1:
            omega[start] = 4 * np.pi
        elif dim == 1:
            omega[start + group[:, 0].argmin()] = omega[start + group[:, 0].argmax()] = 2 * np.pi
        else:
            ring = ConvexHull(round_points[start:stop]).vertices  # counter-clockwise (scale > 0 keeps it)
            edge = group[np.roll(ring, -1)] - group[ring]  # edge t runs from vertex t to t + 1
            before = np.roll(edge, 1, axis=0)
            turn = np.arctan2(before[:, 0] * edge[:, 1] - before[:, 1] * edge[:, 0], (before * edge).sum(axis=1))
            omega[start + ring] = 2 * turn
    return omega


def _angular_defects(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """2π minus the sum of the face angles at each point of triangulated 3-D hulls.

    Args:
      points: [P, 3]; triangles: [T, 3] indices into points (the hulls' triangles, any orientation).

    Returns:
      [P] normal-cone solid angles in sr (0 at points on no triangle). A point's angles are
      summed in the order of `triangles`, so a cell gives the same bits alone or in a batch.
    """
    omega = np.zeros(len(points))
    angle = np.zeros(triangles.shape)
    for c in range(3):
        origin = points[triangles[:, c]]
        u, v = points[triangles[:, (c + 1) % 3]] - origin, points[triangles[:, (c + 2) % 3]] - origin
        angle[:, c] = np.arctan2(np.linalg.norm(_cross(u, v), axis=1), _dot(u, v))
    vertex = np.zeros(len(points), bool)
    vertex[triangles.ravel()] = True
    total = np.bincount(triangles.ravel(), angle.ravel(), len(points))
    omega[vertex] = 2 * np.pi - total[vertex]
    return omega


def _check_cells(numbers: np.ndarray, facets: np.ndarray, origin: np.ndarray, at_infinity: np.ndarray) -> None:
    """The self-check of every cell: its facets and its cone at infinity tile the sphere.

    Args:
      numbers: [N] atomic numbers (to name the structure).
      facets: [N] Σ_j Ω_ij over each cell's facets, sr.
      origin: [N] the normal cone of the centre in its own dual polytope (the cell's recession
        cone as the dual hull sees it), sr.
      at_infinity: [N] the recession cone from the structure's own hull (0 for a crystal), sr.

    Raises:
      ValueError: naming the structure and the first atom whose cell fails.
    """
    error = np.maximum(np.abs(facets + at_infinity - 4 * np.pi), np.abs(origin - at_infinity))
    bad = np.flatnonzero(~(error <= _CHECK_TOLERANCE))
    if len(bad):
        from ase.symbols import Symbols

        i = bad[0]
        raise ValueError(f"{Symbols(numbers).get_chemical_formula()} ({len(numbers)} atoms): the Voronoi cell of "
                         f"atom {i} fails its 4π check (facets {facets[i]:.12g} sr + cone at infinity "
                         f"{at_infinity[i]:.12g} sr; the dual hull's cone at infinity {origin[i]:.12g} sr)")


def _crystal_reach(cell: np.ndarray) -> float:
    """D, Å: the longest body diagonal max|±a ± b ± c| of the Minkowski-reduced cell (with a
    rounding margin). Every point has a lattice translate within D/2 of it, so the cell of atom
    i lies in the ball of radius D/2 about r_i, and an atom k can only bound it if
    |r_k - r_i| <= D (the bisector of i and k must meet that ball)."""
    from ase.geometry import minkowski_reduce

    reduced, _ = minkowski_reduce(cell)
    corners = np.array([[1, 1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, -1]], float) @ reduced
    return float(np.linalg.norm(corners, axis=1).max() * (1 + 1e-9) + 1e-9)


def _crystal_points(positions: np.ndarray, cell: np.ndarray, radius: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Home atoms followed by every periodic image within `radius` of some home atom.

    With radius = D (`_crystal_reach`) the Voronoi cell of i among these points IS the cell of
    the infinite crystal (exact, not approximate): walking from r_i to any point outside the true
    cell crosses a facet whose atom is within D. Images are generated one lattice translation at
    a time and kept through a KD-tree of the home atoms (a margin of 1e-12 makes the set a
    superset of the images within `radius` under any rounding), so memory is linear in the atoms.

    Returns:
      points [P, 3] (first N are the home atoms, then by translation |n|_1 and atom), atom_of [P]
      (site index), shifts [P, 3] (lattice offsets in the given cell).
    """
    from ase.geometry import minkowski_reduce
    from scipy.spatial import cKDTree

    n = len(positions)
    reduced, op = minkowski_reduce(cell)
    inverse = np.linalg.inv(reduced)
    frac = positions @ inverse
    spread = frac.max(axis=0) - frac.min(axis=0)
    # |n_k| <= radius * |column k of inverse| + spread_k for any image within radius of a home atom.
    bound = np.ceil(radius * np.linalg.norm(inverse, axis=0) + spread).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(-b, b + 1) for b in bound], indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.abs(grid).sum(1).argsort(kind="stable")]  # (0, 0, 0) first
    translations = grid @ reduced
    home = cKDTree(positions)
    step = max(1, _BATCH_POINTS // n)  # translations per block
    kept, index = [positions], [np.arange(n)]
    for start in range(1, len(grid), step):
        images = (positions[None, :, :] + translations[start:start + step, None, :]).reshape(-1, 3)
        near = np.flatnonzero(np.isfinite(home.query(images, distance_upper_bound=radius * (1 + 1e-12) + 1e-12)[0]))
        kept.append(images[near])
        index.append(near + start * n)  # translation k, atom a at k * n + a
    index = np.concatenate(index)
    return np.concatenate(kept), index % n, (grid @ op)[index // n].astype(np.int64)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of [K, 3] arrays."""
    return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cross product of [K, 3] arrays (np.cross has a large per-call overhead)."""
    return np.stack([a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1], a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2],
                     a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]], axis=1)


# --- original mode (scann-reference.md §1.1) -------------------------------------------------

ORIGINAL_RADIUS = 7.0  # Å, VoronoiNN(cutoff=7) of the original
ORIGINAL_RETRY_STEP = 5.0  # Å added to the radius after a failure, kept for later atoms
ORIGINAL_GIVE_UP = 30.0  # Å


def _original_facets(positions: np.ndarray, cell: np.ndarray, periodic: bool
                     ) -> tuple[np.ndarray, np.ndarray, Facets]:
    """The original's facets: pymatgen 2023.8.10 `VoronoiNN` as the original calls it.

    Positions are cast to float32; a molecule is put in the box max(10, extent + 0.1) Å per axis
    (extent of the float32 coordinates, without re-centring). For every atom i in order, all
    images of all sites within R of it (i included) are tessellated; ridges with a vertex at
    infinity are dropped; Ω is pymatgen's fan formula. A qhull error doubles R for that atom (up to
    the longest cell diagonal + 0.01 Å); an atom without any bounded facet makes R grow by 5 Å for
    it and every later atom; beyond 30 Å the atom is given up, and, as in the original, every later
    atom's list then moves up by one index (its facets are attributed to the previous atom).

    Returns:
      the float32-rounded positions [N, 3], the tessellated cell [3, 3] and the facets.
    """
    positions = positions.astype(np.float32).astype(np.float64)
    if not periodic:
        extent = (positions.max(axis=0) - positions.min(axis=0)).astype(np.float32).astype(np.float64)
        cell = np.diag(np.maximum(10.0, extent + 0.1))
    corners = np.array([[1, 1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, -1]], float) @ cell
    max_cutoff = np.linalg.norm(corners, axis=1).max() + 0.01
    radius = ORIGINAL_RADIUS
    cells: dict[float, list] = {}
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for i in range(len(positions)):
        while True:
            if radius not in cells:  # all atoms from i on, at this radius
                cells[radius] = _original_cells(positions, cell, radius, i, max_cutoff)
            if cells[radius][i] is not None:
                parts.append(cells[radius][i])
                break
            radius += ORIGINAL_RETRY_STEP
            if radius > ORIGINAL_GIVE_UP:
                break
    centers = np.concatenate([np.full(len(p[0]), k, np.int64) for k, p in enumerate(parts)] + [np.zeros(0, np.int64)])
    neighbors = np.concatenate([p[0] for p in parts] + [np.zeros(0, np.int64)])
    shifts = np.concatenate([p[1] for p in parts] + [np.zeros((0, 3), np.int64)])
    omega = np.concatenate([p[2] for p in parts] + [np.zeros(0)])
    return positions, cell, Facets(centers, neighbors, shifts, omega)


def _original_cells(positions: np.ndarray, cell: np.ndarray, radius: float, first: int, max_cutoff: float
                    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """The original's cells of atoms first..N-1 at one sphere radius (None: the atom failed).

    In order of cost: all atoms from one shared tessellation where that is provably the same cell
    (`_original_shared_cells`); the rest through the polar dual, one small convex hull per atom
    (`_dual_cells`); any atom that qhull cannot do that way through pymatgen's own path
    (`_original_cell`, with its radius doubling on qhull errors).
    """
    n = len(positions)
    points, site, offset = _union_of_spheres(positions, cell, radius)
    result = _original_shared_cells(points, site, offset, n, radius)
    rest = [i for i in range(first, n) if result[i] is None]
    spheres = []
    for i in rest:
        member = np.flatnonzero(np.linalg.norm(points - points[i], axis=1) <= radius + 1e-8)
        spheres.append(member[member != i])
    for i, cell_i in zip(rest, _dual_cells(points, rest, spheres)):
        if cell_i is False:  # qhull could not do the dual: pymatgen's path
            try:
                cell_i = _original_cell(positions, cell, i, radius, max_cutoff)
            except (RuntimeError, ValueError):
                cell_i = None
        elif cell_i is not None:
            others, omega = cell_i
            cell_i = (site[others], offset[others] - offset[i], omega)
        result[i] = cell_i
    return result


def _original_shared_cells(points: np.ndarray, site: np.ndarray, offset: np.ndarray, n: int, radius: float
                           ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """The cells of the original for all atoms from ONE tessellation, where that is exact.

    The original tessellates, for atom i, the set S_i of images within `radius` of it. Tessellate
    instead the union P of all S_i. Since S_i ⊆ P, i's cell in P lies inside its cell in S_i; if
    every atom that bounds i's cell in P belongs to S_i (is within `radius` of i, with a 1e-6 Å
    margin against rounding) the two cells are equal, and so are the facets the original reports.
    Atoms for which this does not hold (an unbounded cell in P, or a bounding atom too far) get
    None.

    Args:
      points, site, offset: the union P (`_union_of_spheres`), home atoms first; n home atoms.

    Returns:
      per atom, (neighbour site [F], lattice offset [F, 3], Ω [F]) or None.
    """
    try:
        vor = Voronoi(points)
    except RuntimeError:
        return [None] * n
    pairs = vor.ridge_points
    mine = np.flatnonzero((pairs < n).any(axis=1))
    vertex_lists = [vor.ridge_vertices[r] for r in mine]
    bounded = np.fromiter((-1 not in v for v in vertex_lists), bool, len(mine))
    a, b = pairs[mine, 0], pairs[mine, 1]
    centers = np.concatenate([a[a < n], b[b < n]])
    others = np.concatenate([b[a < n], a[b < n]])
    lists = [v for v, home in zip(vertex_lists, a < n) if home] + [v for v, home in zip(vertex_lists, b < n) if home]
    ok = np.concatenate([bounded[a < n], bounded[b < n]])
    ok &= np.linalg.norm(points[others] - points[centers], axis=1) <= radius - 1e-6
    good = np.zeros(n, bool)
    good[centers] = True
    np.logical_and.at(good, centers, ok)
    use = np.flatnonzero(good[centers])
    omega = np.zeros(len(centers))
    if len(use):
        omega[use] = _fan_solid_angles(vor.vertices, [lists[k] for k in use], points[centers[use]])
    result: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * n
    order = np.argsort(centers, kind="stable")
    bounds = np.searchsorted(centers[order], np.arange(n + 1))
    for i in np.flatnonzero(good):
        rows = order[bounds[i]:bounds[i + 1]]
        rows = rows[omega[rows] > 0]
        result[i] = (site[others[rows]], offset[others[rows]], omega[rows])
    return result


def _union_of_spheres(positions: np.ndarray, cell: np.ndarray, radius: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Home sites (offset 0) followed by every other image within `radius` of some home site.

    Returns:
      points [P, 3], site index [P], lattice offset [P, 3].
    """
    n = len(positions)
    inverse = np.linalg.inv(cell)
    frac = positions @ inverse
    reach = radius * np.linalg.norm(inverse, axis=0)
    span = frac.max(axis=0) - frac.min(axis=0)
    bound = np.ceil(span + reach).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(-k, k + 1) for k in bound], indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.abs(grid).sum(axis=1).argsort(kind="stable")]  # (0, 0, 0) first
    points = (positions[None] + (grid @ cell)[:, None]).reshape(-1, 3)
    near = np.flatnonzero(((points >= positions.min(axis=0) - radius)
                           & (points <= positions.max(axis=0) + radius)).all(axis=1))  # cheap pre-filter
    d2 = ((points[near, None, :] - positions[None]) ** 2).sum(-1).min(axis=1)
    keep = np.union1d(np.arange(n), near[d2 <= radius**2])
    return points[keep], keep % n, grid[keep // n]


def _sphere_points(positions: np.ndarray, cell: np.ndarray, i: int, radius: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All images of all sites within `radius` of site i, sorted by distance (i first).

    Returns:
      points [P, 3], site index [P], lattice offset [P, 3].
    """
    inverse = np.linalg.inv(cell)
    frac = (positions - positions[i]) @ inverse
    reach = radius * np.linalg.norm(inverse, axis=0)
    lo = np.floor((-frac).min(axis=0) - reach).astype(int)
    hi = np.ceil((-frac).max(axis=0) + reach).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    points = (positions[None] + (grid @ cell)[:, None]).reshape(-1, 3)
    dist = np.linalg.norm(points - positions[i], axis=1)
    keep = np.flatnonzero(dist <= radius + 1e-8)
    keep = keep[np.argsort(dist[keep], kind="stable")]
    n = len(positions)
    return points[keep], keep % n, grid[keep // n]


def _original_cell(positions: np.ndarray, cell: np.ndarray, i: int, radius: float, max_cutoff: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pymatgen `VoronoiNN.get_voronoi_polyhedra(structure, i)` with cutoff `radius`.

    Returns:
      neighbour site [F], lattice offset [F, 3] and Ω [F] of the bounded ridges of i's cell
      (those with Ω > 0, as `_extract_nn_info` keeps them).

    Raises:
      RuntimeError: qhull failed up to the largest radius. ValueError: no bounded ridge.
    """
    cutoff = radius
    while True:
        points, site, offset = _sphere_points(positions, cell, i, cutoff)
        try:
            vor = Voronoi(points)
            break
        except RuntimeError:  # scipy's QhullError
            if cutoff >= max_cutoff:
                raise RuntimeError("Error in Voronoi neighbor finding; max cutoff exceeded") from None
            cutoff = min(cutoff * 2, max_cutoff + 0.001)
    mine = np.flatnonzero((vor.ridge_points == 0).any(axis=1))
    vertex_lists = [vor.ridge_vertices[r] for r in mine]
    bounded = np.fromiter((-1 not in v for v in vertex_lists), bool, len(mine))
    if not bounded.any():
        raise ValueError("No Voronoi neighbors found for site - try increasing cutoff")
    mine = mine[bounded]
    vertex_lists = [v for v, b in zip(vertex_lists, bounded) if b]
    others = vor.ridge_points[mine].sum(axis=1)  # the index that is not 0
    omega = _fan_solid_angles(vor.vertices, vertex_lists, np.broadcast_to(points[0], (len(vertex_lists), 3)))
    keep = omega > 0
    return site[others][keep], offset[others][keep] - offset[0], omega[keep]


def _dual_cells(points: np.ndarray, centers: list[int], spheres: list[np.ndarray]) -> list:
    """Bounded facets of the Voronoi cell of each centre among its sphere, via the polar dual.

    The cell of c among points r_k is {x : a_k · x <= 1}, a_k = 2 (r_k - r_c) / |r_k - r_c|^2,
    the polar of conv({0} ∪ {a_k}): a 3-D convex hull, much cheaper than a 3-D Voronoi diagram.
    Each hull triangle w · y = b with b > 0 is the cell vertex w / b; triangles at the origin are
    the cell's directions to infinity, so a facet k touching one is unbounded (the original drops
    it). A facet's vertices are ordered by angle in its plane; coplanar hull triangles give
    coincident vertices, merged as qhull's Voronoi merges them (to 1e-9 of the cell's largest
    vertex coordinate, per cell: a cell's facets do not depend on the other centres of the call).
    Ω: pymatgen's fan formula.

    Args:
      points: [P, 3]; centers: C indices into points; spheres: per centre the indices of the other
        points of its sphere.

    Returns:
      per centre (point index [F], Ω [F]) of its bounded facets with Ω > 0; None when it has no
      bounded facet (the original's "no Voronoi neighbours"); False when qhull fails on the dual
      or the sphere has fewer than 6 points (then pymatgen's own path decides).
    """
    result: list = [False] * len(centers)
    corners, vertices, normals, owners = [], [], [], []
    for c, (center, sphere) in enumerate(zip(centers, spheres)):
        if len(sphere) < 5:
            continue
        d = points[sphere] - points[center]
        dual = np.concatenate([np.zeros((1, 3)), 2 * d / _dot(d, d)[:, None]])
        try:
            hull = ConvexHull(dual)
        except RuntimeError:
            continue
        tri, eq = hull.simplices, hull.equations
        b = -eq[:, 3]
        at_origin = (tri == 0).any(axis=1) | (b <= 1e-12 * np.abs(eq[:, 3]).max())
        unbounded = np.zeros(len(dual), bool)
        unbounded[tri[at_origin].ravel()] = True
        corner = tri.ravel()
        triangle = np.repeat(np.arange(len(tri)), 3)
        use = ~unbounded[corner]
        result[c] = None
        if use.any():
            corners.append(sphere[corner[use] - 1])
            vertices.append(eq[triangle[use], :3] / b[triangle[use], None] + points[center])
            normals.append(d[corner[use] - 1])
            owners.append(np.full(int(use.sum()), c))
    if not corners:
        return result
    corner, vertex, normal, owner = (np.concatenate(x) for x in (corners, vertices, normals, owners))
    # one facet per (centre, point): order its vertices by angle about their centroid
    key = owner * len(points) + corner
    order = np.argsort(key, kind="stable")
    key, corner, vertex, normal, owner = key[order], corner[order], vertex[order], normal[order], owner[order]
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    centroid = np.repeat(np.add.reduceat(vertex, first) / counts[:, None], counts, axis=0)
    n_hat = _unit(normal)
    helper = np.where(np.abs(n_hat[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]])
    e1 = _unit(_cross(n_hat, helper))
    rel = vertex - centroid
    order = np.lexsort((np.arctan2(_dot(rel, _cross(n_hat, e1)), _dot(rel, e1)), key))
    key, corner, vertex, owner = key[order], corner[order], vertex[order], owner[order]
    # merge coincident vertices, including across each cycle's wrap-around, with a tolerance of
    # 1e-9 of the cell's own largest vertex coordinate (so no other centre of the call affects it)
    scale = np.zeros(len(centers))
    np.maximum.at(scale, owner, np.abs(vertex).max(axis=1))
    tol = 1e-9 * scale[owner]
    same = np.r_[False, (key[1:] == key[:-1]) & (np.abs(vertex[1:] - vertex[:-1]).max(axis=1) <= tol[1:])]
    last = first + counts - 1
    same[last[(counts > 1) & (np.abs(vertex[last] - vertex[first]).max(axis=1) <= tol[last])]] = True
    key, corner, vertex, owner = key[~same], corner[~same], vertex[~same], owner[~same]
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    big = counts >= 3
    omega = np.zeros(len(first))
    lists = [list(range(f, f + k)) for f, k, g in zip(first, counts, big) if g]
    omega[big] = _fan_solid_angles(vertex, lists, points[centers][owner[first[big]]])
    facet_owner, facet_point = owner[first], corner[first]
    keep = omega > 0
    bounds = np.searchsorted(facet_owner, np.arange(len(centers) + 1))
    for c in np.unique(facet_owner):
        rows = np.arange(bounds[c], bounds[c + 1])
        rows = rows[keep[rows]]
        result[c] = (facet_point[rows], omega[rows])
    return result


def _fan_solid_angles(vertices: np.ndarray, vertex_lists: list[list[int]], centers: np.ndarray) -> np.ndarray:
    """pymatgen's `solid_angle`: fan (v0, vk, vk+1) of Van Oosterom-Strackee triangles.

    Each triangle gives 2·atan(|v0·(vk×vk+1)| / D) with π added when the arctangent is <= 0 and
    atan = ±π/2 when D = 0 (scann-reference.md §1.1 item 3).

    Args:
      vertices: [V, 3] Voronoi vertices; vertex_lists: F ridges in qhull order; centers: [F, 3].
    """
    lengths = np.fromiter((len(v) for v in vertex_lists), np.int64, len(vertex_lists))
    flat = np.fromiter((x for v in vertex_lists for x in v), np.int64, int(lengths.sum()))
    start = np.cumsum(lengths) - lengths
    facet = np.repeat(np.arange(len(lengths)), lengths - 2)
    k = np.arange(len(facet)) - np.repeat(start - 2 * np.arange(len(lengths)), lengths - 2)  # 0..m-3
    c = centers[facet]
    r0 = vertices[flat[start[facet]]] - c
    r1 = vertices[flat[start[facet] + k + 1]] - c
    r2 = vertices[flat[start[facet] + k + 2]] - c
    n0, n1, n2 = (np.linalg.norm(r, axis=1) for r in (r0, r1, r2))
    tp = np.abs(_dot(r0, _cross(r1, r2)))
    de = n0 * n1 * n2 + n2 * _dot(r0, r1) + n1 * _dot(r0, r2) + n0 * _dot(r1, r2)
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.where(de == 0, np.where(tp > 0, 0.5 * np.pi, -0.5 * np.pi), np.arctan(tp / de))
    angle = np.where(angle > 0, angle, angle + np.pi) * 2
    return np.bincount(facet, angle, minlength=len(lengths))


def _select(facets: Facets, positions: np.ndarray, cell: np.ndarray, cutoff: float, min_solid_angle: float,
            min_relative_weight: float, tie: float) -> Neighbors:
    """Relative weights over each centre's facets, the three thresholds, and the edge order.

    A value within `tie` of a threshold counts as on it and is kept (exact mode: TIE_TOLERANCE;
    original mode: 0, plain comparisons as in the original).
    """
    n = len(positions)
    centers, others, shifts, omega = facets
    best = np.zeros(n)
    np.maximum.at(best, centers, omega)
    rho = omega / np.where(best[centers] > 0, best[centers], 1.0)
    dist = np.linalg.norm(positions[others] + shifts @ cell - positions[centers], axis=1)
    keep = (omega >= min_solid_angle - tie) & (rho >= min_relative_weight - tie) & (dist <= cutoff + tie)
    order = np.lexsort((shifts[keep, 2], shifts[keep, 1], shifts[keep, 0], others[keep], centers[keep]))
    idx = np.flatnonzero(keep)[order]
    return Neighbors(centers[idx].astype(np.int64), others[idx].astype(np.int64), dist[idx], omega[idx], rho[idx],
                     shifts[idx].astype(np.int64))
