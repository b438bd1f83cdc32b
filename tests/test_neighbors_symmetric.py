"""Exact-mode Voronoi neighbours of symmetric structures: ideal-geometry molecules and crystals in
random orientations, against a vertex enumeration written here (independent of the module), the
threshold tie rule, the per-cell check, and `original` mode's per-cell merge tolerance."""

import itertools

import ase
import numpy as np
import pytest
from ase.build import bulk, molecule
from scipy.spatial.transform import Rotation

from scannet_jax import neighbors
from scannet_jax.neighbors import neighbors_from_arrays, voronoi_neighbors

ALL = {"cutoff": np.inf, "min_solid_angle": 0.0, "min_relative_weight": 0.0}  # every facet
MOTIONS = 20  # random rotations + translations + permutations per molecule


def enumerated_solid_angle(x: np.ndarray, i: int, j: int) -> float:
    """Ω_ij of the Voronoi diagram of the points x [N, 3] by vertex enumeration in the facet plane.

    In the bisector plane of i and j (origin at their midpoint, height h above r_i) the facet is
    {y : a_k · y <= b_k for all k ∉ {i, j}}. Its boundary points (feasible crossings of two lines,
    feet of the lines) and directions to infinity (feasible ±line directions, inward normals) map
    to the unit vectors (y, h) and (d, 0); sorted by angle about their mean they are the spherical
    polygon, whose area is a fan of Van Oosterom-Strackee triangles. Degenerate input (several
    lines through one point, parallel lines) only repeats points or directions.
    """
    w = x - x[i]
    h = np.linalg.norm(w[j]) / 2
    n = w[j] / (2 * h)
    e1 = np.cross(n, np.eye(3)[np.abs(n).argmin()])
    e1 /= np.linalg.norm(e1)
    basis = np.stack([e1, np.cross(n, e1)])
    wk = np.delete(w, [i, j], axis=0)
    a = wk @ basis.T  # [K, 2]
    b = 0.5 * (wk * wk).sum(axis=1) - h * (wk @ n)
    flat = np.linalg.norm(a, axis=1) < 1e-12 * np.linalg.norm(wk, axis=1)
    if np.any(b[flat] < 0):  # an atom between i and j on their line
        return 0.0
    a, b = a[~flat], b[~flat]
    if len(a) == 0:
        return 2 * np.pi
    scale = np.linalg.norm(a, axis=1)
    p, q = np.triu_indices(len(a), 1)
    det = a[p, 0] * a[q, 1] - a[p, 1] * a[q, 0]
    crossing = np.abs(det) > 1e-12 * scale[p] * scale[q]
    p, q, det = p[crossing], q[crossing], det[crossing]
    crossings = np.stack([b[p] * a[q, 1] - b[q] * a[p, 1], a[p, 0] * b[q] - a[q, 0] * b[p]], axis=1) / det[:, None]
    points = np.concatenate([b[:, None] * a / scale[:, None] ** 2, crossings])
    slack = 1e-9 * (scale[None] * np.linalg.norm(points, axis=1)[:, None] + np.abs(b)[None] + h * scale[None])
    points = points[(points @ a.T <= b[None] + slack).all(axis=1)]
    if not len(points):
        return 0.0
    along = np.stack([-a[:, 1], a[:, 0]], axis=1) / scale[:, None]
    directions = np.concatenate([along, -along, -a / scale[:, None]])
    directions = directions[(directions @ a.T <= 1e-12 * scale[None]).all(axis=1)]
    sphere = np.concatenate([np.c_[points, np.full(len(points), h)], np.c_[directions, np.zeros(len(directions))]])
    sphere /= np.linalg.norm(sphere, axis=1)[:, None]
    center = sphere.mean(axis=0)
    center /= np.linalg.norm(center)
    t1 = np.cross(center, np.eye(3)[np.abs(center).argmin()])
    t1 /= np.linalg.norm(t1)
    t2 = np.cross(center, t1)
    sphere = sphere[np.argsort(np.arctan2(sphere @ t2, sphere @ t1))]
    following = np.roll(sphere, -1, axis=0)
    numerator = np.cross(sphere, following) @ center
    denominator = 1 + sphere @ center + (sphere * following).sum(axis=1) + following @ center
    return float(np.sum(2 * np.arctan2(numerator, denominator)))


# --- ideal geometries (Å) ----------------------------------------------------------------------

def ring(count: int, radius: float, z: float = 0.0, phase: float = 0.0) -> np.ndarray:
    angle = phase + 2 * np.pi * np.arange(count) / count
    return np.stack([radius * np.cos(angle), radius * np.sin(angle), np.full(count, z)], axis=1)


