"""Bad and unusual crystal input through the two user paths: the ``predict`` command on a
multi-structure file (a crystal model, randomly initialised) and the ``files`` data set reader
used for training. Each case is a clear error naming file, frame and site/atom, or a defined
result; the other structures of the same file are still predicted."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import ase.io
import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from scannet_jax import batching, cli_predict, models, neighbors, predict, structures
from scannet_jax.datasets import featurize, md, xyz
from scannet_jax.graphs import Domain, GraphStore
from scannet_jax.neighbors import FeaturizerSettings

ELEMENTS = frozenset({8, 11, 12, 17, 22, 26, 38})  # O Na Mg Cl Ti Fe Sr
NACL = bulk("NaCl", "rocksalt", a=5.64)


def small_model_config():
    config = models.default_model_config()
    config.update(n_attention=1, embedding_dim=8, local_dim=16, num_head=2, global_dim=16, dense_out=16)
    return config


def make_predictor(periodic: bool, elements: frozenset[int] = ELEMENTS) -> predict.Predictor:
    """A small random SCANN+ with a crystal (or molecule) training domain: ``elements``, 8 atoms."""
    config = small_model_config()
    store = GraphStore.from_structures([NACL.numbers], [featurize.featurize_one(
        structures.from_atoms(NACL), FeaturizerSettings(), False)])
    graphs = batching.pad_batch(store, [0], batching.Bucket(64, 384, 2), None)
    params = models.build_model(config).init(jax.random.PRNGKey(0), graphs)["params"]
    return predict.Predictor(config, params, settings=FeaturizerSettings(), target="e_form", units="eV/atom",
                             domain=Domain(elements, periodic, 8), batch_size=4, num_workers=1)


@pytest.fixture(scope="module")
def crystal_model():
    return make_predictor(periodic=True)


def run_predict(model: predict.Predictor, files: list[Path], tmp_path: Path, monkeypatch, capsys
                ) -> tuple[int, dict, str]:
    """``python main.py predict`` on ``files`` with ``model`` as the workdir's predictor:
    (exit status, the --json table, stderr)."""
    monkeypatch.setattr(predict.Predictor, "from_workdir", classmethod(lambda cls, path, **kw: model))
    table = tmp_path / "table.json"
    status = cli_predict.main(["--workdir=unused", *map(str, files), f"--json={table}", "--num-workers=1"])
    return status, json.loads(table.read_text()), capsys.readouterr().err


def with_cell(atoms: Atoms, cell: np.ndarray) -> Atoms:
    """The same Cartesian positions in another cell."""
    return Atoms(atoms.numbers, atoms.positions, cell=cell, pbc=True)


# --------------------------------------------------------------------------------------------
# CIF with partial occupancies.

def cif_block(name: str, sites: list[tuple[str, str, tuple[float, float, float], float | None]],
              a: float = 5.64, group: str = "P 1") -> str:
    """One CIF data block of a cubic cell; sites are (label, symbol, fractional xyz, occupancy)."""
    occupancy = any(s[3] is not None for s in sites)
    lines = [f"data_{name}", *(f"_cell_length_{x} {a}" for x in "abc"),
             *(f"_cell_angle_{x} 90" for x in ("alpha", "beta", "gamma")),
             f"_symmetry_space_group_name_H-M '{group}'", "loop_", "_atom_site_label", "_atom_site_type_symbol",
             "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z",
             *(["_atom_site_occupancy"] if occupancy else [])]
    for label, symbol, xyz_, occ in sites:
        lines.append(f"{label} {symbol} {xyz_[0]} {xyz_[1]} {xyz_[2]}" + (f" {occ}" if occupancy else ""))
    return "\n".join(lines) + "\n\n"


ROCKSALT = [("Na1", "Na", (0, 0, 0), None), ("Cl1", "Cl", (0.5, 0.5, 0.5), None)]  # rock salt in F m -3 m
DISORDERED = [("Na1", "Na", (0, 0, 0), 1.0), ("Cl1", "Cl", (0.5, 0.5, 0.5), 0.6),
              ("K1", "K", (0.5, 0.5, 0.5), 0.4)]


def test_installed_ase_merges_a_disordered_site_silently(tmp_path):
    """Why the readers check occupancies: ASE keeps the majority species of a mixed site and
    records the occupancies only in atoms.info['occupancy']."""
    path = tmp_path / "mixed.cif"
    path.write_text(cif_block("mixed", DISORDERED))
    atoms = ase.io.read(path, format="cif")
    assert atoms.get_chemical_formula() == "ClNa"
    assert atoms.info["occupancy"]["1"] == {"Cl": 0.6, "K": 0.4}


def test_cif_partial_occupancy_is_refused_naming_file_block_and_site(tmp_path):
    path = tmp_path / "three.cif"
    path.write_text(cif_block("ordered", ROCKSALT) + cif_block("disordered", DISORDERED)
                    + cif_block("full", [("Fe1", "Fe", (0, 0, 0), 1.0), ("Fe2", "Fe", (0.5, 0.5, 0.5), 0.9999)],
                                a=2.87))
    frames = list(xyz.iread_frames(path))
    assert [type(f).__name__ for f in frames] == ["Atoms", "FrameError", "Atoms"]
    assert str(frames[1]) == (
        f"{path}: frame 1 (0-based): data block 'disordered': site Cl1 (Cl) has occupancy 0.6: partial "
        "occupancy (a disordered structure) is not supported; give an ordered structure, e.g. a supercell "
        "with every site filled")
    assert frames[2].get_chemical_formula() == "Fe2"  # 0.9999 is within OCCUPANCY_TOLERANCE of 1
    packed = tmp_path / "three.cif.gz"  # compressed as ase.io.read reads it
    packed.write_bytes(gzip.compress(path.read_bytes()))
    unpacked = list(xyz.iread_frames(packed))
    assert unpacked[1].reason == frames[1].reason and unpacked[2].get_chemical_formula() == "Fe2"
    # the training reader refuses the file with the same message
    with pytest.raises(xyz.FrameError, match=r"three.cif: frame 1 \(0-based\): data block 'disordered': site Cl1"):
        xyz.read_ase(path, ["e_form"])


def test_cif_site_loop_without_labels_is_named_by_position(tmp_path):
    path = tmp_path / "nolabel.cif"
    text = cif_block("x", DISORDERED).replace("_atom_site_label\n", "")
    path.write_text("\n".join(line.split(" ", 1)[1] if line[:2] in ("Na", "Cl", "K1") else line
                              for line in text.splitlines()) + "\n")
    (error,) = list(xyz.iread_frames(path))
    assert "site number 2 of the site loop (Cl) has occupancy 0.6" in error.reason


def test_cif_block_ase_cannot_build_leaves_the_other_blocks(tmp_path):
    """ase.io.read gives up on the whole file at a bad block; here only that block fails."""
    path = tmp_path / "groups.cif"
    path.write_text(cif_block("fcc", ROCKSALT, group="F m -3 m") + cif_block("nonsense", ROCKSALT, group="Q 7 q")
                    + cif_block("p1", ROCKSALT))
    with pytest.raises(Exception, match="invalid spacegroup"):
        ase.io.read(path, index=":")
    frames = list(xyz.iread_frames(path))
    assert [f.get_chemical_formula() for f in (frames[0], frames[2])] == ["Cl4Na4", "ClNa"]
    assert frames[1].frame == 1 and frames[1].reason.startswith(
        "data block 'nonsense': SpacegroupNotFoundError: invalid spacegroup `Q 7 q`")


def test_cif_tags_can_be_targets(tmp_path):
    path = tmp_path / "labelled.cif"
    path.write_text(cif_block("a", ROCKSALT).replace("loop_", "_dft_e_form -2.1\nloop_"))
    data = xyz.read_ase(path, ["_dft_e_form"])
    assert data.targets["_dft_e_form"].tolist() == [-2.1]
    assert data.structures[0].pbc.all() and data.sources == [(str(path), 0)]


def test_predict_refuses_the_disordered_block_and_predicts_the_others(crystal_model, tmp_path, monkeypatch,
                                                                      capsys):
    path = tmp_path / "three.cif"
    path.write_text(cif_block("ordered", ROCKSALT) + cif_block("disordered", DISORDERED)
                    + cif_block("fcc", ROCKSALT, group="F m -3 m"))
    status, table, err = run_predict(crystal_model, [path], tmp_path, monkeypatch, capsys)
    assert status == cli_predict.EXIT_SOME_FAILED
    assert f"error: {path} frame 1: data block 'disordered': site Cl1 (Cl) has occupancy 0.6" in err
    assert "1 of 3 input(s) failed" in err
    rows = table["structures"]
    assert [(r["frame"], r["formula"]) for r in rows] == [(0, "ClNa"), (2, "Cl4Na4")]
    # the F m -3 m block is ASE's conventional rock-salt cell
    conventional = crystal_model(bulk("NaCl", "rocksalt", a=5.64, cubic=True))
    assert rows[1]["prediction"] == pytest.approx(conventional.value, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Lattices and geometry in one multi-structure file, through the predict command.

def awkward_crystals() -> list[Atoms]:
    """Frames 0..8 of the multi-structure test file."""
    left = with_cell(NACL, NACL.cell.array * [[1], [1], [-1]])  # c -> -c: det < 0
    flat = NACL.cell.array.copy()
    flat[2] = flat[0] + flat[1]
    across = Atoms("Na2", positions=[[0.01, 0, 0], [4.98, 0, 0]], cell=[5.0, 5.0, 5.0], pbc=True)
    return [NACL, with_cell(NACL, flat), Atoms("NaCl", [[0, 0, 0], [2.82, 0, 0]], pbc=True), left, across,
            bulk("Fe", "bcc", a=2.87), bulk("Au", "fcc", a=4.08), molecule("H2O"), NACL]


def test_each_awkward_crystal_is_an_error_or_a_defined_result(crystal_model, tmp_path, monkeypatch, capsys):
    path = tmp_path / "awkward.extxyz"
    ase.io.write(path, awkward_crystals(), format="extxyz")
    status, table, err = run_predict(crystal_model, [path], tmp_path, monkeypatch, capsys)
    assert status == cli_predict.EXIT_SOME_FAILED
    expected = {
        1: "featurisation failed: periodic cell is singular (volume 0 Å^3; a crystal needs three linearly "
           "independent lattice vectors): [[0.0, 2.82, 2.82], [2.82, 0.0, 2.82], [2.82, 2.82, 5.64]]",
        2: "featurisation failed: periodic cell is singular (volume 0 Å^3; a crystal needs three linearly "
           "independent lattice vectors): [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]",
        4: "featurisation failed: atoms 0 and 1 (image [-1, 0, 0]) are 0.03 Å apart (< 0.1 Å)",
        6: "element(s) Au (first: atom 0) never seen in training (elements: O Na Mg Cl Ti Fe Sr); allow with "
           "--allow-unseen-elements",
        7: "a non-periodic structure given to a crystal model",
    }
    assert {e["frame"]: e["error"] for e in table["errors"]} == expected
    for frame, message in expected.items():
        assert f"error: {path} frame {frame}: {message}" in err
    assert "5 of 9 input(s) failed" in err
    rows = {r["frame"]: r for r in table["structures"]}
    assert sorted(rows) == [0, 3, 5, 8]
    # a left-handed cell is a valid lattice: the same crystal, the same prediction and scores
    assert rows[3]["prediction"] == pytest.approx(rows[0]["prediction"], abs=1e-6)
    np.testing.assert_allclose(rows[3]["ga_scores"], rows[0]["ga_scores"], atol=1e-6)
    assert rows[8]["prediction"] == rows[0]["prediction"]
    # a one-atom cell: the GA norm is floored (layers.GlobalAttention), so s = 0, α = 1, finite
    assert rows[5]["ga_scores"] == [1.0] and math.isfinite(rows[5]["prediction"])
    assert rows[5]["warnings"] == []


def test_a_300_atom_cell_is_predicted_with_a_size_warning_and_the_rest_too(crystal_model, tmp_path, monkeypatch,
                                                                          capsys):
    """A 5x4x3 SrTiO3 supercell with seeded displacements (time and memory:
    experiments/bench_large_cell.py) between two small cells."""
    a = 3.905
    perovskite = Atoms("SrTiO3", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5],
                                                   [0, 0.5, 0.5]], cell=[a, a, a], pbc=True)
    big = perovskite.repeat((5, 4, 3))
    big.positions += np.random.default_rng(0).normal(0.0, 0.05, big.positions.shape)
    path = tmp_path / "sizes.extxyz"
    ase.io.write(path, [NACL, big, perovskite], format="extxyz")
    status, table, err = run_predict(crystal_model, [path], tmp_path, monkeypatch, capsys)
    assert status == 0 and table["errors"] == []
    rows = table["structures"]
    assert [(r["frame"], r["n_atoms"]) for r in rows] == [(0, 2), (1, 300), (2, 5)]
    assert rows[1]["warnings"] == ["300 atoms: larger than any structure the model was trained on (at most 8)"]
    assert f"warning: {path} frame 1: 300 atoms: larger than any structure" in err
    assert math.isfinite(rows[1]["prediction"]) and sum(rows[1]["ga_scores"]) == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["prediction"] == pytest.approx(crystal_model(NACL).value, abs=1e-6)


def test_one_atom_cell_prediction_does_not_depend_on_the_cell_given(crystal_model):
    fe = bulk("Fe", "bcc", a=2.87)
    conventional_axes = with_cell(fe, fe.cell.array[[1, 2, 0]])  # the same lattice, other basis order
    a, b = crystal_model([fe, conventional_axes])
    assert a.ga_scores.tolist() == [1.0] and b.value == pytest.approx(a.value, abs=1e-6)


def test_crystals_given_to_a_molecule_model_are_named(tmp_path, monkeypatch, capsys):
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, [molecule("H2O"), NACL, molecule("CH4")], format="extxyz")
    mol_model = make_predictor(periodic=False, elements=ELEMENTS | {1, 6})
    status, table, err = run_predict(mol_model, [path], tmp_path, monkeypatch, capsys)
    assert status == cli_predict.EXIT_SOME_FAILED
    assert table["errors"] == [{"file": str(path), "frame": 1, "error": "a periodic structure (pbc=[True, True, "
                                                                        "True]) given to a molecule model"}]
    assert [r["frame"] for r in table["structures"]] == [0, 2]


# --------------------------------------------------------------------------------------------
# Neighbours of the defined cases.

def image_order(nb: neighbors.Neighbors, cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edge order by (receiver, sender, Cartesian image vector) and those vectors."""
    vectors = np.round(nb.shifts @ cell, 8)
    return np.lexsort((*vectors.T[::-1], nb.senders, nb.receivers)), vectors


