"""Motifs of hand-checkable oxides (scannet_jax.motifs; zoo-reference.md §2.3–2.5).

Expected graphs, from the crystal structures:
* rocksalt MgO (a = 4.21 Å): each Mg octahedron shares edges with 12 others (Mg–Mg a/√2) and a
  corner with 6 (Mg–Mg a, across a linear Mg–O–Mg);
* rutile TiO2 (a = 4.594, c = 2.959 Å): each Ti octahedron shares an edge with 2 (along c) and
  corners with 8 (the other Ti, √(a²/2 + c²/4) = 3.570 Å away);
* cubic SrTiO3 (a = 3.905 Å): Ti octahedra share corners with 6 Ti (a); each shares a face
  (3 O) with 8 Sr cuboctahedra (a√3/2); Sr shares square faces (4 O) with 6 Sr (a) and
  corners with 12 Sr (a√2).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.spacegroup import crystal
from pymatgen.io.ase import AseAtomsAdaptor

from scannet_jax import motifs


def _mgo() -> Atoms:
    return bulk("MgO", "rocksalt", a=4.21)


def _rutile() -> Atoms:
    return crystal(["Ti", "O"], basis=[(0, 0, 0), (0.3048, 0.3048, 0)], spacegroup=136,
                   cellpar=[4.594, 4.594, 2.959, 90, 90, 90])


def _perovskite() -> Atoms:
    return crystal(["Sr", "Ti", "O"], basis=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)],
                   spacegroup=221, cellpar=[3.905] * 3 + [90] * 3)


@pytest.fixture(scope="module")
def graphs() -> dict[str, motifs.MotifGraph]:
    return {"MgO": motifs.motif_graph(_mgo()), "TiO2": motifs.motif_graph(_rutile()),
            "SrTiO3": motifs.motif_graph(_perovskite())}


def _neighbourhood(graph: motifs.MotifGraph, motif: int) -> collections.Counter:
    """(neighbour's centre symbol index, sharing name, distance rounded to mÅ) -> edge count."""
    take = graph.receivers == motif
    return collections.Counter(
        (int(graph.centers[j]), motifs.SHARING_NAMES[s], round(float(d), 3))
        for j, s, d in zip(graph.senders[take], graph.sharing[take], graph.distances[take]))


def test_rocksalt_octahedra_share_edges_and_corners(graphs):
    g = graphs["MgO"]
    a = 4.21
    np.testing.assert_array_equal(g.centers, [0])
    np.testing.assert_array_equal(g.environments, ["O:6"])
    assert g.features.shape == (1, motifs.FINGERPRINT_DIM) == (1, 61)
    assert _neighbourhood(g, 0) == {(0, "edge", round(a / np.sqrt(2), 3)): 12, (0, "corner", a): 6}
    # Every edge joins two images of the one Mg: distances are the lattice shifts' lengths.
    cell = _mgo().cell[:]
    np.testing.assert_allclose(np.linalg.norm(g.shifts @ cell, axis=1), g.distances, atol=1e-9)
    # A perfect octahedron: CN-6 weight 1 and octahedral order parameter 1.
    labels = motifs.FINGERPRINT_LABELS
    assert g.features[0, labels.index("wt CN_6")] == pytest.approx(1.0)
    assert g.features[0, labels.index("octahedral CN_6")] == pytest.approx(1.0)


def test_rutile_octahedra_share_two_edges_and_eight_corners(graphs):
    g = graphs["TiO2"]
    np.testing.assert_array_equal(g.centers, [0, 1])
    np.testing.assert_array_equal(g.environments, ["O:6", "O:6"])
    corner = round(float(np.sqrt(4.594**2 / 2 + 2.959**2 / 4)), 3)
    assert _neighbourhood(g, 0) == {(0, "edge", 2.959): 2, (1, "corner", corner): 8}
    assert _neighbourhood(g, 1) == {(1, "edge", 2.959): 2, (0, "corner", corner): 8}
    assert np.all(np.diff(g.receivers) >= 0)


def test_perovskite_corner_sharing_octahedra_and_cuboctahedra(graphs):
    g = graphs["SrTiO3"]
    a = 3.905
    np.testing.assert_array_equal(g.centers, [0, 1])  # Sr, Ti; the O sites are not motifs
    np.testing.assert_array_equal(g.environments, ["C:12", "O:6"])
    sr, ti = 0, 1
    assert _neighbourhood(g, ti) == {(1, "corner", a): 6,
                                     (0, "face", round(a * np.sqrt(3) / 2, 3)): 8}
    assert _neighbourhood(g, sr) == {(0, "face", a): 6, (0, "corner", round(a * np.sqrt(2), 3)): 12,
                                     (1, "face", round(a * np.sqrt(3) / 2, 3)): 8}
    # Edges come in reverse pairs: j's image at +t sees i's image at -t.
    forward = set(zip(g.receivers, g.senders, map(tuple, g.shifts), g.sharing))
    assert forward == set(zip(g.senders, g.receivers, map(tuple, -g.shifts), g.sharing))


def test_isolated_motif_gets_one_self_loop_of_distance_zero():
    # A CO2 molecule alone in a 7 Å box: its two O atoms belong to no other motif.
    co2 = Atoms("CO2", positions=[[0, 0, 0], [1.16, 0, 0], [-1.16, 0, 0]], cell=[7, 7, 7],
                pbc=True)
    g = motifs.motif_graph(co2)
    np.testing.assert_array_equal(g.environments, ["L:2"])
    np.testing.assert_array_equal(g.receivers, [0])
    np.testing.assert_array_equal(g.senders, [0])
    np.testing.assert_array_equal(g.distances, [0.0])
    np.testing.assert_array_equal(g.sharing, [motifs.SELF_LOOP])
    np.testing.assert_array_equal(g.shifts, [[0, 0, 0]])


@pytest.mark.filterwarnings("ignore:.*(oxidation states|appropriate radius).*:UserWarning")
def test_fingerprint_matches_matminer():
    """CrystalNN "ops" fingerprint of a rattled rutile Ti site, against matminer 0.10.1's
    ``SiteStatsFingerprint.from_preset("CrystalNNFingerprint_ops", stats=None)`` (with pymatgen
    2026.10.24) on the same structure written to extxyz (8 decimals), which gave these non-zero
    entries (all others 0)."""
    expected = {
        0: 0.057685058885478695, 1: 0.057685058885478695, 2: 0.0012777481909787617,
        3: 0.000758304616548446, 4: 0.0012573845048866235, 5: 0.00053827044939493,
        6: 5.32859460087008e-06, 7: 1.1331263467285378e-06, 8: 0.011206000744144386,
        9: 0.0012404506447738512, 10: 0.004926321038916429, 11: 0.0058378198420736185,
        12: 0.022654462705564395, 13: 0.01509788567581703, 14: 0.007146271542560558,
        15: 0.020667777165650263, 16: 0.020673515099659572, 17: 0.013409527614071807,
        18: 0.025285209997461772, 19: 0.0041587289369801874, 20: 0.02090127799551187,
        21: 0.018968928427904996, 22: 0.881891519476372, 23: 0.1816144605783152,
        24: 0.8355848494511424, 25: 0.386261852599978}
    atoms = _rutile()
    atoms.rattle(0.05, seed=1)
    fingerprint = motifs.crystalnn_ops_fingerprint(AseAtomsAdaptor.get_structure(atoms), 0)
    reference = np.zeros(motifs.FINGERPRINT_DIM)
    reference[list(expected)] = list(expected.values())
    np.testing.assert_allclose(fingerprint, reference, rtol=1e-6, atol=1e-9)
    assert motifs.FINGERPRINT_LABELS[22:26] == (
        "wt CN_6", "hexagonal planar CN_6", "octahedral CN_6", "pentagonal pyramidal CN_6")
    assert motifs.FINGERPRINT_LABELS[-1] == "wt CN_24"


def test_motifs_follow_the_atoms_not_their_order(graphs):
    # Centres are found wherever the cations are (the released code assumed they come first).
    atoms = _perovskite()
    order = np.array([2, 3, 1, 4, 0])  # O, O, Ti, O, Sr
    g = motifs.motif_graph(atoms[order])
    np.testing.assert_array_equal(g.centers, [2, 4])
    np.testing.assert_array_equal(g.environments, ["O:6", "C:12"])
    ref = graphs["SrTiO3"]
    np.testing.assert_allclose(g.features, ref.features[::-1], atol=1e-12)
    assert _neighbourhood(g, 0) == {(2, "corner", 3.905): 6, (4, "face", 3.382): 8}


@pytest.mark.parametrize("atoms, reason", [
    (bulk("NaCl", "rocksalt", a=5.64), "ClNa: not an oxide (no O atom in ClNa)"),
    (Atoms("O2", positions=[[0, 0, 0], [1.2, 0, 0]], cell=[6, 6, 6], pbc=True),
     "O2: no cation: every atom is O"),
    (Atoms("MgO", positions=[[0, 0, 0], [2, 0, 0]]),
     "MgO: motifs need a periodic crystal (pbc all True)"),
])
def test_refusals_name_the_structure(atoms, reason):
    with pytest.raises(motifs.MotifError) as error:
        motifs.motif_graph(atoms)
    assert str(error.value) == reason
    named = atoms.copy()
    named.info["name"] = "mp-1234"
    with pytest.raises(motifs.MotifError, match=r"^mp-1234: "):
        motifs.motif_graph(named)


def test_parallel_featurisation_keeps_order_and_reports_failures(graphs):
    structures = [_mgo(), bulk("NaCl", "rocksalt", a=5.64), _rutile()]
    results = motifs.motif_graphs(structures, names=["a", "b", "c"], num_workers=2,
                                  progress=False)
    assert isinstance(results[1], motifs.MotifError) and results[1].name == "b"
    assert str(results[1]) == "b: not an oxide (no O atom in ClNa)"
    for result, ref in ((results[0], graphs["MgO"]), (results[2], graphs["TiO2"])):
        assert isinstance(result, motifs.MotifGraph)
        for field, value in zip(ref._fields, ref):
            np.testing.assert_array_equal(getattr(result, field), value, err_msg=field)
    with pytest.raises(ValueError, match="2 names for 3 structures"):
        motifs.motif_graphs(structures, names=["a", "b"], progress=False)


def test_motif_picture_edges_span_the_graphs_distances(graphs, tmp_path):
    import matplotlib.image

    from scannet_jax import render

    for name, make in (("SrTiO3", _perovskite), ("TiO2", _rutile)):
        atoms, g = make(), graphs[name]
        ends = render.motif_edge_ends(atoms, g)
        np.testing.assert_allclose(np.linalg.norm(ends[:, 1] - ends[:, 0], axis=1), g.distances, atol=1e-9)
        np.testing.assert_allclose(ends[:, 0], atoms.positions[g.centers[g.receivers]])
        path = tmp_path / f"{name}.png"
        render.render_motifs(atoms, g, path, name)
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 400 and image.shape[1] > 2 * image.shape[0] - 200  # two panels side by side


def test_an_environment_chemenv_cannot_name_is_unknown():
    """CsCu3O2 (mp-553303 of the band-gap set): Cs has 18 neighbours, beyond ChemEnv's
    catalogue, which labels it "UNKNOWN:18"; the linear Cu motifs are "L:2"."""
    from scannet_jax.datasets import mp

    atoms = next(a for a in mp.read("gap")[0] if a.info["material_id"] == "mp-553303")
    g = motifs.motif_graph(atoms)
    cs = int(np.flatnonzero(np.asarray(atoms.get_chemical_symbols())[g.centers] == "Cs")[0])
    assert g.environments[cs] == "UNKNOWN:18"
    ids = motifs.environment_ids(g.environments)
    assert motifs.ENVIRONMENTS[ids[cs]] == "UNKNOWN"
    assert [motifs.ENVIRONMENTS[i] for k, i in enumerate(ids) if k != cs] == ["L:2"] * 3
    assert motifs.ENVIRONMENTS[motifs.environment_ids(["UNCLEAR:7"])[0]] == "UNCLEAR"
    with pytest.raises(ValueError, match=r"ChemEnv symbols \['XX:3'\] are not in motifs.ENVIRONMENTS"):
        motifs.environment_ids(["O:6", "XX:3"])