def orbit(seeds: np.ndarray, group: list[np.ndarray]) -> np.ndarray:
    """Distinct images of the seed points [S, 3] under a point group (list of 3x3 matrices)."""
    images = np.concatenate([seeds @ g.T for g in group])
    _, first = np.unique(np.round(images, 8), axis=0, return_index=True)
    return images[np.sort(first)]


def signed_permutations(proper_tetrahedral: bool = False) -> list[np.ndarray]:
    group = [np.diag(s)[list(p)] for p in itertools.permutations(range(3))
             for s in itertools.product((1, -1), repeat=3)]
    if proper_tetrahedral:  # the 24 that map the tetrahedron (1,1,1), (1,-1,-1), ... onto itself (Td)
        tetra = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
        key = {tuple(v) for v in tetra}
        group = [g for g in group if {tuple(v) for v in tetra @ g.T} == key]
    return group


def truncated_icosahedron(bond: float) -> np.ndarray:
    """C60: even permutations of (0, ±1, ±3φ), (±1, ±(2 + φ), ±2φ), (±φ, ±2, ±φ³) (edge 2)."""
    phi = (1 + np.sqrt(5)) / 2
    seeds = np.array([[0, 1, 3 * phi], [1, 2 + phi, 2 * phi], [phi, 2, phi**3]])
    signs = [np.array(s) for s in itertools.product((1, -1), repeat=3)]
    cyclic = [np.eye(3)[[0, 1, 2]], np.eye(3)[[1, 2, 0]], np.eye(3)[[2, 0, 1]]]
    return orbit(seeds, [c @ np.diag(s) for c in cyclic for s in signs]) * bond / 2


def naphthalene() -> tuple[list[int], np.ndarray]:
    c = 1.40 * np.cos(np.pi / 6)
    carbons = np.concatenate([ring(6, 1.40, phase=np.pi / 6) + [-c, 0, 0], ring(6, 1.40, phase=np.pi / 6) + [c, 0, 0]])
    carbons = carbons[np.unique(np.round(carbons, 8), axis=0, return_index=True)[1]]
    outer = np.abs(carbons[:, 0]) > 1e-9
    center = np.where(carbons[outer, :1] > 0, c, -c) * np.array([[1, 0, 0]])
    hydrogens = carbons[outer] + 1.08 * (carbons[outer] - center) / 1.40
    return [6] * 10 + [1] * 8, np.concatenate([carbons, hydrogens])


def adamantane() -> tuple[list[int], np.ndarray]:
    td = signed_permutations(proper_tetrahedral=True)
    t, b = 0.89, 1.78
    ch = orbit(np.array([[t, t, t]]), td)
    ch2 = orbit(np.array([[b, 0, 0]]), td)
    h_ch = orbit(np.array([[t, t, t]]) * (1 + 1.09 / (t * np.sqrt(3))), td)
    h_ch2 = orbit(np.array([[b + 0.63, 0.63, -0.63]]), td)
    return [6] * 10 + [1] * 16, np.concatenate([ch, ch2, h_ch, h_ch2])


def symmetric_molecules() -> dict[str, tuple[list[int], np.ndarray]]:
    cube = np.array(list(itertools.product((1, -1), repeat=3)), float)
    tetra = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float)
    axes = np.concatenate([np.eye(3), -np.eye(3)])
    ring5 = np.concatenate([ring(5, 1.21, z) for z in (1.66, -1.66)] + [ring(5, 2.28, z) for z in (1.66, -1.66)])
    return {
        "benzene": ([6] * 6 + [1] * 6, np.concatenate([ring(6, 1.39), ring(6, 2.47)])),
        "pyridine": ([7] + [6] * 5 + [1] * 5, np.concatenate([ring(6, 1.39), ring(6, 2.47)[1:]])),
        "naphthalene": naphthalene(),
        "ethylene": ([6, 6, 1, 1, 1, 1], np.array([[0.665, 0, 0], [-0.665, 0, 0], [1.23, 0.925, 0], [1.23, -0.925, 0],
                                                   [-1.23, 0.925, 0], [-1.23, -0.925, 0]])),
        "cyclopropane": ([6] * 3 + [1] * 6, np.concatenate([ring(3, 0.87), ring(3, 1.44, 0.91), ring(3, 1.44, -0.91)])),
        "methane": ([6, 1, 1, 1, 1], np.concatenate([[[0.0, 0, 0]], 0.629 * tetra])),
        "SF6": ([16] + [9] * 6, np.concatenate([[[0.0, 0, 0]], 1.56 * axes])),
        "cubane": ([6] * 8 + [1] * 8, np.concatenate([0.78 * cube, (0.78 + 1.09 / np.sqrt(3)) * cube])),
        "adamantane": adamantane(),
        "C60": ([6] * 60, truncated_icosahedron(1.44)),
        "CO2": ([8, 6, 8], np.array([[-1.16, 0, 0], [0, 0, 0], [1.16, 0, 0]])),
        "acetylene": ([1, 6, 6, 1], np.array([[-1.66, 0, 0], [-0.60, 0, 0], [0.60, 0, 0], [1.66, 0, 0]])),
        "ferrocene": ([26] + [6] * 10 + [1] * 10, np.concatenate([[[0.0, 0, 0]], ring5])),
    }


