"""Voronoi neighbour featurisation speed on the Materials Project crystals (crystals/s).

Times `scannet_jax.neighbors.voronoi_neighbors(mode="exact")` (the Voronoi diagram of the
infinite crystal) on the crystals of ``data/mp`` (``e_form`` and ``gap`` sets, or a seeded sample)
in 1 and 2 worker processes, and in the same run pymatgen's ``VoronoiNN`` on a seeded subsample
of the same crystals, two ways:

* ``pymatgen_original``: the original SCANN's path (scann-reference §1.1): per site
  ``VoronoiNN(cutoff=7, allow_pathological=True, weight="solid_angle",
  compute_adj_neighbors=False).get_nn_info``, the sphere radius raised by 5 Å on a failure, then
  the Ω ≥ w_t, ρ ≥ 0.2, d ≤ d_t filter;
* ``pymatgen_all_nn``: the same ``VoronoiNN`` through ``get_all_nn_info`` (one tessellation for
  every site of the structure, pymatgen's faster call; the radius raised by 5 Å on a failure).

On that subsample the exact mode is timed again in one process (the like-for-like ratio), and
its edge sets (centre, neighbour, image) are compared with the original path's. pymatgen is not
a dependency of the project; run the script with an interpreter that has it, e.g. the venv
``/work/venvs/pmg`` (plain venv: numpy, scipy, ase, pymatgen, and this checkout installed with
``pip install -e . --no-deps``)::

    /work/venvs/pmg/bin/python experiments/bench_featurize_crystals.py
    python experiments/bench_featurize_crystals.py --num 500 --pymatgen-num 0   # no pymatgen

Prints a table; writes experiments/results/bench_featurize_crystals.json (with the machine's
load average: the machine may be shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import ase
import numpy as np

from bench_featurize import time_tasks
from scannet_jax import neighbors
from scannet_jax.datasets import mp

RESULTS = Path(__file__).resolve().parent / "results" / "bench_featurize_crystals.json"
MIN_RELATIVE_WEIGHT = 0.2


def _exact(task: tuple[ase.Atoms, float, float]) -> tuple[int, float]:
    """Edges of one crystal and the CPU seconds this process spent on it."""
    atoms, cutoff, min_solid_angle = task
    start = time.process_time()
    nb = neighbors.voronoi_neighbors(atoms, cutoff=cutoff, min_solid_angle=min_solid_angle, mode="exact")
    return len(nb.receivers), time.process_time() - start


def _structure(atoms: ase.Atoms):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(atoms.cell[:]), atoms.get_chemical_symbols(), atoms.positions,
                     coords_are_cartesian=True)


def _keep(entry: dict, distance: float, cutoff: float, min_solid_angle: float) -> bool:
    return (entry["poly_info"]["solid_angle"] >= min_solid_angle and entry["weight"] >= MIN_RELATIVE_WEIGHT
            and distance <= cutoff)


def pymatgen_original_edges(atoms: ase.Atoms, cutoff: float, min_solid_angle: float) -> set:
    """The original's per-site path (module docstring); edges as (i, j, image) tuples."""
    from pymatgen.analysis.local_env import VoronoiNN

    structure, radius, edges = _structure(atoms), 7.0, set()
    for i in range(len(structure)):
        while radius <= 30:
            try:
                nn = VoronoiNN(cutoff=radius, allow_pathological=True, weight="solid_angle",
                               compute_adj_neighbors=False).get_nn_info(structure, i)
                edges |= {(i, e["site_index"], tuple(int(v) for v in e["image"])) for e in nn
                          if _keep(e, e["site"].nn_distance, cutoff, min_solid_angle)}
                break
            except Exception:  # noqa: BLE001 - the original retries on anything
                radius += 5
    return edges


def _pymatgen_original(task: tuple[ase.Atoms, float, float]) -> tuple[int, float]:
    atoms, cutoff, min_solid_angle = task
    start = time.process_time()
    edges = pymatgen_original_edges(atoms, cutoff, min_solid_angle)
    return len(edges), time.process_time() - start


def _pymatgen_all_nn(task: tuple[ase.Atoms, float, float]) -> tuple[int, float]:
    from pymatgen.analysis.local_env import VoronoiNN

    atoms, cutoff, min_solid_angle = task
    start = time.process_time()
    structure, radius, info = _structure(atoms), 7.0, []
    while radius <= 30:  # the original's retry, for the whole structure at once
        try:
            info = VoronoiNN(cutoff=radius, allow_pathological=True, weight="solid_angle",
                             compute_adj_neighbors=False).get_all_nn_info(structure)
            break
        except Exception:  # noqa: BLE001
            radius += 5
    edges = sum(_keep(e, float(np.linalg.norm(e["site"].coords - structure[i].coords)), cutoff, min_solid_angle)
                for i, site in enumerate(info) for e in site)
    return int(edges), time.process_time() - start


