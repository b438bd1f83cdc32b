"""Tests for scannet_jax.neighbor_lists: hand-computed lists, the tie rule, periodic images against a
brute-force enumeration, invariances, molecules with fill, the fractional atom order, and the axis
settings of the augmentation."""

import ase
import numpy as np
import pytest
from ase.build import bulk, make_supercell
from scipy.spatial.transform import Rotation

from scannet_jax import neighbor_lists as nl


def brute_force_distances(atoms: ase.Atoms, reach: int = 4) -> np.ndarray:
    """[N, M] all distances to every image with |shift| <= reach (self excluded), sorted."""
    grid = np.stack(np.meshgrid(*[np.arange(-reach, reach + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    images = (atoms.positions[None, :, :] + (grid @ atoms.cell.array)[:, None, :]).reshape(-1, 3)
    d = np.linalg.norm(images[None, :, :] - atoms.positions[:, None, :], axis=-1)
    d[d < 1e-9] = np.inf
    return np.sort(d, axis=1)


def alternating_cubic(a: float = 2.0) -> ase.Atoms:
    """Simple cubic lattice, Na and Cl alternating along x only: cell (2a, a, a)."""
    return ase.Atoms("NaCl", positions=[[0, 0, 0], [a, 0, 0]], cell=np.diag([2 * a, a, a]), pbc=True)


def water() -> ase.Atoms:
    angle = np.deg2rad(104.5)
    return ase.Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [0.96 * np.cos(angle), 0.96 * np.sin(angle), 0]])


def z_sequences(atoms: ase.Atoms, lists: nl.NeighbourLists) -> np.ndarray:
    return np.where(lists.mask, atoms.numbers[np.maximum(lists.indices, 0)], 0)


def test_simple_cubic_by_hand():
    a = 2.0
    lists = nl.neighbour_lists(bulk("Po", "sc", a=a))
    np.testing.assert_allclose(lists.distances[0], [a] * 6 + [a * np.sqrt(2)] * 12 + [a * np.sqrt(3)], rtol=1e-12)
    assert lists.mask.all() and (lists.indices == 0).all()  # every neighbour is an image of the one atom
    shifts = lists.shifts[0]
    assert sorted(map(tuple, shifts[:6])) == sorted(
        tuple(s * e) for s in (-1, 1) for e in np.eye(3, dtype=int))
    assert {tuple(np.abs(s)) for s in shifts[6:18]} == {(1, 1, 0), (1, 0, 1), (0, 1, 1)}
    assert len({tuple(s) for s in shifts[6:18]}) == 12
    # The 19th place is a tie among the 8 corners (a√3, same atom, same Z): the lowest shift wins.
    assert shifts[18].tolist() == [-1, -1, -1]


def test_tie_rule_orders_a_shell_by_z_and_cut_keeps_lowest_z():
    atoms = alternating_cubic()
    z = z_sequences(atoms, nl.neighbour_lists(atoms))
    # Na at 0: a-shell 4 Na (±y, ±z) then 2 Cl (±x); a√2-shell 4 Na then 8 Cl; a√3: 8 Cl, one kept.
    assert z[0].tolist() == [11] * 4 + [17] * 2 + [11] * 4 + [17] * 8 + [17]
    assert z[1].tolist() == [11] * 2 + [17] * 4 + [11] * 8 + [17] * 4 + [11]
    # K = 8 cuts the a√2 shell (4 Na, 8 Cl) after two places: the two are Na.
    z8 = z_sequences(atoms, nl.neighbour_lists(atoms, num_neighbours=8))
    assert z8[0].tolist() == [11] * 4 + [17] * 2 + [11] * 2
    assert z8[1].tolist() == [11] * 2 + [17] * 4 + [11] * 2


def skewed_random_cell() -> ase.Atoms:
    rng = np.random.default_rng(0)
    cell = np.array([[3.1, 0.0, 0.0], [2.9, 2.7, 0.0], [-2.5, 1.3, 3.4]])  # far from reduced
    return ase.Atoms("LiMgO", scaled_positions=rng.random((3, 3)) * 2 - 0.5, cell=cell, pbc=True)


@pytest.mark.parametrize("atoms", [
    skewed_random_cell(),
    bulk("Cu", "fcc", a=3.6, cubic=True),  # the 19th lies in a shell of 24: more candidates than first asked for
    bulk("Ti", "hcp", a=2.95, c=4.68),
], ids=["skewed", "fcc", "hcp"])
def test_periodic_images_match_brute_force(atoms):
    lists = nl.neighbour_lists(atoms)
    np.testing.assert_allclose(np.sort(lists.distances, axis=1), brute_force_distances(atoms)[:, :19], rtol=1e-10)
    vectors = atoms.positions[lists.indices] + lists.shifts @ atoms.cell.array - atoms.positions[:, None, :]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), lists.distances, rtol=1e-12)
    assert (np.diff(lists.distances, axis=1) > -nl.TIE_TOLERANCE).all()  # sorted up to the shell rule
    assert len({(i, j, tuple(n)) for i in range(len(atoms))
                for j, n in zip(lists.indices[i], lists.shifts[i])}) == 19 * len(atoms)  # no image twice


