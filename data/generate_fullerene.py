"""Generates the fullerene-MD dataset: GFN2-xTB Langevin MD of C60 and C70.

What is computed (reference §5, "fullerene-MD"; same file format as the original):
  * C60 from ``ase.build.molecule("C60")``; C70 (D5h) built from it by cutting C60 through the
    equator perpendicular to a C5 axis, turning the lower half by 36° so the two rims eclipse,
    pulling the halves 1.5 Å apart and inserting a belt of 10 atoms (5 bonded pairs, each atom
    bonded to one rim atom above and one below). Both are relaxed with GFN2-xTB (BFGS,
    max |F| < 0.01 eV/Å); the C70 topology is checked (every atom three-coordinated within
    1.6 Å, exactly 12 five-membered rings, none sharing a bond).
  * Langevin MD (``ase.md.langevin``, 1 fs step, friction 0.02 fs⁻¹, centre of mass fixed) at
    500, 1000, 1500, 2000, 2500 and 3000 K, two independent trajectories per molecule and
    temperature (different seeds); 40 unsaved equilibration steps, then a frame every 5 steps,
    90 frames per trajectory: 24 trajectories, 2,160 frames.
  * Every frame is labelled from the SCF of that very geometry: HOMO and LUMO orbital energies
    (eV) and the total GFN2-xTB energy (eV). Settings of the method: see ``xtb_md``.

Output: ``<out>/<molecule>_T<temperature>K_r<replica>.xyz.gz``, multi-frame xyz whose comment
line is ``homo lumo total_energy`` (eV, whitespace-separated), and ``<out>/manifest.json``
with the settings and one entry per finished trajectory. Trajectories run replica-major
(all molecules and temperatures of replica 0 first), so a partial run still covers every
temperature.

Run (resumable; kill it any time and start it again)::

    OMP_NUM_THREADS=1 nice -n 10 python data/generate_fullerene.py --out data/fullerene
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.neighborlist import neighbor_list

sys.path.insert(0, str(Path(__file__).resolve().parent))
import xtb_md  # noqa: E402  (sibling module of this script)

BOND_CUTOFF = 1.6  # Å, C–C bonds in fullerenes are 1.38–1.47 Å


def _bonds(atoms: Atoms) -> dict[int, set[int]]:
    i, j = neighbor_list("ij", atoms, BOND_CUTOFF)
    neighbours: dict[int, set[int]] = {k: set() for k in range(len(atoms))}
    for a, b in zip(i, j):
        neighbours[int(a)].add(int(b))
    return neighbours


def _five_rings(neighbours: dict[int, set[int]]) -> set[frozenset[int]]:
    rings = set()
    for start in neighbours:
        stack = [[start]]
        while stack:
            path = stack.pop()
            if len(path) == 5:
                if start in neighbours[path[-1]]:
                    rings.add(frozenset(path))
                continue
            stack.extend(path + [n] for n in neighbours[path[-1]] if n not in path)
    return rings


def check_fullerene(atoms: Atoms) -> None:
    """Raises ValueError unless ``atoms`` is an isolated-pentagon fullerene cage.

    Checks: every atom has exactly three neighbours within 1.6 Å, there are exactly 12
    five-membered rings and no two share a bond.
    """
    neighbours = _bonds(atoms)
    coordination = np.array([len(n) for n in neighbours.values()])
    if np.any(coordination != 3):
        raise ValueError(f"atoms {np.flatnonzero(coordination != 3).tolist()} are not 3-coordinated")
    rings = _five_rings(neighbours)
    if len(rings) != 12:
        raise ValueError(f"expected 12 five-membered rings, found {len(rings)}")
    for a, b in itertools.combinations(rings, 2):
        if len(a & b) >= 2:
            raise ValueError("two five-membered rings share a bond (not an IPR fullerene)")


def _rotation_to_z(v: np.ndarray) -> np.ndarray:
    """Rotation matrix [3, 3] taking the unit vector along ``v`` to +z."""
    v = v / np.linalg.norm(v)
    axis = np.cross(v, [0.0, 0.0, 1.0])
    s, c = np.linalg.norm(axis), v[2]
    if s < 1e-12:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    k = axis / s
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + s * kx + (1 - c) * kx @ kx


def _rotation_about_z(degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def build_c70_guess() -> Atoms:
    """Unrelaxed D5h C70 built from ASE's C60 (construction in the module docstring)."""
    c60 = molecule("C60")
    pos = c60.positions - c60.positions.mean(axis=0)
    pentagon = min(_five_rings(_bonds(c60)), key=sorted)
    pos = pos @ _rotation_to_z(pos[list(pentagon)].mean(axis=0)).T  # C5 axis along z
    upper = pos[:, 2] > 0
    top = pos[upper] + [0.0, 0.0, 0.75]
    bottom = pos[~upper] @ _rotation_about_z(-36.0).T - [0.0, 0.0, 0.75]
    # The upper rim (10 atoms nearest the equator) comes in 5 bonded pairs 24° apart;
    # the belt atoms sit in the 48° gaps between pairs, 12° from each rim atom.
    rim_z = np.sort(top[:, 2])[:10].max() + 1e-3
    rim = top[top[:, 2] < rim_z]
    angles = np.sort(np.degrees(np.arctan2(rim[:, 1], rim[:, 0])))
    if angles[1] - angles[0] > 36.0:  # make (angles[0], angles[1]) a bonded pair
        angles = np.roll(angles, -1)
        angles[-1] += 360.0
    belt_angles = np.concatenate([
        [angles[2 * k + 1] + 12.0, angles[(2 * k + 2) % 10] + (360.0 if k == 4 else 0.0) - 12.0]
        for k in range(5)
    ])
    radius = 3.6  # Å, slightly outside the C60 rim (3.46 Å)
    belt = np.stack([radius * np.cos(np.radians(belt_angles)),
                     radius * np.sin(np.radians(belt_angles)), np.zeros(10)], axis=1)
    return Atoms("C70", positions=np.concatenate([top, bottom, belt]))