@pytest.mark.parametrize("flip", [np.diag([1, 1, -1]), np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]]), -np.eye(3)],
                         ids=["c_negated", "a_b_swapped", "all_negated"])
def test_left_handed_cell_has_the_neighbours_of_the_right_handed_one(flip):
    rng = np.random.default_rng(3)
    cell = np.array([[4.1, 0.2, 0.1], [0.5, 3.8, 0.3], [0.4, -0.6, 4.4]])
    right = Atoms([11, 17, 8, 12, 26], scaled_positions=rng.uniform(size=(5, 3)), cell=cell, pbc=True)
    left = with_cell(right, flip @ cell)
    assert np.linalg.det(left.cell.array) < 0 < np.linalg.det(cell)
    a, b = neighbors.voronoi_neighbors(right), neighbors.voronoi_neighbors(left)
    (order_a, vectors_a), (order_b, vectors_b) = image_order(a, cell), image_order(b, left.cell.array)
    assert len(a.senders) == len(b.senders) == 39
    np.testing.assert_array_equal(a.receivers, b.receivers)
    np.testing.assert_array_equal(a.senders[order_a], b.senders[order_b])
    np.testing.assert_array_equal(vectors_a[order_a], vectors_b[order_b])
    for field in ("distances", "solid_angles", "weights"):
        np.testing.assert_allclose(getattr(a, field)[order_a], getattr(b, field)[order_b], rtol=0, atol=1e-12)