def test_small_cell_needs_many_image_shells():
    # A 1-atom cell much shorter along one axis: the 19 nearest lie many cells away along it.
    atoms = ase.Atoms("C", positions=[[0, 0, 0]], cell=np.diag([1.0, 7.0, 7.5]), pbc=True)
    lists = nl.neighbour_lists(atoms)
    # 1..6 Å along ±x, then 7 Å along ±x and ±y, then √50 Å at (±1, ±1, 0) (three of four kept).
    expected = np.repeat(np.arange(1.0, 7.0), 2).tolist() + [7.0] * 4 + [np.sqrt(50.0)] * 3
    np.testing.assert_allclose(lists.distances[0], expected, rtol=1e-12)
    assert np.abs(lists.shifts[0, :12, 0]).tolist() == np.repeat(np.arange(1, 7), 2).tolist()


def test_lists_invariant_to_rotation_translation_order_and_cell_choice():
    atoms = alternating_cubic(2.1)
    atoms = make_supercell(atoms, [[1, 1, 0], [0, 1, 0], [0, 1, 2]])  # 4 atoms, a skewed setting
    atoms.positions += np.random.default_rng(1).normal(0, 0.05, atoms.positions.shape)
    ref = nl.neighbour_lists(atoms)
    ref_z = z_sequences(atoms, ref)

    moved = atoms.copy()
    rotation = Rotation.random(random_state=2).as_matrix()
    perm = np.array([2, 0, 3, 1])
    moved = moved[perm]
    moved.set_cell(moved.cell.array @ rotation.T, scale_atoms=False)
    moved.positions = moved.positions @ rotation.T + [0.3, -1.7, 2.2]
    lists = nl.neighbour_lists(moved)
    np.testing.assert_array_equal(z_sequences(moved, lists), ref_z[perm])
    np.testing.assert_allclose(lists.distances, ref.distances[perm], rtol=1e-10)
    np.testing.assert_array_equal(perm[lists.indices], ref.indices[perm])  # same atoms (no same-Z ties here)

    supercell = make_supercell(atoms, np.diag([2, 1, 1]))
    lists = nl.neighbour_lists(supercell)
    np.testing.assert_array_equal(z_sequences(supercell, lists)[:4], ref_z)
    np.testing.assert_allclose(lists.distances[:4], ref.distances, rtol=1e-10)


@pytest.mark.parametrize("num_neighbours", [8, 19])
def test_tie_rule_is_invariant_to_rotation_translation_order_and_cell_choice(num_neighbours):
    # Exact ties between Na and Cl in the a and a√2 shells (test above), cut at place 8.
    atoms = alternating_cubic()
    ref = nl.neighbour_lists(atoms, num_neighbours=num_neighbours)
    moved = make_supercell(atoms, [[1, 1, 0], [0, 1, 0], [0, 1, 1]])[[1, 0]]  # another cell, atoms swapped
    rotation = Rotation.random(random_state=5).as_matrix()
    moved.set_cell(moved.cell.array @ rotation.T, scale_atoms=True)
    moved.positions += [0.7, -3.1, 1.9]
    lists = nl.neighbour_lists(moved, num_neighbours=num_neighbours)
    np.testing.assert_array_equal(z_sequences(moved, lists)[[1, 0]], z_sequences(atoms, ref))
    np.testing.assert_allclose(lists.distances[[1, 0]], ref.distances, rtol=1e-10)


