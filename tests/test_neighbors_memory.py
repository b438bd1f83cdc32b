"""Exact-mode Voronoi neighbours of large structures: memory linear in the atoms, and certified
candidate lists (`neighbors._certified_cell`) giving the facets of every-site lists.

Peaks are tracemalloc peaks (NumPy's allocations are traced; Qhull's are not, but each hull is
one cell's), deterministic for a given structure, so the bounds do not depend on the machine's
load. Version 4 built [N, N, 3] offsets for a molecule (peak ratio ~16 from 400 to 1,600 atoms)
and [G N, N, 3] image distances for a crystal.
"""

import importlib.util
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

from scannet_jax import neighbors
from scannet_jax.neighbors import neighbors_from_arrays

_spec = importlib.util.spec_from_file_location(
    "bench_featurize", Path(__file__).resolve().parents[1] / "experiments" / "bench_featurize.py")
bench_featurize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_featurize)
packed_molecule = bench_featurize.packed_molecule  # H/C/N/O at 0.1 atoms/Å^3, no pair closer than 0.9 Å

ALL = {"cutoff": np.inf, "min_solid_angle": 0.0, "min_relative_weight": 0.0}  # every facet


def displaced_mgo(repeat: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Z, positions Å, cell Å) of a rocksalt MgO supercell (2-atom primitive cell), 0.05 Å noise."""
    atoms = bulk("MgO", "rocksalt", a=4.21).repeat(repeat)
    noise = np.random.default_rng(seed).normal(scale=0.05, size=atoms.positions.shape)
    return atoms.numbers, atoms.positions + noise, atoms.cell.array


def traced_peak_mb(work) -> float:
    """Peak of traced allocations while `work()` runs, MB."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_molecule_memory_grows_linearly():
    small, large = packed_molecule(400, 0), packed_molecule(1600, 1)
    peaks = [traced_peak_mb(lambda z=z, x=x: neighbors_from_arrays(z, x)) for z, x in (small, large)]
    assert peaks[1] / peaks[0] < 6, peaks  # 4x the atoms: ~4x the memory (version 4: ~16x)
    assert peaks[1] < 40, peaks  # MB; version 4: ~250 MB


def test_crystal_memory_grows_linearly():
    """The Voronoi part alone: the input check `_check_close_images` is not part of this bound."""
    peaks = []
    for repeat in ((4, 4, 4), (8, 8, 4)):  # 128 and 512 atoms
        z, x, cell = displaced_mgo(repeat, 0)
        peaks.append(traced_peak_mb(lambda z=z, x=x, cell=cell: neighbors._exact_crystal(z, x, cell)))
    assert peaks[1] / peaks[0] < 6, peaks


def every_site(monkeypatch, *args, **kwargs) -> neighbors.Neighbors:
    """The neighbours with every cell built from every site (no candidate lists)."""
    with monkeypatch.context() as m:
        m.setattr(neighbors, "_EXHAUSTIVE", 10**9)
        return neighbors_from_arrays(*args, **kwargs)


def _cubic_cluster() -> tuple[np.ndarray, np.ndarray]:
    grid = np.stack(np.meshgrid(*[np.arange(7)] * 3, indexing="ij"), -1).reshape(-1, 3) * 2.0
    return np.full(len(grid), 6), grid  # 343 atoms, flat faces, co-spherical everywhere


def _sheet_with_adatom() -> tuple[np.ndarray, np.ndarray]:
    sheet = [[i * 1.4 + (j % 2) * 0.7, j * 1.4 * np.sqrt(3) / 2, 0.0] for i in range(20) for j in range(20)]
    positions = np.array(sheet + [[14.0, 12.0, 2.0]])
    return np.full(len(positions), 6), positions  # 401 atoms: 3-D, but most candidate lists are flat


STRUCTURES = {
    "packed molecule": lambda: (*packed_molecule(300, 2), None, False),
    "simple cubic cluster": lambda: (*_cubic_cluster(), None, False),
    "planar sheet and one adatom": lambda: (*_sheet_with_adatom(), None, False),
    "displaced MgO 4x4x4": lambda: (*displaced_mgo((4, 4, 4), 1), True),
    "fcc Cu 3x3x3 cubic": lambda: (*(lambda a: (a.numbers, a.positions, a.cell.array))(
        bulk("Cu", "fcc", 3.6, cubic=True).repeat(3)), True),
}


@pytest.mark.parametrize("name", STRUCTURES)
def test_candidate_lists_give_the_facets_of_every_site(name, monkeypatch):
    z, x, cell, pbc = STRUCTURES[name]()
    assert (len(z) if not pbc else (neighbors._crystal_reach(cell) / (3 * abs(np.linalg.det(cell)) / (
        4 * np.pi * len(z))) ** (1 / 3)) ** 3) > neighbors._EXHAUSTIVE  # candidate lists are used
    for thresholds in (ALL, {}):
        got = neighbors_from_arrays(z, x, cell, pbc, **thresholds)
        want = every_site(monkeypatch, z, x, cell, pbc, **thresholds)
        for field in ("receivers", "senders", "shifts"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=f"{name} {field}")
        for field in ("distances", "solid_angles", "weights"):
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=0, atol=1e-12,
                                       err_msg=f"{name} {field}")