def test_one_atom_bcc_cell_has_fourteen_self_image_edges():
    a = 2.87
    nb = neighbors.voronoi_neighbors(bulk("Fe", "bcc", a=a))
    assert len(nb.senders) == 14 and set(nb.senders) == set(nb.receivers) == {0}
    hexagons, squares = nb.distances < a * 0.9, nb.distances > a * 0.9
    assert hexagons.sum() == 8 and squares.sum() == 6
    np.testing.assert_allclose(nb.distances[hexagons], a * math.sqrt(3) / 2, atol=1e-12)
    np.testing.assert_allclose(nb.distances[squares], a, atol=1e-12)
    # the truncated octahedron: 8 hexagons and 6 squares tile the sphere
    assert nb.solid_angles.sum() == pytest.approx(4 * math.pi, abs=1e-12)
    omega_hex, omega_square = nb.solid_angles[hexagons][0], nb.solid_angles[squares][0]
    np.testing.assert_allclose(nb.solid_angles[hexagons], omega_hex, atol=1e-12)
    np.testing.assert_allclose(nb.weights[squares], omega_square / omega_hex, atol=1e-12)
    # a square face: half-side a√2/8 at a/2 from the centre, Ω = 4 asin(h² / (h² + d²)) = 4 asin(1/9)
    assert omega_square == pytest.approx(4 * math.asin(1 / 9), abs=1e-12)
    assert omega_hex == pytest.approx((4 * math.pi - 24 * math.asin(1 / 9)) / 8, abs=1e-12)


