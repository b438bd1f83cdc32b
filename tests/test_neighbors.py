"""Tests for scannet_jax.neighbors: original mode against the fixtures, exact-mode geometry,
invariances, crystals against supercells, and degenerate input."""

from pathlib import Path

import ase
import numpy as np
import pytest
from ase.build import bulk
from scipy.spatial.transform import Rotation

from scannet_jax import neighbors
from scannet_jax.neighbors import FeaturizerSettings, Neighbors, neighbors_from_arrays, voronoi_neighbors
from test_neighbors_symmetric import enumerated_solid_angle

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "original"
NEIGHBOUR_FILES = ("neighbours.npz", "neighbours_extra.npz")
ALL = {"cutoff": np.inf, "min_solid_angle": 0.0, "min_relative_weight": 0.0}  # every facet


def load(name: str) -> dict:
    return dict(np.load(FIXTURES / name))


def structures(data: dict):
    """(name, Z, positions, cell, pbc, edge rows, facet rows) per structure of a neighbour fixture."""
    for s, name in enumerate(data["names"]):
        atoms = slice(data["atom_ptr"][s], data["atom_ptr"][s + 1])
        edges = slice(data["edge_ptr"][s], data["edge_ptr"][s + 1])
        facets = slice(data["facet_ptr"][s], data["facet_ptr"][s + 1])
        pbc = tuple(bool(p) for p in data["pbc"][s])
        yield (str(name), data["Z"][atoms], data["positions"][atoms], data["cell"][s], pbc, edges, facets)


def as_dict(receivers, senders, shifts, *values) -> dict:
    return {(int(i), int(j), tuple(int(x) for x in n)): v
            for i, j, n, *v in zip(receivers, senders, shifts, *values)}


def molecule(name: str) -> tuple[np.ndarray, np.ndarray]:
    data = load("neighbours.npz")
    for n, z, x, *_ in structures(data):
        if n == name:
            return z, x
    raise KeyError(name)


def fixture_molecules():
    for file in NEIGHBOUR_FILES:
        for name, z, x, _, pbc, *_ in structures(load(file)):
            if not any(pbc):
                yield name, z, x


@pytest.mark.parametrize("file", NEIGHBOUR_FILES)
def test_original_mode_reproduces_fixture_edges_and_facets(file):
    data = load(file)
    for name, z, x, cell, pbc, edges, facets in structures(data):
        nb = neighbors_from_arrays(z, x, cell, pbc, mode="original")
        assert isinstance(nb, Neighbors)
        got = as_dict(nb.receivers, nb.senders, nb.shifts, nb.solid_angles, nb.weights, nb.distances)
        want = as_dict(data["edge_center"][edges], data["edge_neighbor"][edges], data["edge_image"][edges],
                       data["edge_solid_angle"][edges], data["edge_rel_weight"][edges], data["edge_distance"][edges])
        assert got.keys() == want.keys(), name
        assert np.allclose([got[k] for k in want], [want[k] for k in want], rtol=0, atol=1e-5), name
        every = neighbors_from_arrays(z, x, cell, pbc, mode="original", **ALL)
        got = as_dict(every.receivers, every.senders, every.shifts, every.solid_angles)
        want = as_dict(data["facet_center"][facets], data["facet_neighbor"][facets], data["facet_image"][facets],
                       data["facet_solid_angle"][facets])
        assert got.keys() == want.keys(), name
        assert np.allclose([got[k] for k in want], [want[k] for k in want], rtol=0, atol=1e-5), name


def test_original_mode_keeps_the_bugs():
    z, x = molecule("qm9_000214_C1=CC=CC=C1")
    nb = neighbors_from_arrays(z, x, mode="original")
    assert 9 not in nb.receivers  # benzene's H 9: its C-H facet is unbounded and dropped
    assert len(nb.receivers) == 26
    z, x = molecule("qm9_033266_C#CC#CC#CC1CC1")
    nb = neighbors_from_arrays(z, x, mode="original")
    assert np.abs(nb.shifts).sum(axis=1).max() > 0  # cross-box image edges of a long molecule


def test_exact_mode_on_fixture_molecules():
    for name, z, x in fixture_molecules():
        nb = voronoi_neighbors(ase.Atoms(numbers=z, positions=x))
        assert not nb.shifts.any(), name  # no periodic images for a molecule
        assert set(nb.receivers.tolist()) == set(range(len(z))), name  # every atom has a neighbour
        assert np.all(np.diff(nb.receivers) >= 0), name
        assert nb.distances.max() <= 4.0 and nb.solid_angles.min() >= 0.4 and nb.weights.min() >= 0.2, name
        np.testing.assert_allclose(nb.distances, np.linalg.norm(x[nb.senders] - x[nb.receivers], axis=1))


