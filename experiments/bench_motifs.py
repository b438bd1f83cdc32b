"""Motif featurisation throughput (scannet_jax.motifs) on Materials Project oxides.

Takes `--num` oxides (structures containing O) of `data/mp/<set>.extxyz.gz`, a seeded sample
kept in file order, featurises them once in this process (per-structure times) and once with the process pool
(`motif_graphs`), and prints structures/s, the failures with their messages, and the motif and
edge counts. Writes experiments/results/bench_motifs.json.

    python experiments/bench_motifs.py --num=48 --workers=2
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
from ase.io import read

from scannet_jax import motifs

ROOT = Path(__file__).resolve().parents[1]


def load_oxides(dataset: str, num: int, seed: int) -> tuple[list, int, int]:
    with gzip.open(ROOT / "data" / "mp" / f"{dataset}.extxyz.gz", "rt") as f:
        structures = read(f, ":", format="extxyz")
    oxides = [a for a in structures if "O" in a.get_chemical_symbols()]
    for atoms in oxides:
        atoms.info["name"] = str(atoms.info.get("material_id", atoms.get_chemical_formula()))
    chosen = np.sort(np.random.default_rng(seed).permutation(len(oxides))[:num])
    return [oxides[k] for k in chosen], len(oxides), len(structures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="dielectric", help="data/mp/<dataset>.extxyz.gz")
    parser.add_argument("--num", type=int, default=48, help="oxides to featurise")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench_motifs.json"))
    args = parser.parse_args()

    oxides, num_oxides, num_structures = load_oxides(args.dataset, args.num, args.seed)
    sizes = np.array([len(a) for a in oxides])
    print(f"{args.dataset}: {num_structures} structures, {num_oxides} oxides; featurising "
          f"{len(oxides)} ({sizes.min()}–{sizes.max()} atoms, median {np.median(sizes):.0f})")
    load_before = os.getloadavg()

    motifs.motif_graph(oxides[0])  # warm-up: imports and pymatgen's lazy tables
    serial, seconds = [], []
    for atoms in oxides:
        start = time.perf_counter()
        try:
            serial.append(motifs.motif_graph(atoms))
        except motifs.MotifError as error:
            serial.append(error)
        seconds.append(time.perf_counter() - start)
    serial_s = float(np.sum(seconds))

    # Where the time goes: ChemEnv alone and CrystalNN (all sites) alone, on the same structures.
    from pymatgen.io.ase import AseAtomsAdaptor

    phases = {"chemenv": 0.0, "crystalnn": 0.0}
    for atoms in oxides:
        structure = AseAtomsAdaptor.get_structure(atoms)
        centers = np.flatnonzero(np.asarray(atoms.get_chemical_symbols()) != "O")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            motifs._chemenv_symbols(structure, centers)
            phases["chemenv"] += time.perf_counter() - start
            start = time.perf_counter()
            motifs._crystalnn_data(structure)
            phases["crystalnn"] += time.perf_counter() - start

    start = time.perf_counter()
    pooled = motifs.motif_graphs(oxides, num_workers=args.workers, progress=True)
    pooled_s = time.perf_counter() - start  # includes starting the spawned workers

    graphs = [g for g in serial if isinstance(g, motifs.MotifGraph)]
    failures = [str(e) for e in serial if isinstance(e, motifs.MotifError)]
    same = all(type(a) is type(b) and (isinstance(a, motifs.MotifError) or all(
        np.array_equal(x, y) for x, y in zip(a, b))) for a, b in zip(serial, pooled))
    seconds = np.asarray(seconds)
    sharing = collections.Counter(motifs.SHARING_NAMES[s] for g in graphs for s in g.sharing)
    environments = collections.Counter(e for g in graphs for e in g.environments)
    result = {
        "dataset": args.dataset, "seed": args.seed, "num_structures_in_set": num_structures,
        "num_oxides_in_set": num_oxides, "num_featurised": len(oxides),
        "atoms_per_structure": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                "max": int(sizes.max())},
        "serial": {"seconds": serial_s, "structures_per_s": len(oxides) / serial_s,
                   "per_structure_s": {"mean": float(seconds.mean()),
                                       "median": float(np.median(seconds)),
                                       "max": float(seconds.max())},
                   "slowest": [{"name": oxides[k].info["name"], "atoms": int(sizes[k]),
                                "seconds": float(seconds[k])} for k in np.argsort(-seconds)[:3]],
                   "seconds_per_atom_fit": float(np.sum(seconds * sizes) / np.sum(sizes**2)),
                   "phase_seconds": phases},
        "pool": {"workers": args.workers, "seconds": pooled_s,
                 "structures_per_s": len(oxides) / pooled_s, "same_as_serial": bool(same)},
        "num_failed": len(failures), "failures": failures,
        "motifs_per_structure": float(np.mean([len(g.centers) for g in graphs])),
        "edges_per_structure": float(np.mean([len(g.receivers) for g in graphs])),
        "edge_sharing_counts": dict(sharing),
        "most_common_environments": dict(environments.most_common(8)),
        "machine": {"cpus": os.cpu_count(), "load_average_1min_before": load_before[0],
                    "load_average_1min_after": os.getloadavg()[0],
                    "python": platform.python_version()},
    }
    print(f"serial: {result['serial']['structures_per_s']:.2f} structures/s "
          f"({serial_s:.1f} s; per structure mean {seconds.mean():.2f} s, max {seconds.max():.2f} s)")
    print(f"  of which ChemEnv {phases['chemenv']:.1f} s, CrystalNN {phases['crystalnn']:.1f} s "
          "(timed in a separate pass)")
    print(f"pool of {args.workers}: {result['pool']['structures_per_s']:.2f} structures/s "
          f"({pooled_s:.1f} s incl. worker start-up), identical to serial: {same}")
    print(f"failed: {len(failures)}" + "".join(f"\n  {f}" for f in failures))
    print(f"motifs/structure {result['motifs_per_structure']:.1f}, "
          f"edges/structure {result['edges_per_structure']:.1f}, sharing {dict(sharing)}")
    print(f"load average (1 min) {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, "
          f"on {os.cpu_count()} CPUs")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
