"""Voronoi neighbours of atoms: the input graph of SCANN (scann-reference.md §1).

Two definitions (`mode`):

* ``"exact"`` (default, §1.2): the Voronoi diagram of the structure itself. A molecule
  (pbc all False) is tessellated as a finite point set: no periodic images, every facet
  between two atoms is kept, and the solid angle of an unbounded facet is computed exactly
  (it is finite). A crystal (pbc all True) uses the Voronoi cell of the infinite periodic
  structure, built from every image that can bound a cell (see `_crystal_points`).
* ``"original"`` (§1.1): the original's pymatgen `VoronoiNN` procedure, bugs included
  (float32 cast, 10 Å box for molecules, cutoff sphere of 7 Å with its retries, unbounded facets
  dropped). Kept to reproduce `shared/fixtures/neighbours*.npz` and models trained on them.

See docs/neighbors.md for the definitions, error bounds and how the modes differ.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
from scipy.spatial import Voronoi

NEIGHBORS_VERSION = 3  # 1: first exact mode (10d2cc2); 2: missed facets beyond the ghost points
MODES = ("exact", "original")
MAX_ATOMIC_NUMBER = 94
MIN_DISTANCE = 0.1  # Å; closer atoms are rejected
# Ghost points that bound a molecule's cells sit this many molecule radii from its centroid. Only
# their combinatorics is used (see `_facet_solid_angles`): every Voronoi feature within about
# (GHOST_RADIUS - 1) / 2 radii of the centroid is exact; a cell with a feature beyond that fails
# the check at infinity and is recomputed against every atom (`_clipped_facets`). Larger values
# lose qhull precision (the lifted coordinates grow as its square).
GHOST_RADIUS = 1.0e3
# A ray, line or plane at infinity counts as uncut by an atom when the cosine between its direction
# and the atom's offset is at most this; an ignored cut of cosine ε changes Ω by O(ε) sr.
_INFINITY_TOLERANCE = 1e-9
_CUBE_CORNERS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float) / np.sqrt(3)


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
      image edges (shifts 0) and Ω is exact to rounding (checked to 3e-10 sr; a nearly collinear
      triple within 1e-9 rad of straight may leave a sliver of O(1e-9) sr; docs/neighbors.md);
      crystals are exact. Original mode:
      distances use the float32-rounded positions, and for a molecule `shifts` refer to the
      original's box diag(max(10, extent + 0.1)) Å, not to `atoms.cell`.

    Raises:
      ValueError: empty structure, non-finite position, Z outside 1..94, two atoms closer than
        0.1 Å, mixed pbc, singular cell, unknown mode.
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
        ridges = _exact_crystal(positions, cell) if periodic else _exact_molecule(positions)
        return _select(ridges, positions, cell, cutoff, min_solid_angle, min_relative_weight)
    positions, cell, ridges = _original_facets(positions, cell, periodic)
    return _select(ridges, positions, cell, cutoff, min_solid_angle, min_relative_weight)


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
            raise ValueError(f"periodic cell is singular (volume {volume:.3g} Å^3): {cell.tolist()}")
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
    """Raises naming the first pair of sites (any images, i <= j) closer than MIN_DISTANCE (crystals)."""
    from ase.geometry import minkowski_reduce

    reduced, op = minkowski_reduce(cell)
    frac = positions @ np.linalg.inv(reduced)
    diff = frac[None, :, :] - frac[:, None, :]  # [N, N, 3], j minus i
    diff -= np.round(diff)
    grid = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    vec = (diff[:, :, None, :] + grid[None, None]) @ reduced  # [N, N, 27, 3]
    dist = np.linalg.norm(vec, axis=-1)
    dist[np.arange(len(positions)), np.arange(len(positions)), 13] = np.inf  # i itself (grid[13] = 0)
    close = np.argwhere(dist < MIN_DISTANCE)
    close = close[close[:, 0] <= close[:, 1]]
    if len(close):
        i, j, g = close[0]
        shift = (np.round(frac[i] - frac[j] + diff[i, j]) + grid[g]).astype(int) @ op
        raise ValueError(f"atoms {i} and {j} (image {shift.tolist()}) are {dist[i, j, g]:.3g} Å apart "
                         f"(< {MIN_DISTANCE} Å)")


def _exact_molecule(positions: np.ndarray) -> Facets:
    """Facets of the Voronoi diagram of the atoms alone (no images).

    Eight ghost points far away (GHOST_RADIUS molecule radii) make the point set 3-D and every
    atom's cell bounded; the ghosts enter only through the combinatorics of the facet boundaries,
    the solid angles are those of the unbounded facets (`_facet_solid_angles`). A cell whose rays,
    lines or planes at infinity some atom cuts (a feature beyond the ghosts) is recomputed with
    every atom as a constraint (`_clipped_facets`), as are the cells sharing the failed part.
    """
    n = len(positions)
    empty = np.zeros(0, np.int64)
    if n == 1:
        return Facets(empty, empty, np.zeros((0, 3), np.int64), np.zeros(0))
    center = positions.mean(axis=0)
    radius = np.linalg.norm(positions - center, axis=1).max() + 1.0
    # The cube of ghosts is aligned with the principal axes (its corner set is unchanged by any
    # signed permutation of them), so the construction turns and moves with the molecule.
    axes = np.linalg.eigh((positions - center).T @ (positions - center))[1]
    ghosts = center + GHOST_RADIUS * radius * _CUBE_CORNERS @ axes.T
    points = np.concatenate([positions, ghosts])
    facets, suspect = _tessellate(points, n, ghost_start=n, shifts=np.zeros((len(points), 3), np.int64),
                                  atom_of=np.arange(len(points)))
    if not suspect.any():
        return facets
    keep = ~suspect[facets.centers]
    exact = _clipped_facets(positions, np.flatnonzero(suspect))
    return Facets(*(np.concatenate([part[keep], again]) for part, again in zip(facets, exact)))


def _clipped_facets(positions: np.ndarray, centers: np.ndarray) -> Facets:
    """Every facet of the given atoms' cells with every other atom as a constraint (no ghosts).

    Seen from i, the facet shared with j is the polyhedral cone of directions d with d·n̂_j >= 0
    and d·m_k <= 0 for every k ∉ {i, j}, m_k = h_j n̂_k - h_k n̂_j (n̂_k unit vector towards r_k,
    h_k half the distance). On the unit sphere that is the hemisphere about n̂_j (a square of
    horizon arcs) clipped by one great circle per atom (Sutherland-Hodgman, all facets at once,
    nearest atoms first so that non-neighbours vanish early). An arc between two horizon points is
    on the horizon; when a cut enters and leaves through horizon arcs, the cut's great circle
    through its top point closes the polygon. Each vertex is computed from the normals of its two
    great circles (not interpolated along the clipped edge, which accumulates rounding). Ω is the
    fan of signed triangles from n̂_j.
    Exact to rounding, O(N²) per centre: used only for cells the ghost construction cannot
    certify.

    Args:
      positions: [N, 3] atoms, Å; centers: [C] atom indices.

    Returns:
      the facets of those centres with Ω > 0.
    """
    n = len(positions)
    ci = np.repeat(centers, n - 1)
    cj = np.concatenate([np.delete(np.arange(n), c) for c in centers])
    offset = positions[None] - positions[centers][:, None]  # [C, N, 3]
    dist = np.linalg.norm(offset, axis=-1)
    row_of_center = np.repeat(np.arange(len(centers)), n - 1)
    nearest = np.argsort(dist, axis=1, kind="stable")[:, 1:]  # [C, N - 1] the centre itself is first
    k_all = nearest[row_of_center]
    k_all = k_all[k_all != cj[:, None]].reshape(len(ci), n - 2)  # constraint atoms, nearest first
    u_j = offset[row_of_center, cj]
    h_j = 0.5 * dist[row_of_center, cj]
    pole = u_j / (2 * h_j[:, None])
    e1 = _unit(_cross(pole, np.eye(3)[np.abs(pole).argmin(axis=1)]))
    e2 = _cross(pole, e1)
    poly = np.stack([e1, e2, -e1, -e2], axis=1)  # [B, L, 3] spherical polygon, counter-clockwise
    circle = np.repeat(pole[:, None], 4, axis=1)  # [B, L, 3] normal of the great circle of edge t -> t + 1
    horizon = np.ones(poly.shape[:2], bool)
    size = np.full(len(ci), 4)
    rows = np.arange(len(ci))  # facets still alive
    for t in range(n - 2):
        k = k_all[rows, t]
        u_k = offset[row_of_center[rows], k]
        h_k = 0.5 * dist[row_of_center[rows], k]
        m = h_j[rows, None] * u_k / (2 * h_k[:, None]) - h_k[:, None] * pole[rows]
        p = pole[rows]
        # Within _INFINITY_TOLERANCE of parallel (a nearly collinear triple) the cut is a sliver of
        # at most 2e-9 sr whose crossings rounding cannot place; it is taken as parallel.
        parallel = np.linalg.norm(_cross(m, p), axis=1) <= _INFINITY_TOLERANCE * np.linalg.norm(m, axis=1)
        m = _unit(m)
        width = poly.shape[1]
        valid = np.arange(width) < size[:, None]
        s = np.einsum("blk,bk->bl", poly, m)
        skip = parallel & (_dot(m, p) <= 0)  # a parallel constraint behind the facet's plane
        if not (parallel & ~skip).any() and not ((s > 0) & valid & ~parallel[:, None]).any():
            continue  # this atom cuts no facet (the usual case for far atoms)
        inside = (s <= 0) & valid
        nxt = (np.arange(width)[None] + 1) % size[:, None]
        poly_n = np.take_along_axis(poly, nxt[..., None], axis=1)
        horizon_n = np.take_along_axis(horizon, nxt, axis=1)
        cross = valid & (inside != np.take_along_axis(inside, nxt, axis=1))
        with np.errstate(invalid="ignore"):  # slots of rows that are skipped or not kept may be 0/0
            # The crossing from the two circles' normals (not interpolated): no rounding accumulates.
            point = _unit(_cross(circle.reshape(-1, 3), np.repeat(m, width, axis=0))).reshape(poly.shape)
            point *= np.sign(np.einsum("blk,blk->bl", point, poly + poly_n))[..., None]
            top = _unit(p - _dot(p, m)[:, None] * m)
        on_horizon = horizon & horizon_n
        both = (cross.sum(axis=1) == 2) & ((cross & on_horizon).sum(axis=1) == 2)
        slots = np.stack([poly, np.where(cross[..., None], point, poly),
                          np.broadcast_to(top[:, None], poly.shape)], axis=2).reshape(len(rows), -1, 3)
        flags = np.stack([horizon, on_horizon, np.zeros_like(horizon)], axis=2).reshape(len(rows), -1)
        cut = np.broadcast_to(m[:, None], poly.shape)
        circles = np.stack([circle, np.where((cross & inside)[..., None], cut, circle), cut],
                           axis=2).reshape(len(rows), -1, 3)
        keep = np.stack([inside, cross, cross & inside & both[:, None]], axis=2).reshape(len(rows), -1)
        new_size = keep.sum(axis=1)
        order = np.argsort(~keep, axis=1, kind="stable")[:, : max(int(new_size.max()), 1)]
        new_poly = np.take_along_axis(slots, order[..., None], axis=1)
        new_flags = np.take_along_axis(flags, order, axis=1)
        new_circle = np.take_along_axis(circles, order[..., None], axis=1)
        empty = (parallel & ~skip) | (~skip & (new_size < 3))
        width = max(new_poly.shape[1], poly.shape[1])
        poly = np.where(skip[:, None, None], _pad(poly, width), _pad(new_poly, width))
        horizon = np.where(skip[:, None], _pad(horizon, width), _pad(new_flags, width))
        circle = np.where(skip[:, None, None], _pad(circle, width), _pad(new_circle, width))
        size = np.where(skip, size, new_size)
        alive = ~empty
        rows, poly, horizon, circle, size = rows[alive], poly[alive], horizon[alive], circle[alive], size[alive]
        if not len(rows):
            break
    omega = np.zeros(len(ci))
    if len(rows):
        width = poly.shape[1]
        nxt = (np.arange(width)[None] + 1) % size[:, None]
        poly_n = np.take_along_axis(poly, nxt[..., None], axis=1)
        valid = np.arange(width)[None] < size[:, None]
        pole_b = np.broadcast_to(pole[rows, None], poly.shape)
        tri = _tri(pole_b.reshape(-1, 3), poly.reshape(-1, 3), poly_n.reshape(-1, 3)).reshape(valid.shape)
        omega[rows] = np.where(valid, tri, 0.0).sum(axis=1)
    keep = omega > 0
    return Facets(ci[keep].astype(np.int64), cj[keep].astype(np.int64), np.zeros((int(keep.sum()), 3), np.int64),
                  omega[keep])


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    """`a` [B, L, ...] padded with zeros to [B, width, ...] along axis 1."""
    pad = [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad)


def _exact_crystal(positions: np.ndarray, cell: np.ndarray) -> Facets:
    """Facets of the cells of the periodic structure (see `_crystal_points` for exactness)."""
    points, atom_of, shifts = _crystal_points(positions, cell)
    return _tessellate(points, len(positions), ghost_start=len(points), shifts=shifts, atom_of=atom_of)[0]


def _crystal_points(positions: np.ndarray, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Home atoms followed by every periodic image within D of some home atom.

    D is the longest body diagonal max|±a ± b ± c| of the Minkowski-reduced cell. Every point x
    has a lattice translate within D/2 of it, so the cell of atom i lies in the ball of radius D/2
    about r_i, and an atom k can only bound it if |r_k - r_i| <= D (the bisector of i and k must
    meet that ball). Walking from r_i to any point outside the true cell crosses a facet whose
    atom is within D, so the Voronoi cell of i among these points IS the cell of the infinite
    crystal (exact, not approximate).

    Returns:
      points [P, 3] (first N are the home atoms), atom_of [P] (site index), shifts [P, 3]
      (lattice offsets in the given cell).
    """
    from ase.geometry import minkowski_reduce

    reduced, op = minkowski_reduce(cell)
    corners = np.array([[1, 1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, -1]], float) @ reduced
    reach = np.linalg.norm(corners, axis=1).max() * (1 + 1e-9) + 1e-9
    inverse = np.linalg.inv(reduced)
    frac = positions @ inverse
    spread = frac.max(axis=0) - frac.min(axis=0)
    # |n_k| <= reach * |column k of inverse| + spread_k for any image within reach of a home atom.
    bound = np.ceil(reach * np.linalg.norm(inverse, axis=0) + spread).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(-b, b + 1) for b in bound], indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.abs(grid).sum(1).argsort(kind="stable")]  # (0, 0, 0) first
    images = positions[None, :, :] + (grid @ reduced)[:, None, :]  # [G, N, 3]
    flat = images.reshape(-1, 3)
    dist2 = ((flat[:, None, :] - positions[None, :, :]) ** 2).sum(-1).min(axis=1)
    keep = dist2 <= reach**2
    keep[: len(positions)] = True
    atom_of = np.tile(np.arange(len(positions)), len(grid))[keep]
    shifts = np.repeat(grid @ op, len(positions), axis=0)[keep].astype(np.int64)
    points = flat[keep]
    return points, atom_of, shifts


