"""The Materials Project crystals in data/mp/, their converter and `scannet_jax.datasets.mp`."""

import csv
import gzip
import hashlib
import importlib.util
import io
import json
import re
import sys
import tarfile
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest

from scannet_jax.datasets import mp

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("convert_matminer", ROOT / "data" / "convert_matminer.py")
convert_matminer = importlib.util.module_from_spec(_spec)
sys.modules["convert_matminer"] = convert_matminer  # dataclasses look their module up there
_spec.loader.exec_module(convert_matminer)

NACL = ase.Atoms("NaCl", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]],
                 cell=[[0, 2.82, 2.82], [2.82, 0, 2.82], [2.82, 2.82, 0]], pbc=True)


def documented_counts():
    """{set: (total, train, validation, test)} from the 'Crystals shipped' line of data/README.md."""
    text = (ROOT / "data" / "README.md").read_text()
    found = re.findall(r"`(\w+)\.extxyz\.gz`: ([\d,]+) crystals \(train ([\d,]+), validation ([\d,]+), "
                       r"test ([\d,]+)\)", text)
    assert found, "data/README.md lacks its 'Crystals shipped' counts"
    return {name: tuple(int(v.replace(",", "")) for v in values) for name, *values in found}


@pytest.fixture(scope="module")
def shipped():
    return {name: mp.read(name) for name in ("e_form", "gap")}


def test_shipped_sets_match_readme_and_are_physical(shipped):
    counts = documented_counts()
    assert set(counts) == {"flla", "dielectric"}
    for name, (structures, splits) in shipped.items():
        spec = mp.DATASETS[name]
        assert counts[spec.stem] == (len(structures), *(len(splits[s]) for s in mp.SPLITS))
        values = np.array([a.info[spec.target] for a in structures])
        assert np.isfinite(values).all()
        for atoms in structures:
            assert atoms.pbc.all() and atoms.cell.volume > 1.0
            assert re.fullmatch(r"mp-\d+", atoms.info["material_id"])
        assert len({a.info["material_id"] for a in structures}) == len(structures)
    e_form = np.array([a.info["formation_energy_per_atom"] for a in shipped["e_form"][0]])
    gap = np.array([a.info["band_gap"] for a in shipped["gap"][0]])
    # zoo-reference §5: formation energy -4.451 to 2.339 eV/atom, band gaps 0.11-8.32 eV
    assert e_form.min() == pytest.approx(-4.451, abs=1e-3) and e_form.max() == pytest.approx(2.339, abs=1e-3)
    assert gap.min() == pytest.approx(0.11, abs=1e-3) and gap.max() == pytest.approx(8.32, abs=1e-3)


def test_shipped_split_is_disjoint_covering_and_reproducible(shipped):
    for name, (structures, splits) in shipped.items():
        joined = np.concatenate([splits[s] for s in mp.SPLITS])
        assert np.array_equal(np.sort(joined), np.arange(len(structures)))
        n = len(structures)
        assert [len(splits[s]) for s in mp.SPLITS] == [round(0.8 * n), round(0.1 * n),
                                                      n - round(0.8 * n) - round(0.1 * n)]
        record = json.loads((mp.default_data_dir() / f"{mp.DATASETS[name].stem}_split.json").read_text())
        ids = [a.info["material_id"] for a in structures]
        again = convert_matminer.split_ids(ids[::-1], record["seed"])  # order of the ids is irrelevant
        for s in mp.SPLITS:
            assert again[s] == record[s] == [ids[i] for i in splits[s]]
        assert convert_matminer.split_ids(ids, record["seed"] + 1)["test"] != record["test"]


CIF = """data_test
_cell_length_a 4.0
_cell_length_b 4.0
_cell_length_c 4.0
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
 _symmetry_equiv_pos_as_xyz
 'x, y, z'
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
 Cs Cs1 0.0 0.0 0.0 1
 Cl Cl2 0.5 0.5 0.5 {occupancy}
"""
POSCAR = "CsCl\n1.0\n4 0 0\n0 4 0\n0 0 4\nCs Cl\n1 1\ndirect\n0 0 0 Cs\n0.5 0.5 0.5 Cl\n"


def pymatgen_dict(atoms, occupancies=None, fractional=None):
    occupancies = occupancies or [1] * len(atoms)
    fractional = atoms.get_scaled_positions() if fractional is None else fractional
    return repr({"lattice": {"matrix": atoms.cell[:].tolist()}, "@class": "Structure",
                 "sites": [{"abc": [float(x) for x in p], "label": a.symbol,
                            "species": [{"element": a.symbol, "occu": o}]}
                           for a, p, o in zip(atoms, fractional, occupancies)]})