def test_exact_benzene_keeps_every_bond():
    z, x = molecule("qm9_000214_C1=CC=CC=C1")
    nb = neighbors_from_arrays(z, x)
    assert len(nb.receivers) == 36
    for h in np.flatnonzero(z == 1):
        carbon = np.flatnonzero(z == 6)[np.linalg.norm(x[z == 6] - x[h], axis=1).argmin()]
        assert carbon in nb.senders[nb.receivers == h]
        assert h in nb.senders[nb.receivers == carbon]


def random_motion(z, x, seed):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(z))
    rotation = Rotation.random(random_state=seed).as_matrix()
    return z[perm], x[perm] @ rotation.T + rng.normal(scale=5.0, size=3), perm


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_mode_invariant_to_rotation_translation_permutation(seed):
    for name, z, x in fixture_molecules():
        a = neighbors_from_arrays(z, x, **ALL)
        z2, x2, perm = random_motion(z, x, seed)
        b = neighbors_from_arrays(z2, x2, **ALL)
        first = as_dict(a.receivers, a.senders, a.shifts, a.solid_angles, a.weights, a.distances)
        second = as_dict(perm[b.receivers], perm[b.senders], b.shifts, b.solid_angles, b.weights, b.distances)
        assert first.keys() == second.keys(), name
        np.testing.assert_allclose([first[k] for k in first], [second[k] for k in first], rtol=0, atol=1e-8,
                                   err_msg=name)


def test_relative_weight_is_one_at_each_centres_largest_facet():
    for name, z, x in fixture_molecules():
        nb = neighbors_from_arrays(z, x, **ALL)
        best = np.zeros(len(z))
        np.maximum.at(best, nb.receivers, nb.weights)
        np.testing.assert_allclose(best, 1.0, err_msg=name)
        np.testing.assert_allclose(nb.weights, nb.solid_angles / np.maximum.reduceat(
            nb.solid_angles, np.searchsorted(nb.receivers, np.arange(len(z))))[nb.receivers])


