"""Generates the Pt/graphene-MD dataset: GFN2-xTB Langevin MD of Pt clusters on a graphene flake.

What is computed (reference §5, "Pt/graphene-MD"; same file format as the original):
  * Substrate: circumcoronene C54H18, the hydrogen-terminated graphene flake of all carbon atoms
    within 6.2 Å of a hexagon centre (C–C 1.42 Å, C–H 1.09 Å before relaxation). A periodic
    sheet was measured and not used: one GFN2-xTB SCF + gradient of a 5×5 graphene cell (C50)
    with Pt3 took 1.0 s against 0.58 s for C54H18Pt3 (one thread, machine shared), and the
    original treats these structures as molecules anyway.
  * Adsorbates: Pt1, Pt3 (triangle parallel to the sheet) and Pt4 (tetrahedron, one face down),
    placed above the central hexagon; each complex is relaxed with GFN2-xTB (BFGS, max |F| <
    0.05 eV/Å) before MD.
  * Reference energy of a system = E(C54H18, relaxed) + E(Pt_n, relaxed in vacuum), i.e. the
    energy of the separated parts, so ``total_energy - ref_energy`` is the (negative) binding
    energy of the cluster plus the thermal energy of the frame. All calculations are spin
    restricted (no unpaired electrons imposed) with 300 K Fermi smearing, the tblite default;
    in particular the free Pt atom is the restricted one, not its triplet ground state.
  * Langevin MD (1 fs step, friction 0.02 fs⁻¹, centre of mass fixed) at 300, 600 and 900 K,
    two independent trajectories per system and temperature; 40 unsaved equilibration steps,
    then a frame every 5 steps, 50 frames per trajectory: 18 trajectories, 900 frames.
  * Every frame is labelled with the GFN2-xTB total energy (eV) of that geometry and the
    system's reference energy (eV). Settings of the method: see ``xtb_md``.

Output: ``<out>/C54H18Pt<n>_T<temperature>K_r<replica>.xyz.gz``, multi-frame xyz whose comment
line is ``total_energy ref_energy`` (eV), and ``<out>/manifest.json`` with the settings, the
reference energies and one entry per finished trajectory. Trajectories run replica-major.

Run (resumable; kill it any time and start it again)::

    OMP_NUM_THREADS=1 nice -n 10 python data/generate_pt_graphene.py --out data/pt_graphene
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import graphene
from ase.neighborlist import neighbor_list

sys.path.insert(0, str(Path(__file__).resolve().parent))
import xtb_md  # noqa: E402  (sibling module of this script)

FLAKE_RADIUS = 6.2  # Å; 3.8 gives coronene C24H12, 6.2 circumcoronene C54H18
CC_BOND = 1.42  # Å
CH_BOND = 1.09  # Å

# Unrelaxed cluster shapes (Å), centred later; z is the height above the sheet's plane.
PT_CLUSTERS = {
    1: [[0.0, 0.0, 2.1]],
    3: [[0.0, 0.0, 2.4], [2.6, 0.0, 2.4], [1.3, 2.25, 2.4]],
    4: [[0.0, 0.0, 2.2], [2.6, 0.0, 2.2], [1.3, 2.25, 2.2], [1.3, 0.75, 4.32]],
}


def build_flake(radius: float = FLAKE_RADIUS) -> Atoms:
    """Hydrogen-terminated graphene flake: C atoms within ``radius`` Å of a hexagon centre.

    Every carbon with only two carbon neighbours gets one H along the bisector pointing away
    from them. The flake lies in the z = 0 plane, centred on the hexagon.
    """
    sheet = graphene(formula="C2", a=CC_BOND * np.sqrt(3), size=(16, 16, 1), vacuum=10.0)
    sheet.pbc = False
    middle = int(np.argmin(np.linalg.norm(sheet.positions - sheet.positions.mean(0), axis=1)))
    i, j = neighbor_list("ij", sheet, 1.6)
    b, c = j[i == middle][:2]
    centre = sheet.positions[b] + sheet.positions[c] - sheet.positions[middle]  # a hexagon centre
    carbons = sheet[np.linalg.norm(sheet.positions - centre, axis=1) < radius]
    carbons.positions -= centre
    carbons.cell = None
    i, j = neighbor_list("ij", carbons, 1.6)
    coordination = np.bincount(i, minlength=len(carbons))
    if coordination.min() < 2:
        raise ValueError(f"radius {radius} Å leaves dangling carbon atoms; pick another shell")
    hydrogens = []
    for k in np.flatnonzero(coordination == 2):
        away = 2 * carbons.positions[k] - carbons.positions[j[i == k]].sum(axis=0)
        hydrogens.append(carbons.positions[k] + CH_BOND * away / np.linalg.norm(away))
    return carbons + Atoms(f"H{len(hydrogens)}", positions=hydrogens)


def build_cluster(n: int) -> Atoms:
    """Unrelaxed Pt_n cluster (n in 1, 3, 4) above the origin, lowest atoms 2.1–2.4 Å up."""
    positions = np.asarray(PT_CLUSTERS[n], dtype=float)
    positions[:, :2] -= positions[:, :2].mean(axis=0)
    return Atoms(f"Pt{n}", positions=positions)


def prepare_systems(sizes: list[int]) -> tuple[dict[int, Atoms], dict[str, float]]:
    """Relaxed complexes and the energies of the separated, relaxed parts.

    Returns:
      ``({n: relaxed C54H18 + Pt_n}, {"C54H18": E, "Pt<n>": E, ...})``, energies in eV.
    """
    flake = xtb_md.relax(build_flake())
    energies = {flake.get_chemical_formula(): float(flake.get_potential_energy())}
    systems = {}
    for n in sizes:
        cluster = xtb_md.relax(build_cluster(n))
        energies[f"Pt{n}"] = float(cluster.get_potential_energy())
        complex_ = xtb_md.relax(flake + build_cluster(n), fmax=0.05)
        complex_.positions -= complex_.get_center_of_mass()
        systems[n] = complex_
    return systems, energies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "pt_graphene")
    parser.add_argument("--clusters", nargs="+", type=int, default=[1, 3, 4], choices=[1, 3, 4])
    parser.add_argument("--temperatures", nargs="+", type=int, default=[300, 600, 900], help="K")
    args = xtb_md.parse_md_args(parser, argv, frames=50)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"chunks": {}}
    if "start_positions" in manifest:  # relaxation is deterministic; reuse it on restarts
        energies = manifest["part_energies_eV"]
        flake = build_flake()
        systems = {n: flake + build_cluster(n) for n in args.clusters}
        for n, atoms in systems.items():
            atoms.positions = np.asarray(manifest["start_positions"][str(n)])
    else:
        systems, energies = prepare_systems(args.clusters)
    flake_name = next(k for k in energies if not k.startswith("Pt"))
    header = {
        "settings": {
            "method": "GFN2-xTB (tblite, accuracy 1.0, electronic temperature 300 K, restricted)",
            "comment_line": "total_energy ref_energy (eV)",
            "timestep_fs": 1.0, "friction_per_fs": 0.02,
            "equilibration_steps": args.equilibration_steps,
            "steps_per_frame": args.steps_per_frame,
            "frames_per_trajectory": args.frames, "seed": args.seed,
        },
        "part_energies_eV": energies,
        "start_positions": {str(n): a.positions.tolist() for n, a in systems.items()},
    }
    xtb_md.update_manifest(manifest_path, lambda m: m.update(header))
    for replica, temperature, n in itertools.product(
            range(args.replicas), args.temperatures, args.clusters):
        chunk = f"{flake_name}Pt{n}_T{temperature:04d}K_r{replica}"
        if (args.out / f"{chunk}.xyz.gz").exists():
            continue
        reference = energies[flake_name] + energies[f"Pt{n}"]
        seed = int(np.random.SeedSequence([args.seed, n, temperature, replica]).generate_state(1)[0])
        settings = xtb_md.MDSettings(
            temperature_K=float(temperature), seed=seed,
            equilibration_steps=args.equilibration_steps,
            steps_per_frame=args.steps_per_frame, num_frames=args.frames)

        def comment(atoms: Atoms, calc, reference: float = reference) -> str:
            return f"{calc.results['energy']:.6f} {reference:.6f}"

        summary = xtb_md.run_trajectory(systems[n], settings, args.out, chunk, comment)
        if summary is None:  # another worker runs this chunk
            continue
        summary.update(system=f"{flake_name}Pt{n}", temperature_K=temperature, replica=replica,
                       seed=seed, ref_energy_eV=reference)
        xtb_md.record_chunk(manifest_path, chunk, summary)


if __name__ == "__main__":
    main()