def _tessellate(points: np.ndarray, n_home: int, *, ghost_start: int, shifts: np.ndarray,
                atom_of: np.ndarray) -> tuple[Facets, np.ndarray]:
    """Voronoi diagram of `points`; facets of the home points' cells with exact solid angles.

    Points [0, n_home) are home atoms, [n_home, ghost_start) periodic images (real points),
    [ghost_start, P) ghosts (not atoms; only bound the cells).

    Returns:
      the facets, and [ghost_start] bool: real points whose cell failed the check of its parts at
      infinity (`_facet_solid_angles`; always False without ghosts).
    """
    vor = Voronoi(points)
    ridge_points = vor.ridge_points
    real_ridge = (ridge_points < ghost_start).all(1) & (ridge_points < n_home).any(1)
    sel = np.flatnonzero(real_ridge)
    pairs = ridge_points[sel]
    vertex_lists = [vor.ridge_vertices[r] for r in sel]
    lengths = np.fromiter((len(v) for v in vertex_lists), np.int64, len(vertex_lists))
    flat = np.fromiter((x for v in vertex_lists for x in v), np.int64, int(lengths.sum()))
    if (flat < 0).any():
        raise RuntimeError("internal error: a real facet is unbounded although ghost points enclose the atoms")
    ghost_vertex = np.zeros(len(vor.vertices) + 1, bool)
    if ghost_start < len(points):
        for g in range(ghost_start, len(points)):
            region = vor.regions[vor.point_region[g]]
            ghost_vertex[region] = True
        ghost_vertex[-1] = False
    with np.errstate(invalid="ignore", divide="ignore"):  # rows left unused (e.g. parallel planes) may be NaN
        omega, suspect = _facet_solid_angles(pairs, vor.vertices, flat, lengths, ghost_vertex[flat],
                                             points[:ghost_start])
    bad = np.flatnonzero(~np.isfinite(omega))
    if len(bad):
        i, j = atom_of[pairs[bad[0]]]
        raise RuntimeError(f"solid angle of the facet between atoms {i} and {j} is not finite (degenerate geometry)")
    # One directed facet per home end of each ridge.
    a, b = pairs[:, 0], pairs[:, 1]
    first = a < n_home
    second = b < n_home
    centers = np.concatenate([a[first], b[second]])
    others = np.concatenate([b[first], a[second]])
    shift = shifts[others] - shifts[centers]
    return Facets(atom_of[centers].astype(np.int64), atom_of[others].astype(np.int64), shift,
                  np.concatenate([omega[first], omega[second]])), suspect


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of [K, 3] arrays."""
    return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cross product of [K, 3] arrays (np.cross has a large per-call overhead)."""
    return np.stack([a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1], a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2],
                     a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]], axis=1)