# ASE's builder (G2 set and C60): symmetric to the 6 printed decimals, i.e. nearly co-circular
# and co-spherical atoms; benzene, cyclopropane, 2-butyne, trimethylamine, tert-butyl and isobutane
# were wrong (and orientation-dependent) in NEIGHBORS_VERSION 3.
ASE_MOLECULES = ["C6H6", "C5H5N", "C3H6_D3h", "2-butyne", "C3H9N", "C3H9C", "isobutane", "C2H4", "CH4", "CF4",
                 "C2H2", "CO2", "C3H4_D2d", "biphenyl", "C60"]
MOLECULES = symmetric_molecules() | {f"ase_{name}": (molecule(name).numbers.tolist(), molecule(name).positions)
                                     for name in ASE_MOLECULES}


def facet_dict(nb, perm=None) -> dict:
    perm = np.arange(max(nb.receivers.max(initial=0), nb.senders.max(initial=0)) + 1) if perm is None else perm
    return {(int(perm[i]), int(perm[j])): w for i, j, w in zip(nb.receivers, nb.senders, nb.solid_angles)}


def moved(x: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(permutation, positions): a random rotation, translation and atom order of x [N, 3]."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    return perm, Rotation.random(random_state=seed).apply(x[perm]) + rng.normal(scale=5.0, size=3)


def test_ideal_geometries_have_their_symmetry():
    z, x = MOLECULES["C60"]
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    assert len(x) == 60 and np.allclose(np.sort(d, axis=1)[:, 1:4], [1.44 * np.ones(3) * [1, 1, 1]], atol=0.05)
    assert np.allclose(np.linalg.norm(x, axis=1), np.linalg.norm(x[0]))  # one sphere
    z, x = MOLECULES["adamantane"]
    assert len(z) == len(x) == 26 and np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(26, 1)].min() > 0.9
    z, x = MOLECULES["naphthalene"]
    assert len(z) == len(x) == 18


@pytest.mark.parametrize("name", sorted(MOLECULES))
def test_symmetric_molecule_in_any_orientation_equals_the_enumeration(name):
    z, x = np.array(MOLECULES[name][0]), MOLECULES[name][1]
    n = len(z)
    first = neighbors_from_arrays(z, x, **ALL)
    got = facet_dict(first)
    # C60: every atom is equivalent under Ih; the enumeration is done for 6 of them (it is O(N^3)).
    centres = range(0, n, 10) if name.endswith("C60") else range(n)
    for i in centres:
        assert np.bincount(first.receivers, first.solid_angles, n)[i] <= 4 * np.pi + 1e-9
        for j in range(n):
            if j != i:
                assert got.get((i, j), 0.0) == pytest.approx(enumerated_solid_angle(x, i, j), abs=1e-6), (name, i, j)
    edges = set(zip(*neighbors_from_arrays(z, x)[:2]))
    for seed in range(MOTIONS):
        perm, y = moved(x, seed)
        other = facet_dict(neighbors_from_arrays(z[perm], y, **ALL), perm)
        assert other.keys() == got.keys(), (name, seed)
        np.testing.assert_allclose([other[k] for k in got], [got[k] for k in got], rtol=0, atol=1e-9,
                                   err_msg=f"{name} seed {seed}")
        nb = neighbors_from_arrays(z[perm], y)
        assert set(zip(perm[nb.receivers], perm[nb.senders])) == edges, (name, seed)