def test_primitive_and_conventional_cells_give_the_same_sequences():
    primitive = nl.neighbour_lists(bulk("NaCl", "rocksalt", a=5.64))
    conventional = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    lists = nl.neighbour_lists(conventional)
    z = z_sequences(conventional, lists)
    for i, species in enumerate(conventional.numbers):
        row = 0 if species == 11 else 1
        np.testing.assert_array_equal(z[i], z_sequences(bulk("NaCl", "rocksalt", a=5.64), primitive)[row])
        np.testing.assert_allclose(lists.distances[i], primitive.distances[row], rtol=1e-10)
    a = 5.64
    np.testing.assert_allclose(primitive.distances[0], [a / 2] * 6 + [a / np.sqrt(2)] * 12 + [a * np.sqrt(3) / 2],
                               rtol=1e-12)


def test_molecule_with_fewer_than_19_other_atoms_is_filled():
    lists = nl.neighbour_lists(water())
    hh = 2 * 0.96 * np.sin(np.deg2rad(104.5) / 2)
    np.testing.assert_allclose(lists.distances[:, :2], [[0.96, 0.96], [0.96, hh], [0.96, hh]], rtol=1e-12)
    assert np.sort(lists.indices[:, :2], axis=1).tolist() == [[1, 2], [0, 2], [0, 1]]
    assert lists.mask.sum(1).tolist() == [2, 2, 2]
    assert (lists.indices[:, 2:] == -1).all() and (lists.distances[:, 2:] == 0).all()
    assert (lists.shifts == 0).all()
    single = nl.neighbour_lists(ase.Atoms("He", positions=[[1.0, 2.0, 3.0]]))
    assert not single.mask.any() and single.indices.shape == (1, 19)


def test_large_molecule_matches_brute_force_and_is_rotation_invariant():
    rng = np.random.default_rng(3)
    positions = rng.uniform(0, 6, (30, 3))
    atoms = ase.Atoms(numbers=rng.integers(1, 10, 30), positions=positions)
    lists = nl.neighbour_lists(atoms)
    d = np.linalg.norm(positions[None] - positions[:, None], axis=-1)
    np.testing.assert_allclose(np.sort(lists.distances, axis=1), np.sort(d, axis=1)[:, 1:20], rtol=1e-12)
    assert lists.mask.all()
    rotated = atoms.copy()
    rotated.positions = positions @ Rotation.random(random_state=4).as_matrix().T - 5.0
    np.testing.assert_array_equal(nl.neighbour_lists(rotated).indices, lists.indices)


@pytest.mark.parametrize("atoms, message", [
    (ase.Atoms("H2", positions=[[0, 0, 0], [0.05, 0, 0]]), "0.05 Å apart"),
    (ase.Atoms("H", cell=np.diag([1, 1, 1]), pbc=[True, True, False]), "pbc"),
    (ase.Atoms("H", cell=[[1, 0, 0], [2, 0, 0], [0, 0, 1]], pbc=True), "singular"),
])
def test_bad_structures_are_refused(atoms, message):
    with pytest.raises(ValueError, match=message):
        nl.neighbour_lists(atoms)


def test_atom_order_by_fractional_coordinates():
    cell = np.diag([2.0, 3.0, 4.0])
    frac = np.array([[0.5, 0.1, 0.0], [0.2, 0.9, 0.5], [0.5, 0.1 - 1e-9, -0.25], [1.0 - 1e-9, 0.3, 0.0]])
    positions = frac @ cell
    # Wrapped: [0.5, 0.1, 0], [0.2, 0.9, 0.5], [0.5, 0.1, 0.75] (0.1 - 1e-9 equals 0.1), [0, 0.3, 0].
    assert nl.atom_order(positions, cell, True).tolist() == [3, 1, 0, 2]
    assert nl.atom_order(positions, cell, True, axes=(1, 0, 2)).tolist() == [0, 2, 3, 1]
    assert nl.atom_order(positions, cell, True, axes=(2, 1, 0)).tolist() == [0, 3, 1, 2]
    assert nl.atom_order(positions, None, False).tolist() == [1, 2, 0, 3]  # molecules: Cartesian x, y, z


