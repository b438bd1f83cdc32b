"""Checks of the GFN2-xTB datasets shipped in data/ (see data/README.md)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from scannet_jax.datasets import xyz

DATA = Path(__file__).resolve().parents[1] / "data"


def documented_counts():
    """(fullerene frames, chunks, Pt/graphene frames, chunks) from data/README.md's status line."""
    text = (DATA / "README.md").read_text()
    match = re.search(r"Frames shipped: fullerene-MD (\d+) frames in (\d+) trajectories; "
                      r"Pt/graphene-MD (\d+) frames in (\d+) trajectories", text)
    assert match, "data/README.md lacks its 'Frames shipped' line"
    return [int(g) for g in match.groups()]


def load_manifest(name):
    manifest = json.loads((DATA / name / "manifest.json").read_text())
    files = sorted(p.name for p in (DATA / name).glob("*.xyz.gz"))
    assert files == sorted(f"{chunk}.xyz.gz" for chunk in manifest["chunks"]), \
        "every finished chunk must be in the manifest and vice versa"
    return manifest


def test_fullerene_chunks_load_with_physical_labels():
    manifest = load_manifest("fullerene")
    total = 0
    for chunk, entry in sorted(manifest["chunks"].items()):
        data = xyz.read_fullerene(DATA / "fullerene" / f"{chunk}.xyz.gz")
        assert len(data) == entry["frames"] == manifest["settings"]["frames_per_trajectory"]
        total += len(data)
        num_atoms = int(re.fullmatch(r"C(\d+)", entry["molecule"]).group(1))
        for s in data.structures:
            assert s.numbers.shape == (num_atoms,) and np.all(s.numbers == 6)
            assert np.all(np.isfinite(s.positions))
        for values in data.targets.values():
            assert np.all(np.isfinite(values))
        gap = data.targets["lumo"] - data.targets["homo"]
        assert np.all(gap > 0.0), f"{chunk}: HOMO above LUMO"
        # A thermal frame cannot lie below the relaxed minimum of its molecule.
        assert np.all(data.targets["total_energy"] > manifest["relaxed_energies_eV"][entry["molecule"]])
        # GFN2-xTB HOMO of C60/C70 is near -10.5 eV; several eV off would mean a wrong orbital.
        assert np.all((data.targets["homo"] > -12.5) & (data.targets["homo"] < -8.5))
    assert [total, len(manifest["chunks"])] == documented_counts()[:2]


def test_pt_graphene_chunks_load_with_binding_energy():
    if not (DATA / "pt_graphene" / "manifest.json").exists():
        pytest.fail("data/pt_graphene/manifest.json is missing")
    manifest = load_manifest("pt_graphene")
    parts = manifest["part_energies_eV"]
    total = 0
    for chunk, entry in sorted(manifest["chunks"].items()):
        data = xyz.read_pt_graphene(DATA / "pt_graphene" / f"{chunk}.xyz.gz")
        assert len(data) == entry["frames"] == manifest["settings"]["frames_per_trajectory"]
        total += len(data)
        num_pt = int(re.fullmatch(r"C54H18Pt(\d)", entry["system"]).group(1))
        for s in data.structures:
            assert np.bincount(s.numbers, minlength=79)[[1, 6, 78]].tolist() == [18, 54, num_pt]
        np.testing.assert_allclose(data.targets["ref_energy"], parts["C54H18"] + parts[f"Pt{num_pt}"],
                                   atol=1e-6)
        np.testing.assert_allclose(data.targets["energy"],
                                   data.targets["total_energy"] - data.targets["ref_energy"])
        assert np.all(np.isfinite(data.targets["energy"]))
    assert [total, len(manifest["chunks"])] == documented_counts()[2:]


def test_md_driver_resumes_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(DATA))
    import xtb_md
    from ase.build import molecule

    start = molecule("CH4")
    settings = xtb_md.MDSettings(temperature_K=1000.0, seed=5, equilibration_steps=2,
                                 steps_per_frame=2, num_frames=4)

    def comment(atoms, calc):
        homo, lumo = xtb_md.frontier_orbitals(calc)
        assert homo < lumo
        return f"{homo:.10f} {lumo:.10f} {calc.results['energy']:.10f}"

    calls = []

    def crash_on_third_frame(atoms, calc):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return comment(atoms, calc)

    xtb_md.run_trajectory(start, settings, tmp_path / "straight", "t", comment)
    with pytest.raises(KeyboardInterrupt):
        xtb_md.run_trajectory(start, settings, tmp_path / "resumed", "t", crash_on_third_frame)
    assert (tmp_path / "resumed" / "t.state.npz").exists()
    summary = xtb_md.run_trajectory(start, settings, tmp_path / "resumed", "t", comment)
    assert summary["frames"] == 4
    assert not (tmp_path / "resumed" / "t.state.npz").exists()
    straight = (tmp_path / "straight" / "t.xyz.gz").read_bytes()
    assert straight == (tmp_path / "resumed" / "t.xyz.gz").read_bytes()
    data = xyz.read_fullerene(tmp_path / "straight" / "t.xyz.gz")
    assert len(data) == 4 and data.structures[0].numbers.tolist() == [6, 1, 1, 1, 1]