def test_benzene_cells_by_hand():
    # Ideal benzene: each C has facets to its two C neighbours and its H only (the other ring atoms
    # are co-circular with it: their facets have zero area and are not facets). The C cells are
    # bounded (4π); an H cell is unbounded, and its facets plus the lune at infinity, 2·(π - 2π/3)
    # for the 120° corner of the molecule's hexagon of H atoms, make 4π.
    z, x = np.array(MOLECULES["benzene"][0]), MOLECULES["benzene"][1]
    for seed in range(3):
        perm, y = moved(x, seed)
        got = facet_dict(neighbors_from_arrays(z[perm], y, **ALL), perm)
        for c in range(6):
            mine = {j: w for (i, j), w in got.items() if i == c}
            assert sorted(mine) == sorted([(c + 1) % 6, (c + 5) % 6, c + 6])
            assert mine[(c + 1) % 6] == pytest.approx(mine[(c + 5) % 6], abs=1e-12)
            assert sum(mine.values()) == pytest.approx(4 * np.pi, abs=1e-12)
            hydrogen = sum(w for (i, j), w in got.items() if i == c + 6)
            assert hydrogen == pytest.approx(4 * np.pi - 2 * np.pi / 3, abs=1e-12)
        assert len(neighbors_from_arrays(z[perm], y).receivers) == 36


CRYSTALS = {
    "fcc": bulk("Cu", "fcc", a=3.61),
    "fcc_cubic": bulk("Cu", "fcc", a=3.61, cubic=True),
    "bcc": bulk("Fe", "bcc", a=2.87),
    "hcp": bulk("Mg", "hcp", a=3.2, c=3.2 * np.sqrt(8 / 3)),  # ideal c/a: 12 equidistant neighbours
    "diamond": bulk("Si", "diamond", a=5.43),
    "rocksalt": bulk("NaCl", "rocksalt", a=5.64),
    "CsCl": bulk("CsCl", "cesiumchloride", a=4.12),
    "perovskite": ase.Atoms("SrTiO3", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5],
                                                        [0, 0.5, 0.5]], cell=np.eye(3) * 3.905, pbc=True),
}
SHEARS = [np.array([[1, 0, 0], [3, 1, 0], [-2, 4, 1]]), np.array([[0, 1, 0], [1, 0, 0], [1, 1, -1]])]  # det ±1


def crystal_dict(atoms: ase.Atoms, nb, rotation: np.ndarray) -> dict:
    """{(i, j, bond vector rotated back, rounded to 1e-6 Å): (Ω, ρ, d)} of a crystal's edges."""
    vec = (atoms.positions[nb.senders] + nb.shifts @ atoms.cell.array - atoms.positions[nb.receivers]) @ rotation
    return {(int(i), int(j), tuple(np.round(v, 6) + 0.0)): (w, r, d) for i, j, v, w, r, d in zip(
        nb.receivers, nb.senders, vec, nb.solid_angles, nb.weights, nb.distances)}


@pytest.mark.parametrize("name", sorted(CRYSTALS))
@pytest.mark.parametrize("thresholds", [ALL, {}], ids=["all_facets", "default"])
def test_crystal_in_rotated_and_sheared_cells_is_the_same(name, thresholds):
    atoms = CRYSTALS[name]
    want = crystal_dict(atoms, voronoi_neighbors(atoms, **thresholds), np.eye(3))
    every = voronoi_neighbors(atoms, **ALL)
    np.testing.assert_allclose(np.bincount(every.receivers, every.solid_angles, len(atoms)), 4 * np.pi, atol=1e-10)
    for seed, shear in itertools.product(range(3), [np.eye(3, dtype=int)] + SHEARS):
        rotation = Rotation.random(random_state=seed).as_matrix()
        other = ase.Atoms(atoms.numbers, positions=atoms.positions @ rotation.T,
                          cell=shear @ atoms.cell.array @ rotation.T, pbc=True)
        if seed == 2:
            other.wrap()  # moves atoms to other images: the edges are keyed by bond vector
        got = crystal_dict(other, voronoi_neighbors(other, **thresholds), rotation)
        assert got.keys() == want.keys(), (name, seed, shear.tolist())
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=0, atol=1e-9)


def test_crystal_cells_by_hand():
    fcc = voronoi_neighbors(CRYSTALS["fcc"], **ALL)  # rhombic dodecahedron: 12 equal facets
    np.testing.assert_allclose(fcc.solid_angles, [np.pi / 3] * 12, atol=1e-12)
    nacl = voronoi_neighbors(CRYSTALS["rocksalt"], **ALL)  # cubes: 6 facets of 2π/3 per atom
    np.testing.assert_allclose(nacl.solid_angles, 2 * np.pi / 3, atol=1e-12)
    assert len(nacl.receivers) == 12 and (CRYSTALS["rocksalt"].numbers[nacl.receivers]
                                          != CRYSTALS["rocksalt"].numbers[nacl.senders]).all()
    cscl = voronoi_neighbors(CRYSTALS["CsCl"], **ALL)  # the bcc cell: 6 squares and 8 hexagons
    square = 4 * np.arcsin(1 / 9)
    for i in range(2):
        np.testing.assert_allclose(np.sort(cscl.solid_angles[cscl.receivers == i]),
                                   [square] * 6 + [(4 * np.pi - 6 * square) / 8] * 8, atol=1e-12)