def test_unbounded_facets_have_their_exact_solid_angle():
    # Two atoms: the facet is a whole plane, 2π.
    nb = neighbors_from_arrays([1, 1], [[0, 0, 0], [0, 0, 0.74]])
    np.testing.assert_allclose(nb.solid_angles, [2 * np.pi] * 2, atol=1e-12)
    np.testing.assert_allclose(nb.weights, [1, 1])
    # Collinear CO2: every facet is a whole plane; the O atoms do not see each other.
    nb = neighbors_from_arrays([8, 6, 8], [[-1.16, 0, 0], [0, 0, 0], [1.16, 0, 0]])
    assert sorted(zip(nb.receivers.tolist(), nb.senders.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    np.testing.assert_allclose(nb.solid_angles, 2 * np.pi, atol=1e-12)
    # Equilateral triangle of side s: each facet is a half-plane at h = s/2 whose edge line is
    # r = s/(2√3) beyond the foot point: Ω = π + 2 atan(r/h) = 4π/3.
    s = 1.3
    x = s * np.array([[0, 0, 0], [1, 0, 0], [0.5, np.sqrt(3) / 2, 0]])
    nb = neighbors_from_arrays([7, 7, 7], Rotation.random(random_state=3).apply(x) + 2.0, **ALL)
    assert len(nb.receivers) == 6
    np.testing.assert_allclose(nb.solid_angles, 4 * np.pi / 3, atol=1e-10)


def test_cells_of_a_bounded_centre_cover_the_sphere():
    z, x = molecule("qm9_000001_C")  # methane: the carbon's cell is bounded
    nb = neighbors_from_arrays(z, x, **ALL)
    assert nb.solid_angles[nb.receivers == 0].sum() == pytest.approx(4 * np.pi, abs=1e-10)


def test_simple_cubic_and_bcc_cells_by_hand():
    a = 3.1
    nb = voronoi_neighbors(ase.Atoms("Po", cell=np.eye(3) * a, pbc=True))
    assert sorted(map(tuple, nb.shifts.tolist())) == sorted(
        [tuple(v) for v in np.concatenate([np.eye(3, dtype=int), -np.eye(3, dtype=int)])])
    np.testing.assert_allclose(nb.solid_angles, 4 * np.pi / 6)
    np.testing.assert_allclose(nb.distances, a)
    assert not nb.receivers.any() and not nb.senders.any()
    # bcc, one atom: 6 square faces (side a√2/4 at a/2: Ω = 4 asin(1/9)) and 8 hexagons.
    nb = voronoi_neighbors(bulk("Fe", "bcc", a=2.87), **ALL)
    square = 4 * np.arcsin(1 / 9)
    hexagon = (4 * np.pi - 6 * square) / 8
    np.testing.assert_allclose(np.sort(nb.solid_angles), [square] * 6 + [hexagon] * 8, atol=1e-12)
    np.testing.assert_allclose(np.sort(nb.distances), [2.87 * np.sqrt(3) / 2] * 8 + [2.87] * 6)


def crystals():
    for file in NEIGHBOUR_FILES:
        for name, z, x, cell, pbc, *_ in structures(load(file)):
            if all(pbc):
                yield name, ase.Atoms(numbers=z, positions=x, cell=cell, pbc=True)


def test_crystal_edges_equal_those_of_its_supercell():
    names = []
    for name, atoms in crystals():
        names.append(name)
        n = len(atoms)
        nb = voronoi_neighbors(atoms)
        every = voronoi_neighbors(atoms, **ALL)
        np.testing.assert_allclose(np.bincount(every.receivers, every.solid_angles, n), 4 * np.pi, atol=1e-9)
        big = atoms.repeat((2, 2, 2))
        sup = voronoi_neighbors(big)
        home = sup.receivers < n  # ase.repeat puts the original cell's atoms first
        vec = lambda pos, cell, nbs, rows: pos[nbs.senders[rows]] + nbs.shifts[rows] @ cell - pos[nbs.receivers[rows]]
        rows = np.arange(len(nb.receivers))
        mine = {(int(i), int(j % n), tuple(np.round(v, 6))): (w, r) for i, j, v, w, r in zip(
            nb.receivers, nb.senders, vec(atoms.positions, atoms.cell.array, nb, rows), nb.solid_angles, nb.weights)}
        rows = np.flatnonzero(home)
        theirs = {(int(i), int(j % n), tuple(np.round(v, 6))): (w, r) for i, j, v, w, r in zip(
            sup.receivers[rows], sup.senders[rows], vec(big.positions, big.cell.array, sup, rows),
            sup.solid_angles[rows], sup.weights[rows])}
        assert mine.keys() == theirs.keys(), name
        np.testing.assert_allclose([mine[k] for k in mine], [theirs[k] for k in mine], atol=1e-10, err_msg=name)
    assert {"NaCl_rocksalt_a5.64", "SrTiO3_cubic_a3.905", "ZnO_wurtzite_a3.25_c5.2",
            "Cu_fcc_a3.61_primitive"} <= set(names)


def test_skewed_cell_gives_the_same_crystal():
    fcc = bulk("Cu", "fcc", a=3.61)
    skewed = fcc.copy()
    skewed.set_cell(np.array([[1, 0, 0], [3, 1, 0], [-2, 4, 1]]) @ fcc.cell.array, scale_atoms=False)
    a, b = voronoi_neighbors(fcc), voronoi_neighbors(skewed)
    assert len(a.receivers) == len(b.receivers) == 12
    vectors = lambda atoms, nb: np.round(nb.shifts @ atoms.cell.array, 6)
    assert sorted(map(tuple, vectors(fcc, a))) == sorted(map(tuple, vectors(skewed, b)))
    np.testing.assert_allclose(np.sort(a.solid_angles), np.sort(b.solid_angles), atol=1e-12)


def test_one_atom_molecule_and_two_atoms():
    assert len(neighbors_from_arrays([6], [[1.0, 2.0, 3.0]]).receivers) == 0
    nb = neighbors_from_arrays([1, 1], [[0, 0, 0], [0, 0, 0.74]], mode="original")
    assert sorted(nb.receivers.tolist()) == [0, 1]


@pytest.mark.parametrize("numbers, positions, cell, pbc, message", [
    ([], np.zeros((0, 3)), None, False, "no atoms"),
    ([1, 1], [[0, 0, 0], [0, 0, 0.05]], None, False, "atoms 0 and 1 are 0.05 Å apart"),
    ([1, 6, 1], [[0, 0, 0], [0, 0, np.nan], [1, 0, 0]], None, False, "atom 1: non-finite"),
    ([1, 6, 1], [[0, 0, 0], [0, 0, np.inf], [1, 0, 0]], None, False, "atom 1: non-finite"),
    ([1, 95], [[0, 0, 0], [0, 0, 1]], None, False, "atom 1: atomic number 95 outside 1..94"),
    ([0, 1], [[0, 0, 0], [0, 0, 1]], None, False, "atom 0: atomic number 0"),
    ([1], [[0, 0, 0]], np.eye(3), (True, True, False), "not supported"),
    ([1], [[0, 0, 0]], [[1, 0, 0], [0, 1, 0], [1, 1, 0]], True, "singular"),
    ([1, 1], [[0, 0, 0], [2.95, 0, 0]], np.eye(3) * 3, True, r"atoms 0 and 1 \(image \[-1, 0, 0\]\) are 0.05 Å"),
    ([1], [[0, 0, 0]], np.diag([3, 3, 0.05]), True, r"atoms 0 and 0 \(image \[0, 0, -1\]\) are 0.05 Å"),
])
@pytest.mark.parametrize("mode", neighbors.MODES)
def test_bad_input_is_named(numbers, positions, cell, pbc, message, mode):
    with pytest.raises(ValueError, match=message):
        neighbors_from_arrays(np.array(numbers, int), np.array(positions, float), cell, pbc, mode=mode)


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        neighbors_from_arrays([1, 1], [[0, 0, 0], [0, 0, 1]], mode="fast")
    with pytest.raises(ValueError, match="mode"):
        FeaturizerSettings(mode="fast")


def test_settings_key():
    key = FeaturizerSettings().key()
    assert key == f"nb{neighbors.NEIGHBORS_VERSION}-exact-d4-w0.4-r0.2"
    others = {FeaturizerSettings(mode="original").key(), FeaturizerSettings(cutoff=6.0).key(),
              FeaturizerSettings(min_solid_angle=0.2).key(), FeaturizerSettings(min_relative_weight=0.1).key()}
    assert key not in others and len(others) == 4
    assert hash(FeaturizerSettings()) == hash(FeaturizerSettings())  # frozen: usable as a dict key


def test_atoms_and_arrays_agree():
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    a = voronoi_neighbors(atoms, mode="original")
    b = neighbors_from_arrays(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, mode="original")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a.receivers.dtype == np.int64 and a.shifts.shape == (len(a.receivers), 3)


@pytest.mark.parametrize("name", ["qm9_014562_C#CC#CC#CC#C", "qm9_000050_N1C=CC=C1", "qm9_005343_C#CC1=NC=CC=N1",
                                  "qm9_023751_OC1=CC=CC=C1F", "qm9_000214_C1=CC=CC=C1", "qm9_000012_NC=O"])
def test_exact_mode_equals_a_vertex_enumeration_on_every_facet(name):
    # These molecules have Voronoi features far beyond the ghost points (nearly linear or planar).
    z, x = next((z, x) for n, z, x in fixture_molecules() if n == name)
    nb = neighbors_from_arrays(z, x, **ALL)
    got = {(int(i), int(j)): w for i, j, w in zip(nb.receivers, nb.senders, nb.solid_angles)}
    want = {(i, j): enumerated_solid_angle(x, i, j) for i in range(len(z)) for j in range(len(z)) if i != j}
    for key, value in want.items():
        assert got.get(key, 0.0) == pytest.approx(value, abs=1e-8), (name, key)
    assert set(got) <= set(want)
    if name == "qm9_014562_C#CC#CC#CC#C":  # facets the ghost construction alone missed
        assert len(got) == 68 and got[(2, 8)] == pytest.approx(3.061e-3, abs=1e-6)  # 54 before


def test_three_atoms_give_half_planes():
    # Any three atoms: every facet is a half-plane whose edge is the line through the circumcentre
    # normal to their plane; Ω = π + 2 atan(r / h), r the signed distance of the pair's midpoint
    # from that line (positive inside), h half the pair's distance. HCN (qm9 #5) is straight to
    # 1e-10 rad, so its H-N facets are tiny; both its (i, j) and (j, i) facets must be exact.
    z, x = molecule("qm9_000005_C#N")
    for positions in (x, np.array([[0, 0, 0], [1.2, 0, 0], [0.3, 0.9, 0.1]])):
        nb = neighbors_from_arrays([1, 1, 1], positions, **ALL)
        got = {(int(i), int(j)): w for i, j, w in zip(nb.receivers, nb.senders, nb.solid_angles)}
        a, b, c = positions
        normal = np.cross(b - a, c - a)
        d2 = lambda v: v @ v  # noqa: E731
        circumcenter = a + (d2(c - a) * np.cross(normal, b - a) + d2(b - a) * np.cross(c - a, normal)) / (2 * d2(normal))
        for i in range(3):
            for j in range(3):
                if i == j:
                    continue
                k = 3 - i - j
                mid = (positions[i] + positions[j]) / 2
                edge = np.cross(normal, positions[j] - positions[i])
                edge /= np.linalg.norm(edge)
                edge *= -np.sign(edge @ (positions[k] - mid))  # away from k: the half-plane's side
                want = np.pi + 2 * np.arctan2((mid - circumcenter) @ edge, np.linalg.norm(positions[j] - positions[i]) / 2)
                assert got.get((i, j), 0.0) == pytest.approx(want, abs=1e-8), (i, j)