def run(crystals: list[ase.Atoms], procs: int, worker, cutoff: float, min_solid_angle: float,
        chunksize: int = 16) -> dict:
    """Wall-clock and CPU rates of `worker` over the crystals (after a warm-up)."""
    tasks = [(a, cutoff, min_solid_angle) for a in crystals]
    results, seconds = time_tasks(tasks, procs, worker, chunksize, num_warm=10)
    cpu = sum(r[1] for r in results)
    # crystals per CPU-second estimates what one free core does on a shared machine
    return {"procs": procs, "crystals": len(tasks), "atoms": int(sum(len(a) for a in crystals)),
            "seconds": seconds, "crystals_per_s": len(tasks) / seconds, "cpu_seconds": cpu,
            "crystals_per_cpu_s": len(tasks) / cpu, "edges": int(sum(r[0] for r in results))}


def exact_edges(atoms: ase.Atoms, cutoff: float, min_solid_angle: float) -> set:
    nb = neighbors.voronoi_neighbors(atoms, cutoff=cutoff, min_solid_angle=min_solid_angle, mode="exact")
    return set(zip(nb.receivers.tolist(), nb.senders.tolist(), map(tuple, nb.shifts.tolist())))


def compare(crystals: list[ase.Atoms], cutoff: float, min_solid_angle: float) -> dict:
    """Exact mode against the original's pymatgen path, edge by edge."""
    same = only_exact = only_pymatgen = identical = 0
    for atoms in crystals:
        a = exact_edges(atoms, cutoff, min_solid_angle)
        b = pymatgen_original_edges(atoms, cutoff, min_solid_angle)
        same, only_exact, only_pymatgen = same + len(a & b), only_exact + len(a - b), only_pymatgen + len(b - a)
        identical += a == b
    return {"crystals": len(crystals), "crystals_with_identical_edges": identical, "edges_in_both": same,
            "edges_only_exact": only_exact, "edges_only_pymatgen_original": only_pymatgen}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="e_form,gap", help="mp.read names, comma-separated")
    parser.add_argument("--num", type=int, default=0, help="seeded sample of the crystals (0: all)")
    parser.add_argument("--pymatgen-num", type=int, default=200,
                        help="crystals of the sample also run through pymatgen (0: skip pymatgen)")
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--cutoff", type=float, default=6.0, help="d_t, Å (MP2018 recipe: 6)")
    parser.add_argument("--min-solid-angle", type=float, default=0.4, help="w_t, sr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    crystals = []
    for name in args.sets.split(","):
        crystals += mp.read(name)[0]
    rng = np.random.default_rng(args.seed)
    if args.num:
        crystals = [crystals[k] for k in np.sort(rng.choice(len(crystals), args.num, replace=False))]
    sizes = np.array([len(a) for a in crystals])
    load_before = os.getloadavg()
    rows = [{"method": "exact", **run(crystals, int(p), _exact, args.cutoff, args.min_solid_angle)}
            for p in args.procs.split(",")]
    comparison = pymatgen_version = None
    if args.pymatgen_num:
        from pymatgen.core import __version__ as pymatgen_version

        sub = [crystals[k] for k in np.sort(rng.choice(len(crystals), min(args.pymatgen_num, len(crystals)),
                                                       replace=False))]
        for method, worker in (("exact", _exact), ("pymatgen_original", _pymatgen_original),
                               ("pymatgen_all_nn", _pymatgen_all_nn)):
            rows.append({"method": method, "subsample": True,
                         **run(sub, 1, worker, args.cutoff, args.min_solid_angle)})
        comparison = compare(sub, args.cutoff, args.min_solid_angle)
    header = (f"{'method':<18} {'sample':<10} {'procs':>5} {'crystals':>8} {'s':>8} {'crystals/s':>10} "
              f"{'per CPU-s':>10} {'edges':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['method']:<18} {'subsample' if r.get('subsample') else 'all':<10} {r['procs']:>5} "
              f"{r['crystals']:>8} {r['seconds']:>8.2f} {r['crystals_per_s']:>10.1f} "
              f"{r['crystals_per_cpu_s']:>10.1f} {r['edges']:>8}")
    if comparison:
        print(f"edges, exact vs pymatgen original path, on the {comparison['crystals']} subsample crystals: "
              f"{comparison['edges_in_both']} in both, {comparison['edges_only_exact']} only exact, "
              f"{comparison['edges_only_pymatgen_original']} only pymatgen; "
              f"{comparison['crystals_with_identical_edges']} crystals identical")
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": sys.executable,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": os.getloadavg()},
        "pymatgen_version": pymatgen_version,
        # the neighbour code timed (the file may differ from the last commit while it is being worked on)
        "neighbors_py_sha256": hashlib.sha256(Path(neighbors.__file__).read_bytes()).hexdigest(),
        "sets": args.sets, "seed": args.seed, "cutoff": args.cutoff, "min_solid_angle": args.min_solid_angle,
        "crystals": len(crystals), "atoms_per_crystal": {"min": int(sizes.min()), "mean": float(sizes.mean()),
                                                         "max": int(sizes.max())},
        "runs": rows, "edge_comparison": comparison,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