def test_values_on_a_threshold_are_kept_in_every_orientation():
    # Simple cubic with a = 4 Å: six facets of exactly 4π/6 sr at exactly d = 4 Å, ρ = 1. With the
    # thresholds set to those values every rotated copy keeps all six (the tie rule).
    atoms = ase.Atoms("Po", cell=np.eye(3) * 4.0, pbc=True)
    for seed in range(10):
        rotation = Rotation.random(random_state=seed).as_matrix()
        turned = ase.Atoms("Po", positions=[[0.3, 0.1, 0.2]] @ rotation.T, cell=atoms.cell.array @ rotation.T, pbc=True)
        nb = voronoi_neighbors(turned, cutoff=4.0, min_solid_angle=4 * np.pi / 6, min_relative_weight=1.0)
        assert len(nb.receivers) == 6, seed
    # Just beyond the tie tolerance, the edges go.
    nb = voronoi_neighbors(atoms, cutoff=4.0 - 1e-6)
    assert len(nb.receivers) == 0


def test_failed_cell_check_names_structure_and_atom():
    facets = np.full(5, 4 * np.pi)
    facets[2] = 4 * np.pi - 1e-6
    with pytest.raises(ValueError, match=r"CH4 \(5 atoms\): the Voronoi cell of atom 2 fails its 4π check"):
        neighbors._check_cells(np.array([6, 1, 1, 1, 1]), facets, np.zeros(5), np.zeros(5))
    neighbors._check_cells(np.array([6, 1, 1, 1, 1]), np.full(5, 4 * np.pi), np.zeros(5), np.zeros(5))


@pytest.mark.parametrize("name", ["benzene", "ase_C6H6"])
def test_nearly_planar_molecule_is_continuous_across_the_planar_switch(name):
    # A pucker ε changes Ω by O(ε); below _FLAT the molecule is handled in its plane. ASE's benzene
    # is co-circular to ~1e-7 Å, so it has true facets of 2.8e-7 sr, which a hull of relative
    # thickness 1e-8 must keep (its combinatorics are found in the whitened frame).
    z, x = np.array(MOLECULES[name][0]), MOLECULES[name][1]
    flat = facet_dict(neighbors_from_arrays(z, x, **ALL))
    assert min(flat.values()) < 1e-6 if name == "ase_C6H6" else min(flat.values()) > 0.1
    for eps in (1e-6, 1e-8, 1e-9, 1e-11):
        y = x.copy()
        y[:, 2] = eps * np.random.default_rng(0).choice([-1.0, 1.0], len(y))
        for seed in range(3):
            got = facet_dict(neighbors_from_arrays(z, Rotation.random(random_state=seed).apply(y) + seed, **ALL))
            assert max(abs(got.get(k, 0.0) - flat.get(k, 0.0)) for k in got.keys() | flat.keys()) < 20 * eps, eps


def test_original_mode_cells_do_not_depend_on_the_other_centres():
    # `_dual_cells` handles several centres in one call. Centre 0's cell has a vertex pair 1e-6 Å
    # apart (a perturbed cube corner); a second cluster far away has a cell with a vertex ~1e4 Å
    # out (four nearly coplanar points). Alone or together, centre 0's facets are the same.
    rng = np.random.default_rng(0)
    cube = np.array(list(itertools.product((1.0, -1.0), repeat=3)))
    shell = 2 * np.concatenate([cube, np.eye(3), -np.eye(3)])
    near = np.concatenate([[[0.0, 0, 0]], shell + rng.normal(scale=1e-6, size=shell.shape)])
    square = np.array([[0, 0, 0], [1.3, 0, 0], [0, 1.3, 0], [1.3, 1.3, 1e-4]]) + 1e3
    far = np.concatenate([square, square[0] + 1.3 * np.concatenate([np.eye(3), -np.eye(3)]) * [[1, 1, 3]]])
    points = np.concatenate([near, far])
    spheres = [np.arange(1, len(near)), len(near) + np.arange(1, len(far))]
    alone = neighbors._dual_cells(points, [0], spheres[:1])[0]
    together = neighbors._dual_cells(points, [0, len(near)], spheres)
    assert together[1] is not None and len(together[1][0]) > 0
    np.testing.assert_array_equal(alone[0], together[0][0])
    np.testing.assert_array_equal(alone[1], together[0][1])