def starting_geometries() -> dict[str, Atoms]:
    """Relaxed C60 and C70 (GFN2-xTB), topology-checked, centred at the origin."""
    out = {}
    for name, guess in (("C60", molecule("C60")), ("C70", build_c70_guess())):
        relaxed = xtb_md.relax(guess)
        check_fullerene(relaxed)
        relaxed.positions -= relaxed.get_center_of_mass()
        out[name] = relaxed
    return out


def fullerene_comment(atoms: Atoms, calc) -> str:
    """Comment line ``homo lumo total_energy`` (eV) of the calculator's last SCF."""
    homo, lumo = xtb_md.frontier_orbitals(calc)
    return f"{homo:.6f} {lumo:.6f} {calc.results['energy']:.6f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "fullerene")
    parser.add_argument("--molecules", nargs="+", default=["C60", "C70"], choices=["C60", "C70"])
    parser.add_argument("--temperatures", nargs="+", type=int,
                        default=[500, 1000, 1500, 2000, 2500, 3000], help="K")
    args = xtb_md.parse_md_args(parser, argv, frames=90)
    manifest_path = args.out / "manifest.json"
    settings_record = {
        "method": "GFN2-xTB (tblite, accuracy 1.0, electronic temperature 300 K)",
        "comment_line": "homo lumo total_energy (eV)",
        "timestep_fs": 1.0, "friction_per_fs": 0.02,
        "equilibration_steps": args.equilibration_steps, "steps_per_frame": args.steps_per_frame,
        "frames_per_trajectory": args.frames, "seed": args.seed,
    }
    starts = starting_geometries()
    relaxed = {k: float(a.get_potential_energy()) for k, a in starts.items()}
    xtb_md.update_manifest(manifest_path, lambda m: m.update(settings=settings_record,
                                                             relaxed_energies_eV=relaxed))
    for replica, temperature, name in itertools.product(
            range(args.replicas), args.temperatures, args.molecules):
        chunk = f"{name}_T{temperature:04d}K_r{replica}"
        if (args.out / f"{chunk}.xyz.gz").exists():
            continue
        seed = int(np.random.SeedSequence(
            [args.seed, len(starts[name]), temperature, replica]).generate_state(1)[0])
        settings = xtb_md.MDSettings(
            temperature_K=float(temperature), seed=seed,
            equilibration_steps=args.equilibration_steps,
            steps_per_frame=args.steps_per_frame, num_frames=args.frames)
        summary = xtb_md.run_trajectory(starts[name], settings, args.out, chunk, fullerene_comment)
        if summary is None:  # another worker runs this chunk
            continue
        summary.update(molecule=name, temperature_K=temperature, replica=replica, seed=seed)
        xtb_md.record_chunk(manifest_path, chunk, summary)


if __name__ == "__main__":
    main()
