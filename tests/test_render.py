"""Ball-and-stick pictures: bonds from covalent radii, cells, supercells, the PNG."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from ase.build import bulk, molecule

from scannet_jax import render

A_NACL = 5.64  # Å, rock salt


def bond_counts(atoms, bonds):
    return np.bincount(np.concatenate([bonds.first, bonds.second]), minlength=len(atoms))


def test_rock_salt_each_atom_has_six_bonds_through_images():
    primitive = bulk("NaCl", "rocksalt", a=A_NACL)
    bonds = render.find_bonds(primitive)
    assert len(bonds.first) == 6 and bond_counts(primitive, bonds).tolist() == [6, 6]
    np.testing.assert_allclose(bonds.lengths, A_NACL / 2)
    # the six images of Cl bonded to Na are ±a/2 along x, y, z
    vectors = primitive.positions[bonds.second] + bonds.shifts @ primitive.cell[:] - primitive.positions[bonds.first]
    np.testing.assert_allclose(np.sort(np.abs(vectors).max(axis=1)), A_NACL / 2)
    assert {tuple(np.round(v / (A_NACL / 2)).astype(int)) for v in vectors} == \
        {(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)}
    conventional = bulk("NaCl", "rocksalt", a=A_NACL, cubic=True)
    assert bond_counts(conventional, render.find_bonds(conventional)).tolist() == [6] * 8
    supercell = primitive.repeat((2, 2, 2))
    assert len(render.find_bonds(supercell).first) == 48


def test_metal_metal_pairs_only_on_request():
    primitive = bulk("NaCl", "rocksalt", a=A_NACL)
    # Na-Na 3.99 Å < 1.25 * 2 * 1.66 Å: the 12 Na neighbours of Na (6 bonds to its own images)
    bonds = render.find_bonds(primitive, bond_scale=1.25, metal_metal=True)
    assert len(bonds.first) == 12
    self_bonds = bonds.first == bonds.second
    assert self_bonds.sum() == 6 and (primitive.numbers[bonds.first[self_bonds]] == 11).all()
    assert len(render.find_bonds(primitive, bond_scale=1.25).first) == 6
    copper = bulk("Cu", "fcc", a=3.61)
    assert len(render.find_bonds(copper).first) == 0
    assert len(render.find_bonds(copper, metal_metal=True).first) == 6  # 12 neighbours, each bond once


def test_benzene_has_twelve_bonds():
    benzene = molecule("C6H6")
    bonds = render.find_bonds(benzene)
    assert len(bonds.first) == 12 and not bonds.shifts.any()
    kinds = sorted("".join(sorted(benzene.get_chemical_symbols()[k] for k in pair))
                   for pair in zip(bonds.first, bonds.second))
    assert kinds == ["CC"] * 6 + ["CH"] * 6
    assert bond_counts(benzene, bonds).tolist() == [3] * 6 + [1] * 6


def draw(atoms, values=None, **kwargs):
    fig, ax = plt.subplots()
    values = np.linspace(0, 1, len(atoms)) if values is None else values
    drawing = render.draw_structure(ax, atoms, values, norm=matplotlib.colors.Normalize(0, 1),
                                    cmap=matplotlib.colormaps["viridis"], **kwargs)
    plt.close(fig)
    return drawing


def test_crystal_drawing_has_cell_boundary_copies_and_bonds():
    conventional = bulk("NaCl", "rocksalt", a=A_NACL, cubic=True)
    drawing = draw(conventional)
    # the 3 x 3 x 3 grid of sites at 0, a/2, a; nearest-neighbour sticks of that grid, two halves each
    assert len(drawing.atom_index) == 27 and drawing.cell_lines.shape == (12, 2, 2)
    assert len(drawing.sticks) == 2 * 3 * (3 * 3 * 2)
    assert (drawing.atom_index == 0).sum() == 8  # the corner Na on all eight corners
    corners = {tuple(np.round(xy, 6)) for xy in drawing.cell_lines.reshape(-1, 2)}
    assert len(corners) == 8  # the cube's corners, each shared by three edges
    half = np.linalg.norm(drawing.sticks[:, 1] - drawing.sticks[:, 0], axis=1)
    assert half.max() <= A_NACL / 4 + 1e-9  # projections of half bonds (a/2 long)
    # balls + half sticks + cell edges in one depth-sorted collection
    assert len(drawing.collection.get_paths()) == 27 + 108 + 12
    with_outside = draw(conventional, outside_bonds=True)
    assert len(with_outside.sticks) == 27 * 6  # every drawn atom: a half stick to each of its 6 partners
    supercell = draw(bulk("NaCl", "rocksalt", a=A_NACL), repeat=(2, 2, 2))
    assert len(supercell.cell_lines) == 12 and set(supercell.atom_index) == set(range(16))


def test_molecule_drawing_has_sticks_and_no_cell():
    benzene = molecule("C6H6")
    drawing = draw(benzene, bonds=True)
    assert len(drawing.atom_index) == 12 and len(drawing.sticks) == 24 and len(drawing.cell_lines) == 0
    assert len(draw(benzene, bonds=False).sticks) == 0
    colours = dict(zip(drawing.atom_index.tolist(), drawing.ball_colors))
    np.testing.assert_allclose(colours[0], matplotlib.colormaps["viridis"](0.0))
    np.testing.assert_allclose(colours[11], matplotlib.colormaps["viridis"](1.0))


def test_render_ga_writes_png_with_legacy_signature(tmp_path):
    crystal = bulk("NaCl", "rocksalt", a=A_NACL)
    render.render_ga(crystal, np.array([0.7, 0.3]), tmp_path / "nacl.png", "NaCl")  # as cli_predict calls it
    image = matplotlib.image.imread(tmp_path / "nacl.png")
    assert image.shape[:2] == (int(4.5 * 120), int(5.5 * 120))
    assert image[..., :3].std() > 0.05  # something was drawn
    render.render_ga(molecule("CH4"), np.full(5, 0.2), tmp_path / "ch4.png", "CH4", repeat=(1, 1, 1))
    assert (tmp_path / "ch4.png").stat().st_size > 1000


def test_render_ga_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"need 5 finite GA scores, got shape \(4,\)"):
        render.render_ga(molecule("CH4"), np.full(4, 0.25), tmp_path / "x.png", "x")
    with pytest.raises(ValueError, match=r"need 5 finite GA scores"):
        render.render_ga(molecule("CH4"), np.array([0.2, 0.2, np.nan, 0.2, 0.2]), tmp_path / "x.png", "x")
    with pytest.raises(ValueError, match=r"repeat=\(2, 1, 1\) .* 1 along non-periodic directions"):
        render.render_ga(molecule("CH4"), np.full(5, 0.2), tmp_path / "x.png", "x", repeat=(2, 1, 1))