def test_sequence_inputs_and_padding():
    atoms = water()
    lists = nl.neighbour_lists(atoms)
    seq = nl.sequence_inputs(atoms.numbers, lists, np.array([2, 0, 1]))
    assert seq.atomic_numbers.tolist() == [1, 8, 1]
    assert seq.neighbour_numbers[:, :3].tolist() == [[8, 1, 0], [1, 1, 0], [8, 1, 0]]
    assert (seq.neighbour_numbers[:, 2:] == 0).all() and seq.neighbour_distances.dtype == np.float32
    batch = nl.pad_sequences([seq, seq], num_atoms=5, num_graphs=3)
    assert batch["sequence_lengths"].tolist() == [3, 3, 0]
    assert batch["sequence"].tolist() == [0, 1, 2, 5, 6, 7] + [0] * 9  # structure g at rows 5g..5g+2
    assert batch["neighbour_numbers"].shape == (15, 19)
    np.testing.assert_array_equal(batch["atomic_numbers"].reshape(3, 5), [[1, 8, 1, 0, 0]] * 2 + [[0] * 5])
    np.testing.assert_array_equal(batch["neighbour_numbers"][5:8], seq.neighbour_numbers)
    with pytest.raises(ValueError, match="3 atoms, more than the bucket's 2"):
        nl.pad_sequences([seq], num_atoms=2)


def orthorhombic() -> ase.Atoms:
    return ase.Atoms("MgO2", scaled_positions=[[0, 0, 0], [0.2, 0.3, 0.4], [0.7, 0.6, 0.1]],
                     cell=np.diag([3.0, 4.0, 5.0]), pbc=True)


@pytest.mark.parametrize("atoms, swaps, permutations", [
    (bulk("NaCl", "rocksalt", a=5.64, cubic=True), 1, 1),  # every axis equivalent
    (bulk("Cu", "fcc", a=3.6), 1, 1),  # primitive fcc: a, b, c equivalent, the atom at the origin
    (ase.Atoms("TiO", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=np.diag([3.0, 3.0, 4.5]), pbc=True),
     3, 3),  # tetragonal: the xy swap is identical, yz and xz are not; cyclic ones equal those two
    (ase.Atoms("TiO", scaled_positions=[[0, 0, 0], [0.1, 0.3, 0.5]], cell=np.diag([3.0, 3.0, 4.5]), pbc=True),
     4, 6),  # same metric after the xy swap, but the coordinates differ
    (orthorhombic(), 4, 6),
    (bulk("Cu", "fcc", a=3.6).repeat((1, 1, 2)), 3, 3),  # c doubled: a and b still equivalent
])
def test_equivalent_settings_counts(atoms, swaps, permutations):
    kept = nl.equivalent_settings(atoms.numbers, atoms.positions, atoms.cell.array)
    assert kept[0] == nl.IDENTITY and len(kept) == swaps
    assert len(nl.equivalent_settings(atoms.numbers, atoms.positions, atoms.cell.array,
                                      nl.AXIS_PERMUTATIONS)) == permutations
    rotation = Rotation.random(random_state=6).as_matrix()  # settings depend on the metric, not the orientation
    assert nl.equivalent_settings(atoms.numbers, atoms.positions @ rotation.T, atoms.cell.array @ rotation.T) == kept


def test_settings_reorder_atoms_but_keep_positions():
    atoms = orthorhombic()
    orders = [nl.atom_order(atoms.positions, atoms.cell.array, True, axes=p)
              for p in nl.equivalent_settings(atoms.numbers, atoms.positions, atoms.cell.array)]
    # Identity, xy, yz swaps: first key x, y, x ([0, 0.2, 0.7], [0, 0.3, 0.6]); xz: z first, [0, 0.4, 0.1].
    assert [o.tolist() for o in orders] == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 2, 1]]


def test_average_over_settings():
    means = nl.average_over_settings(np.array([1.0, 2.0, 3.0, 10.0]), np.array([0, 0, 0, 2]), 3)
    np.testing.assert_array_equal(means, [2.0, np.nan, 10.0])