def test_overlap_check_names_the_first_pair_and_its_image():
    atoms = bulk("NaCl", "rocksalt", a=5.64).repeat((3, 3, 3))  # 54 atoms
    atoms.positions[40] = atoms.positions[7] + atoms.cell[0] + [0.02, 0.03, 0.0]  # on an image of atom 7
    atoms.positions[50] = atoms.positions[45] - atoms.cell[2] + [0.0, 0.05, 0.0]  # a later pair
    atoms.positions[3] += atoms.cell[1] * 2  # outside the cell: the image refers to the position given
    with pytest.raises(ValueError, match=r"^atoms 7 and 40 \(image \[-1, 0, 0\]\) are 0.0361 Å apart \(< 0.1 Å\)$"):
        neighbors.voronoi_neighbors(atoms)
    atoms.positions[40] += [0.1, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"^atoms 45 and 50 \(image \[0, 0, 1\]\) are 0.05 Å apart"):
        neighbors.voronoi_neighbors(atoms)
    atoms.positions[7] = atoms.positions[3] - atoms.cell[1] * 2 + atoms.cell[0] * 0.001
    with pytest.raises(ValueError, match=r"^atoms 3 and 7 \(image \[0, 2, 0\]\) are 0.012 Å apart"):
        neighbors.voronoi_neighbors(atoms)


# --------------------------------------------------------------------------------------------
# The training reader (data set ``files``, format ``ase``).

def test_files_data_set_names_the_frame_of_an_overlap_across_the_cell_boundary(tmp_path):
    frames = [NACL.copy() for _ in range(4)]
    frames[2] = Atoms("Na2", positions=[[0.01, 0, 0], [4.98, 0, 0]], cell=[5.0, 5.0, 5.0], pbc=True)
    for k, atoms in enumerate(frames):
        atoms.info["e_form"] = -2.0 + 0.1 * k
    path = tmp_path / "crystals.extxyz"
    ase.io.write(path, frames, format="extxyz")
    with pytest.raises(featurize.FeaturizationError,
                       match=rf"{path}: frame 2 \(0-based\): ValueError: atoms 0 and 1 \(image \[-1, 0, 0\]\) are "
                             r"0.03 Å apart"):
        md.load("files", FeaturizerSettings(), paths=str(path), file_format="ase", columns=["e_form"],
                group_by="structure", cache_dir=tmp_path / "cache", num_workers=1)