def _tri(pole: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Signed solid angle of the spherical triangle (pole, a, b) of unit vectors [K, 3].

    Van Oosterom & Strackee: tan(Ω/2) = det[p a b] / (1 + p·a + a·b + b·p); the denominator is
    positive here because a and b lie in the closed hemisphere about `pole`, less than π apart.
    """
    return 2 * np.arctan2(_dot(pole, _cross(a, b)), 1 + _dot(pole, a) + _dot(a, b) + _dot(b, pole))


def _facet_solid_angles(pair_index: np.ndarray, vertices: np.ndarray, flat: np.ndarray, lengths: np.ndarray,
                        ghost: np.ndarray, real_points: np.ndarray) -> np.ndarray:
    """Exact solid angle of each facet of the diagram of the real points, seen from its centre.

    Each facet comes as the cyclic vertex list of the ghost-bounded diagram. A vertex is a ghost
    vertex if a ghost point is among its generators; an edge between two real vertices, or from a
    real vertex to a ghost vertex, lies on the bisector line of a real third atom k, and so does a
    ghost-ghost edge if both its ends lie on such a bisector (else it is a ghost line, i.e. the
    facet's boundary at infinity; `_edge_atoms`). Ray directions and the foot point of a full
    line are computed from the atoms (cross product, circumcentre), not from qhull's far vertices. The facet's true boundary is then:
    segments, rays (real vertex -> direction of the ghost vertex), full lines, and arcs of the
    horizon (the great circle parallel to the facet through the centre) in place of ghost edges.

    The solid angle is the area of the spherical polygon these project to, summed as a fan of
    signed triangles from the pole n̂ (unit vector from the centre to the facet plane): a segment
    a→b gives tri(n̂, â, b̂); a ray from a to the direction u gives tri(n̂, â, u); a horizon arc
    from u to w gives the signed angle between them about n̂ (the triangle (n̂, u, w) with u, w on
    the horizon has that area). Horizon arcs are summed as signed increments between the
    horizontal directions of consecutive ghost vertices, plus the tiny increments from a ray's
    direction to its ghost vertex's direction; these telescope to the exact arc whatever the
    ghost positions, so the result is exact as long as every true vertex is a real vertex here.
    The sum is the signed area for the qhull orientation of the ridge; its absolute value is Ω.

    The parts at infinity are then checked against every atom (real vertices are exact: qhull's
    empty-sphere property holds for all atoms). A ray with outward direction u from a true vertex
    is a true edge iff no atom k other than its three generators has (r_k - r_i)·u > 0; a whole
    line iff none has (r_k - r_i)·u ≠ 0; a half-plane facet (one line, no ray) also needs its
    inward in-plane normal ν to satisfy (r_k - r_i)·ν <= 0, and a whole-plane facet needs every
    r_k - r_i normal to the plane (all to a relative tolerance `_INFINITY_TOLERANCE`). If every
    unbounded edge of a facet is a true edge, the facet's boundary chain is the true one and the
    facet is exact; a facet the ghosts left incomplete always has a ray, line or plane that fails
    (a true feature beyond the ghosts cuts it). Cells with a failed check are flagged.

    Args:
      pair_index: [F, 2] indices into real_points of each facet's two generators (centre first).
      vertices: [V, 3] Voronoi vertices.
      flat, lengths: facet vertex indices concatenated (cyclic order), and counts [F].
      ghost: [sum(lengths)] whether each listed vertex is a ghost vertex.
      real_points: [P, 3] the real generators (to classify ghost-ghost edges).

    Returns:
      [F] Ω in sr, and [P] bool: points whose cell failed the check.
    """
    f = len(lengths)
    center, other = real_points[pair_index[:, 0]], real_points[pair_index[:, 1]]
    owner = np.repeat(np.arange(f), lengths)
    start = np.cumsum(lengths) - lengths
    nxt = np.arange(len(flat)) + 1
    nxt[start + lengths - 1] = start
    c = center[owner]
    n = _unit(other - center)[owner]  # the pole
    p = vertices[flat] - c  # vertex relative to the centre; edge t runs from vertex t to vertex nxt[t]
    q = p[nxt]
    ga = ghost
    gb = ga[nxt]
    contrib = np.zeros(len(flat))
    segment = ~ga & ~gb
    contrib[segment] = _tri(n[segment], _unit(p[segment]), _unit(q[segment]))
    rows = np.flatnonzero(~segment)
    n, p, q, ga, gb, c, facet = n[rows], p[rows], q[rows], ga[rows], gb[rows], c[rows], owner[rows]
    rel = real_points[None] - c[:, None]  # [K, P, 3] every point relative to the centre
    norm = np.linalg.norm(rel, axis=-1)
    norm[norm == 0] = np.inf
    # The atom k whose bisector with the centre carries each remaining edge.
    k, on_line = _edge_atoms(p, q, rel, norm, pair_index[facet])
    normal = real_points[k] - c
    # Every edge contributes tri(A, X) + tri(X, M) + tri(M, Y) + tri(Y, B) (points on the unit
    # sphere): X, Y where the edge starts and ends (a real vertex, or the ray's direction at
    # infinity), M the foot of a full line (else M = X), A, B the horizontal directions of ghost
    # end vertices (else A = X, B = Y), so that consecutive edges' horizon pieces telescope.
    u = _unit(_cross(n, normal))
    u *= np.sign(_dot(u, q - p))[:, None]  # along the edge
    hp, hq = _horizontal(p, n), _horizontal(q, n)
    x = np.where(ga[:, None], -u, _unit(p))
    y = np.where(gb[:, None], u, _unit(q))
    m = x.copy()
    # A ghost-ghost piece of a real line is the whole line only if it passes the line's point
    # closest to the centre; otherwise it lies beyond the ghosts' reach and counts as horizon.
    gg = np.flatnonzero(ga & gb & on_line)
    foot = _circumcenter_offset((other - center)[facet[gg]], normal[gg])
    through = _dot(foot - p[gg], u[gg]) * _dot(foot - q[gg], u[gg]) <= 0
    m[gg[through]] = _unit(foot[through])
    horizon = ga & gb
    horizon[gg[through]] = False
    x[horizon], m[horizon], y[horizon] = hp[horizon], hp[horizon], hq[horizon]
    a = np.where(ga[:, None], hp, x)
    b = np.where(gb[:, None], hq, y)
    contrib[rows] = _tri(n, a, x) + _tri(n, x, m) + _tri(n, m, y) + _tri(n, y, b)
    omega = np.abs(np.bincount(owner, contrib, minlength=f))

    # Check of the parts at infinity (docstring): cosine of every other atom with each direction.
    along = np.einsum("kpi,ki->kp", rel, u) / norm
    generators = np.concatenate([pair_index[facet], k[:, None]], axis=1)
    along[np.arange(len(rows))[:, None], generators] = 0.0
    ray = ga != gb
    line = np.zeros(len(rows), bool)
    line[gg[through]] = True
    outward = np.where(gb, 1.0, -1.0)[:, None]  # a ray's direction to infinity is u (-u if it comes in)
    bad = ray & (~on_line | ((outward * along).max(axis=1) > _INFINITY_TOLERANCE))
    bad |= line & (np.abs(along).max(axis=1) > _INFINITY_TOLERANCE)
    far_line = ga & gb & on_line & ~line  # a real line the ghosts cut off: not checked, recomputed

    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(facet[mask], minlength=f)

    rays, lines = count(ray), count(line)
    unbounded = count(np.ones(len(rows), bool)) > 0
    failed = (count(bad) > 0) | (count(far_line) > 0) | ((rays > 0) & (lines > 0)) | (lines > 2)
    half = np.flatnonzero(line & (rays[facet] == 0) & (lines[facet] == 1))
    if len(half):
        inward = _unit(_cross(n[half], u[half]))
        inward *= -np.sign(_dot(inward, normal[half]))[:, None]
        cosine = np.einsum("kpi,ki->kp", rel[half], inward) / norm[half]
        cosine[np.arange(len(half))[:, None], pair_index[facet[half]]] = 0.0
        failed[facet[half]] |= cosine.max(axis=1) > _INFINITY_TOLERANCE
    plane = np.flatnonzero(unbounded & (rays == 0) & (lines == 0))
    if len(plane):
        rel_plane = real_points[None] - center[plane, None]  # [Q, P, 3]
        pole = _unit(other - center)[plane]
        in_plane = rel_plane - np.einsum("qpi,qi->qp", rel_plane, pole)[..., None] * pole[:, None]
        sine = np.linalg.norm(in_plane, axis=-1) / np.maximum(np.linalg.norm(rel_plane, axis=-1), 1e-300)
        sine[np.arange(len(plane))[:, None], pair_index[plane]] = 0.0
        failed[plane] |= sine.max(axis=1) > _INFINITY_TOLERANCE
    suspect = np.zeros(len(real_points), bool)
    suspect[pair_index[failed].ravel()] = True
    suspect[k[bad]] = True
    return omega, suspect


def _horizontal(v: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Unit direction of v [K, 3] projected on the plane normal to n [K, 3] (the horizon)."""
    return _unit(v - _dot(v, n)[:, None] * n)


def _circumcenter_offset(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Circumcentre of the triangle (0, a, b), rows of [K, 3]."""
    axb = _cross(a, b)
    num = _dot(a, a)[:, None] * _cross(b, axb) + _dot(b, b)[:, None] * _cross(axb, a)
    return num / (2 * _dot(axb, axb))[:, None]


def _edge_atoms(a: np.ndarray, b: np.ndarray, rel: np.ndarray, norm: np.ndarray, pair: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """The real atom k whose bisector with the centre carries each edge, and whether it really does.

    Args:
      a, b: [K, 3] the edge's end points relative to the centre.
      rel: [K, P, 3] every real generator relative to the centre; norm: [K, P] its length (inf
        for the centre itself).
      pair: [K, 2] point indices of the facet's two generators (excluded).

    Returns:
      k [K] (index into real_points) minimising the ends' distances to the bisector plane of
      (centre, k), and whether both distances are within qhull's precision (1e-7 of the vertex's
      distance from the centre), i.e. whether the edge lies on that plane.
    """
    half = 0.5 * norm
    dist_a = np.abs(np.einsum("kpi,ki->kp", rel, a) / norm - half)
    dist_b = np.abs(np.einsum("kpi,ki->kp", rel, b) / norm - half)
    score = dist_a / np.linalg.norm(a, axis=1)[:, None] + dist_b / np.linalg.norm(b, axis=1)[:, None]
    rows = np.arange(len(a))
    score[rows, pair[:, 0]] = np.inf
    score[rows, pair[:, 1]] = np.inf
    k = score.argmin(axis=1)
    return k, score[rows, k] <= 1e-7


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
    coincident vertices, merged as qhull's Voronoi merges them. Ω: pymatgen's fan formula.

    Args:
      points: [P, 3]; centers: C indices into points; spheres: per centre the indices of the other
        points of its sphere.

    Returns:
      per centre (point index [F], Ω [F]) of its bounded facets with Ω > 0; None when it has no
      bounded facet (the original's "no Voronoi neighbours"); False when qhull fails on the dual
      or the sphere has fewer than 6 points (then pymatgen's own path decides).
    """
    from scipy.spatial import ConvexHull

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
    # merge coincident vertices, including across each cycle's wrap-around
    tol = 1e-9 * np.abs(vertex).max()
    same = np.r_[False, (key[1:] == key[:-1]) & (np.abs(vertex[1:] - vertex[:-1]).max(axis=1) <= tol)]
    last = first + counts - 1
    same[last[(counts > 1) & (np.abs(vertex[last] - vertex[first]).max(axis=1) <= tol)]] = True
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
            min_relative_weight: float) -> Neighbors:
    """Relative weights over each centre's facets, the three thresholds, and the edge order."""
    n = len(positions)
    centers, others, shifts, omega = facets
    best = np.zeros(n)
    np.maximum.at(best, centers, omega)
    rho = omega / np.where(best[centers] > 0, best[centers], 1.0)
    dist = np.linalg.norm(positions[others] + shifts @ cell - positions[centers], axis=1)
    keep = (omega >= min_solid_angle) & (rho >= min_relative_weight) & (dist <= cutoff)
    order = np.lexsort((shifts[keep, 2], shifts[keep, 1], shifts[keep, 0], others[keep], centers[keep]))
    idx = np.flatnonzero(keep)[order]
    return Neighbors(centers[idx].astype(np.int64), others[idx].astype(np.int64), dist[idx], omega[idx], rho[idx],
                     shifts[idx].astype(np.int64))
