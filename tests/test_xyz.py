"""Tests of scannet_jax.datasets.xyz on small hand-written files."""

import gzip
import re

import ase
import ase.db
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from scannet_jax.datasets import xyz

WATER_FRAMES = """\
3
-7.5 -1.25 -100.0
O 0.0 0.0 0.1
H 0.0 0.75 -0.5
H 0.0 -0.75 -0.5
2
-8.0 0.5 -50.25
C 0.0 0.0 0.0
o 1.2 0.0 0.0
"""

CRYSTAL = """\
2
Lattice="2.8 0.0 0.0 0.0 2.8 0.0 0.0 0.0 3.1" Properties=species:S:1:pos:R:3:forces:R:3 energy=-16.5 formation_energy=0.125 pbc="T T F"
Fe 0.0 0.0 0.0 0.1 0.0 0.0
Sm 1.4 1.4 1.55 -0.1 0.0 0.0
1
formation_energy=-0.5 energy=-3.0 name="an isolated atom"
Fe 0.0 0.0 0.0
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def error_at(path, frame, line):
    """Regex of the location prefix every parse error starts with."""
    where = rf"{re.escape(str(path))}: frame {frame} \(0-based\)"
    return where + (rf", line {line} \(1-based\)" if line is not None else "")


@pytest.mark.parametrize("name", ["water.xyz", "water.xyz.gz"])
def test_property_xyz_reads_frames_targets_and_sources(tmp_path, name):
    path = write(tmp_path, name, WATER_FRAMES)
    data = xyz.read_property_xyz(path, ["a", "b", "c"])
    assert len(data) == 2
    np.testing.assert_array_equal(data.targets["a"], [-7.5, -8.0])
    np.testing.assert_array_equal(data.targets["c"], [-100.0, -50.25])
    assert data.targets["a"].dtype == np.float64
    first, second = data.structures
    np.testing.assert_array_equal(first.numbers, [8, 1, 1])
    np.testing.assert_array_equal(second.numbers, [6, 8])  # lower-case "o" is oxygen
    np.testing.assert_allclose(first.positions[1], [0.0, 0.75, -0.5])
    assert first.positions.shape == (3, 3) and first.positions.dtype == np.float64
    np.testing.assert_array_equal(first.cell, np.zeros((3, 3)))
    np.testing.assert_array_equal(first.pbc, [False, False, False])
    assert data.sources == [(str(path), 0), (str(path), 1)]


def test_fullerene_and_pt_graphene_names(tmp_path):
    path = write(tmp_path, "f.xyz", WATER_FRAMES)
    fullerene = xyz.read_fullerene(path)
    assert set(fullerene.targets) == {"homo", "lumo", "total_energy"}
    np.testing.assert_array_equal(fullerene.targets["lumo"], [-1.25, 0.5])
    two = WATER_FRAMES.replace("-7.5 -1.25 -100.0", "-10.0 -7.25").replace("-8.0 0.5 -50.25", "-3 -3.5")
    pt = xyz.read_pt_graphene(write(tmp_path, "p.xyz", two))
    np.testing.assert_array_equal(pt.targets["energy"], [-2.75, 0.5])
    np.testing.assert_array_equal(pt.targets["ref_energy"], [-7.25, -3.5])


def test_extra_atom_columns_are_ignored(tmp_path):
    # The original's inference output adds a fifth column (the GA score).
    text = "2\n1.0\nC 0 0 0 0.7\nH 0 0 1.1 0.3\n"
    data = xyz.read_property_xyz(write(tmp_path, "ga.xyz", text), ["y"])
    np.testing.assert_allclose(data.structures[0].positions[1], [0, 0, 1.1])


def test_trailing_blank_lines_are_accepted(tmp_path):
    data = xyz.read_property_xyz(write(tmp_path, "t.xyz", WATER_FRAMES + "\n\n"), "abc")
    assert len(data) == 2


@pytest.mark.parametrize("comment, message", [
    ("-7.5 -1.25", r"expected 3 comment values \(homo lumo total_energy\), got 2.*missing total_energy"),
    ("-7.5 -1.25 -100.0 4.0", r"expected 3 comment values .*got 4"),
    ("-7.5 homo=3 -100.0", r"non-numeric comment value"),
])
def test_bad_comment_line_names_file_frame_line(tmp_path, comment, message):
    text = WATER_FRAMES.replace("-8.0 0.5 -50.25", comment)
    path = write(tmp_path, "bad.xyz", text)
    with pytest.raises(ValueError, match=error_at(path, 1, 7) + ": " + message):
        xyz.read_fullerene(path)


def test_frame_with_too_few_atom_lines_in_the_middle(tmp_path):
    text = WATER_FRAMES.replace("H 0.0 -0.75 -0.5\n", "")  # header says 3, two atom lines follow
    path = write(tmp_path, "short.xyz", text)
    # The next header ("2", line 5) is then read as the third atom line of frame 0.
    with pytest.raises(ValueError, match=error_at(path, 0, 5) + r": expected at least 4 columns.*"
                                         r"fewer atoms than its header"):
        xyz.read_fullerene(path)


def test_frame_truncated_at_end_of_file(tmp_path):
    path = write(tmp_path, "trunc.xyz", WATER_FRAMES.rsplit("o 1.2", 1)[0])
    with pytest.raises(ValueError, match=error_at(path, 1, 8) + r": the header announces 2 atoms "
                                         r"but the file ends after 1 atom lines"):
        xyz.read_fullerene(path)


def test_frame_with_too_many_atom_lines(tmp_path):
    text = WATER_FRAMES.replace("H 0.0 -0.75 -0.5\n", "H 0.0 -0.75 -0.5\nH 1 1 1\n")
    path = write(tmp_path, "long.xyz", text)
    with pytest.raises(ValueError, match=error_at(path, 1, 6) + r": expected an atom count, got "
                                         r"'H 1 1 1' \(frame 0 may have more atom lines"):
        xyz.read_fullerene(path)


def test_non_numeric_coordinate(tmp_path):
    path = write(tmp_path, "nan.xyz", WATER_FRAMES.replace("H 0.0 0.75 -0.5", "H 0.0 O.75 -0.5"))
    with pytest.raises(ValueError, match=error_at(path, 0, 4) + r": non-numeric coordinate in "
                                         r"'H 0.0 O.75 -0.5'"):
        xyz.read_fullerene(path)


def test_non_finite_coordinate(tmp_path):
    path = write(tmp_path, "inf.xyz", WATER_FRAMES.replace("o 1.2 0.0 0.0", "o nan 0.0 0.0"))
    with pytest.raises(ValueError, match=error_at(path, 1, 9) + r": non-finite coordinate"):
        xyz.read_fullerene(path)


@pytest.mark.parametrize("symbol", ["Xx", "X", "0", "119"])
def test_unknown_element(tmp_path, symbol):
    path = write(tmp_path, "elem.xyz.gz", WATER_FRAMES.replace("C 0.0 0.0 0.0", f"{symbol} 0.0 0.0 0.0"))
    with pytest.raises(ValueError, match=error_at(path, 1, 8) + rf": unknown element symbol '{symbol}'"):
        xyz.read_fullerene(path)


def test_atomic_numbers_and_odd_case_symbols(tmp_path):
    path = write(tmp_path, "z.xyz", "3\n0\n78 0 0 0\nPT 1 0 0\nc 2 0 0\n")
    np.testing.assert_array_equal(xyz.read_property_xyz(path, ["y"]).structures[0].numbers, [78, 78, 6])


def test_bad_atom_count_and_blank_gap(tmp_path):
    path = write(tmp_path, "count.xyz", "three\n1 2 3\n")
    with pytest.raises(ValueError, match=error_at(path, 0, 1) + r": expected an atom count, got 'three'$"):
        xyz.read_fullerene(path)
    path = write(tmp_path, "gap.xyz", WATER_FRAMES.replace("H 0.0 -0.75 -0.5\n", "H 0.0 -0.75 -0.5\n\n"))
    with pytest.raises(ValueError, match=error_at(path, 1, 6) + r": blank line where an atom count"):
        xyz.read_fullerene(path)


def test_extxyz_reads_lattice_pbc_and_targets(tmp_path):
    path = write(tmp_path, "c.extxyz.gz", CRYSTAL)
    data = xyz.read_extxyz(path, ["formation_energy", "energy"])
    np.testing.assert_array_equal(data.targets["formation_energy"], [0.125, -0.5])
    np.testing.assert_array_equal(data.targets["energy"], [-16.5, -3.0])
    crystal, atom = data.structures
    np.testing.assert_array_equal(crystal.cell, np.diag([2.8, 2.8, 3.1]))
    np.testing.assert_array_equal(crystal.pbc, [True, True, False])
    np.testing.assert_array_equal(crystal.numbers, [26, 62])
    np.testing.assert_allclose(crystal.positions[1], [1.4, 1.4, 1.55])  # not the forces columns
    np.testing.assert_array_equal(atom.cell, np.zeros((3, 3)))  # no Lattice: a molecule
    np.testing.assert_array_equal(atom.pbc, [False] * 3)
    assert data.sources == [(str(path), 0), (str(path), 1)]


def test_extxyz_agrees_with_ase(tmp_path):
    atoms = ase.Atoms("Fe2Sm", positions=[[0, 0, 0], [1.3, 1.2, 0.2], [2.0, 0.1, 1.9]],
                      cell=[[4.0, 0.1, 0], [0.2, 4.1, 0], [0, 0.3, 3.9]], pbc=True)
    atoms.info["formation_energy"] = -0.0625
    path = tmp_path / "ase.extxyz"
    ase.io.write(path, [atoms, atoms], format="extxyz")
    data = xyz.read_extxyz(path, ["formation_energy"])
    for s in data.structures:
        np.testing.assert_allclose(s.cell, atoms.cell[:])
        np.testing.assert_allclose(s.positions, atoms.positions)
        np.testing.assert_array_equal(s.numbers, atoms.numbers)
        np.testing.assert_array_equal(s.pbc, [True] * 3)
    np.testing.assert_array_equal(data.targets["formation_energy"], [-0.0625] * 2)


@pytest.mark.parametrize("old, new, message", [
    ('Lattice="2.8 0.0 0.0 0.0 2.8 0.0 0.0 0.0 3.1"', 'Lattice="2.8 0.0 0.0 0.0 2.8 0.0 0.0 0.0"',
     r'Lattice="2.8 0.0 0.0 0.0 2.8 0.0 0.0 0.0" has 8 values, expected 9'),
    ('Lattice="2.8 0.0 0.0 0.0 2.8 0.0 0.0 0.0 3.1"', 'Lattice="2.8 0.0 0.0 0.0 2.8 0.0 0.0 x 3.1"',
     r"non-numeric value in Lattice"),
    ("formation_energy=0.125", "formation_energy=high", r"target 'formation_energy' is not a number"),
    ("formation_energy=0.125", "", r"target 'formation_energy' missing from the comment line "
                                   r"\(keys: Lattice, Properties, energy, pbc\)"),
    ('pbc="T T F"', 'pbc="T T"', r'pbc="T T" is not three T/F flags'),
    ('pbc="T T F"', 'pbc="T T F', r"malformed extended-xyz comment line"),
    ('Lattice="2.8 0.0 0.0 0.0 2.8 0.0 0.0 0.0 3.1" ', "",
     r'pbc="T T F" is periodic but there is no Lattice="…"'),
    ("species:S:1:pos:R:3:forces:R:3", "species:S:1:forces:R:3",
     r"Properties=.species:S:1:forces:R:3. lacks species \(or Z\) and pos"),
])
def test_extxyz_errors_name_file_frame_line(tmp_path, old, new, message):
    path = write(tmp_path, "bad.extxyz", CRYSTAL.replace(old, new))
    with pytest.raises(ValueError, match=error_at(path, 0, 2) + ": " + message):
        xyz.read_extxyz(path, ["formation_energy"])


def test_extxyz_atom_line_with_missing_property_columns(tmp_path):
    path = write(tmp_path, "cols.extxyz", CRYSTAL.replace("Sm 1.4 1.4 1.55 -0.1 0.0 0.0", "Sm 1.4 1.4 1.55"))
    with pytest.raises(ValueError, match=error_at(path, 0, 4) + r": expected 7 columns on an atom line, got 4: "
                                         r"'Sm 1.4 1.4 1.55'$"):
        xyz.read_extxyz(path, ["energy"])


def test_read_ase_file_and_database(tmp_path):
    mol = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    mol.info["gap"] = 1.5
    crystal = ase.Atoms("Cu", cell=np.eye(3) * 2.5, pbc=True)
    crystal.info["gap"] = 0.0
    crystal.calc = SinglePointCalculator(crystal, energy=-3.5)
    traj = tmp_path / "s.extxyz"
    ase.io.write(traj, [mol, crystal])
    data = xyz.read_ase(traj, ["gap"])
    np.testing.assert_array_equal(data.targets["gap"], [1.5, 0.0])
    np.testing.assert_array_equal(data.structures[0].cell, np.zeros((3, 3)))
    np.testing.assert_array_equal(data.structures[1].cell, np.eye(3) * 2.5)
    np.testing.assert_array_equal(data.structures[1].pbc, [True] * 3)

    db_path = tmp_path / "s.db"
    with ase.db.connect(db_path) as db:
        db.write(mol, gap=1.5)
        db.write(crystal, gap=0.25)
    data = xyz.read_ase(db_path, ["gap", "energy"], selection="natoms=1")
    np.testing.assert_array_equal(data.targets["gap"], [0.25])
    np.testing.assert_array_equal(data.targets["energy"], [-3.5])  # a standard row field
    assert data.sources == [(str(db_path), 0)]
    with pytest.raises(ValueError, match=error_at(db_path, 0, None) + r": target 'energy' not found"):
        xyz.read_ase(db_path, ["energy"])
    with pytest.raises(ValueError, match=error_at(traj, 0, None) + r": target 'homo' not found in "
                                         r"atoms.info or the calculator results"):
        xyz.read_ase(traj, ["homo"])


def test_read_files_concatenates_in_order(tmp_path):
    a = write(tmp_path, "a.xyz", WATER_FRAMES)
    b = write(tmp_path, "b.xyz.gz", WATER_FRAMES.split("2\n-8.0")[0])
    data = xyz.read_files([a, b], xyz.read_fullerene)
    assert len(data) == 3
    np.testing.assert_array_equal(data.targets["homo"], [-7.5, -8.0, -7.5])
    assert data.sources == [(str(a), 0), (str(a), 1), (str(b), 0)]
    with pytest.raises(ValueError, match="target names differ"):
        xyz.concatenate([xyz.read_fullerene(a), xyz.read_pt_graphene(
            write(tmp_path, "p.xyz", "1\n1 2\nH 0 0 0\n"))])


def test_non_numeric_targets_and_binary_files_are_named(tmp_path):
    """A string target in an ASE database and a binary file among the paths: a ParseError naming
    the file (and frame), not a bare conversion error."""
    import ase.db
    from ase.build import molecule

    db_path = tmp_path / "labels.db"
    ase.db.connect(str(db_path)).write(molecule("H2O"), label="high")
    with pytest.raises(xyz.ParseError, match=rf"{db_path}: frame 0 \(0-based\): target 'label' is 'high', not a number"):
        xyz.read_ase(db_path, ["label"])
    binary = tmp_path / "data.xyz"
    binary.write_bytes(bytes(range(256)) * 4)
    for reader in (xyz.read_extxyz, xyz.read_property_xyz):
        with pytest.raises(xyz.ParseError, match=rf"{binary}: not a text file \(byte 0x80 at offset 128"):
            reader(binary, ["e"])
    with pytest.raises(xyz.ParseError, match=rf"{binary}: not a text file"):
        xyz.read_ase(binary, ["e"])