def write_csv(rows, header, extra_index=False):
    out = io.StringIO()
    out.write("# ref: synthetic\n")
    writer = csv.writer(out)
    writer.writerow(header)
    for i, row in enumerate(rows):
        writer.writerow(([i] if extra_index else []) + row)
    return out.getvalue().encode()


def build_archive(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{convert_matminer.MEMBER_DIR}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path):
    flat = ase.Atoms("Si2", cell=[[3, 0, 0], [0, 3, 0], [1.5, 1.5, 0]], pbc=True)
    flla = write_csv([
        ["mp-22862", "{}", 0.0, 2, pymatgen_dict(NACL), -2.1, -4.2],
        ["mp-1", "{}", 0.0, 2, pymatgen_dict(flat, fractional=[[0, 0, 0], [0.5, 0.5, 0]]), 0.5, 1.0],
        ["mp-2", "{}", 0.0, 2, pymatgen_dict(NACL, [1, 0.5]), 0.1, 0.2],
        ["mp-22862", "{}", 0.0, 2, pymatgen_dict(NACL), -2.1, -4.2],
    ], ["material_id", "formula", "e_above_hull", "nsites", "structure", "formation_energy_per_atom",
        "formation_energy"])
    dielectric = write_csv([
        [0, 5.3, 2, CIF.format(occupancy=1), POSCAR, "mp-573"],
        [1, 1.0, 2, CIF.format(occupancy=0.5), POSCAR, "mp-99"],
    ], ["idx", "band_gap", "nsites", "structure", "poscar", "material_id"], extra_index=True)
    path = tmp_path / "matminer-0.3.9.tar.gz"
    sha = build_archive(path, {"flla_2015.csv": flla, "dielectric_constant.csv": dielectric})
    return path, sha, {"flla": hashlib.sha256(flla).hexdigest(),
                       "dielectric": hashlib.sha256(dielectric).hexdigest()}


def test_converter_refuses_an_archive_with_the_wrong_sha256(archive, tmp_path):
    path, _, _ = archive
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64} does not match the expected "
                                         + convert_matminer.ARCHIVE_SHA256):
        convert_matminer.convert(path, "flla", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_converter_refuses_a_csv_with_the_wrong_sha256(archive, tmp_path):
    path, sha, _ = archive  # the archive's own hash passes; the real flla CSV's hash does not
    with pytest.raises(ValueError, match=r"flla_2015\.csv: sha256 .* does not match"):
        convert_matminer.convert(path, "flla", tmp_path / "out", archive_sha256=sha)


def test_converter_round_trip_drops_bad_structures_with_reasons(archive, tmp_path):
    path, sha, members = archive
    out = tmp_path / "out"
    record = convert_matminer.convert(path, "flla", out, archive_sha256=sha, member_sha256=members["flla"])
    assert record["rows"] == 4 and record["structures"] == 1
    assert record["duplicate_material_ids"] == ["mp-22862"]
    reasons = {d["material_id"]: d["reason"] for d in record["dropped"]}
    assert set(reasons) == {"mp-1", "mp-2"}
    assert re.search(r"flla_2015\.csv line 4 \(mp-1\): zero-volume lattice", reasons["mp-1"])
    assert re.search(r"flla_2015\.csv line 5 \(mp-2\): site 1 \(Cl\) is partially occupied \(Cl 0\.5\)",
                     reasons["mp-2"])
    structures, splits = mp.read("e_form", out)
    (atoms,) = structures
    assert atoms.info == {"material_id": "mp-22862", "formation_energy_per_atom": -2.1, "e_above_hull": 0.0}
    np.testing.assert_allclose(atoms.cell[:], NACL.cell[:])
    np.testing.assert_allclose(atoms.positions, NACL.positions, atol=1e-8)
    assert atoms.get_chemical_symbols() == ["Na", "Cl"] and atoms.pbc.all()
    assert {s: len(v) for s, v in splits.items()} == {"train": 1, "validation": 0, "test": 0}
    # the same archive gives the same bytes
    first = (out / "flla.extxyz.gz").read_bytes()
    convert_matminer.convert(path, "flla", out, archive_sha256=sha, member_sha256=members["flla"])
    assert (out / "flla.extxyz.gz").read_bytes() == first


def test_converter_reads_cif_sets_and_refuses_partial_occupancy_naming_file_and_site(archive, tmp_path):
    path, sha, members = archive
    record = convert_matminer.convert(path, "dielectric", tmp_path, targets=["band_gap"], archive_sha256=sha,
                                      member_sha256=members["dielectric"])
    (dropped,) = record["dropped"]
    assert dropped["material_id"] == "mp-99"
    match = re.match(r"dielectric_constant\.csv line (\d+) \(mp-99\): site Cl2 is partially occupied",
                     dropped["reason"])
    assert match
    with tarfile.open(path) as tar:  # the line named is where the row (its leading index 1) starts
        text = tar.extractfile(f"{convert_matminer.MEMBER_DIR}/dielectric_constant.csv").read().decode()
    assert text.splitlines()[int(match.group(1)) - 1].startswith("1,1,1.0,2,")
    (atoms,), _ = mp.read("gap", tmp_path)
    assert atoms.info["band_gap"] == 5.3 and atoms.cell.volume == pytest.approx(64.0)
    with pytest.raises(convert_matminer.StructureError, match=r"^my\.cif: site Cl2 is partially occupied "
                                                              r"\(Cl 0\.5\)"):
        convert_matminer.atoms_from_cif(CIF.format(occupancy=0.5), "my.cif")


def test_converter_generic_target_mode(archive, tmp_path):
    path, sha, members = archive
    record = convert_matminer.convert(path, "flla", tmp_path, targets=["formation_energy"],
                                      archive_sha256=sha, member_sha256=members["flla"])
    assert record["targets"] == {"formation_energy": "eV"}
    with pytest.raises(ValueError, match=r"no column\(s\) \['K_VRH'\]"):
        convert_matminer.convert(path, "flla", tmp_path, targets=["K_VRH"], archive_sha256=sha,
                                 member_sha256=members["flla"])


def test_check_structure_refuses_zero_volume_and_overlaps():
    flat = ase.Atoms("H", cell=[[2, 0, 0], [0, 2, 0], [2, 2, 0]], pbc=True)
    with pytest.raises(convert_matminer.StructureError, match=r"^x: zero-volume lattice"):
        convert_matminer.check_structure(flat, "x")
    across = ase.Atoms("H2", positions=[[0.1, 0, 0], [2.9, 0, 0]], cell=[3, 3, 3], pbc=True)
    with pytest.raises(convert_matminer.StructureError, match=r"atoms 0 \(H\) and 1 \(H\) overlap: 0\.200 Å"):
        convert_matminer.check_structure(across, "x")
    convert_matminer.check_structure(NACL, "x")


def write_set(folder, frames):
    text = io.StringIO()
    ase.io.write(text, frames, format="extxyz")
    data = gzip.compress(text.getvalue().encode())
    (folder / "flla.extxyz.gz").write_bytes(data)
    ids = [a.info.get("material_id") for a in frames]
    (folder / "flla_split.json").write_text(json.dumps(
        {"file_sha256": hashlib.sha256(data).hexdigest(), "train": ids, "validation": [], "test": []}))


def frame(material_id, **changes):
    atoms = NACL.copy()
    atoms.info.update(material_id=material_id, formation_energy_per_atom=-2.0)
    for key, value in changes.items():
        setattr(atoms, key, value)
    return atoms


def test_read_names_file_and_frame_of_bad_input(tmp_path):
    write_set(tmp_path, [frame("mp-1"), frame("mp-2", pbc=False)])
    with pytest.raises(ValueError, match=r"flla\.extxyz\.gz frame 1 \(0-based\): pbc=\[False, False, False\]"):
        mp.read("e_form", tmp_path)
    bad = frame("mp-2")
    bad.info["formation_energy_per_atom"] = float("nan")
    write_set(tmp_path, [frame("mp-1"), bad])
    with pytest.raises(ValueError, match=r"frame 1 \(0-based\) \(mp-2\): target 'formation_energy_per_atom'"):
        mp.read("e_form", tmp_path)
    write_set(tmp_path, [frame("mp-1"), frame("mp-1")])
    with pytest.raises(ValueError, match=r"frame 1 \(0-based\): material_id mp-1 repeats frame 0"):
        mp.read("e_form", tmp_path)
    write_set(tmp_path, [frame("mp-1")])
    (tmp_path / "flla.extxyz.gz").write_bytes(gzip.compress(b"1\n\nNa 0 0 0\n"))
    with pytest.raises(ValueError, match=r"flla\.extxyz\.gz: sha256 .* differs"):
        mp.read("e_form", tmp_path)
    with pytest.raises(ValueError, match=r"unknown Materials Project set 'mp'"):
        mp.read("mp")
    with pytest.raises(ValueError, match=r"elastic\.extxyz\.gz: no such file"):
        mp.read("elastic", tmp_path)
