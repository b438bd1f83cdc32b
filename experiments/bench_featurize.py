"""Voronoi neighbour featurisation speed on QM9 (molecules/s), per mode and process count.

Reads molecules straight from qm9pack's CSV files, featurises a seeded random sample (or all
130,831 with --all) with `neighbors.neighbors_from_arrays` in 1 and 2 worker processes, and, if
pymatgen is importable, times the original's pymatgen VoronoiNN path on a smaller sample. Prints a
table and writes experiments/results/bench_featurize.json (with the machine's load average, since
the machine may be shared).

    python experiments/bench_featurize.py --num 5000
    python experiments/bench_featurize.py --all --modes exact --procs 2
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.resources
import json
import multiprocessing
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers

from scannet_jax import neighbors

RESULTS = Path(__file__).resolve().parent / "results" / "bench_featurize.json"
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def read_qm9(num: int | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(Z [N], positions [N, 3] Å) of `num` seeded random QM9 molecules (all if None), file order."""
    csv.field_size_limit(1 << 24)
    rows = []
    for part in (1, 2, 3):
        path = importlib.resources.files("qm9pack") / "data" / f"qm9_part{part}.csv"
        with path.open() as f:
            rows.extend((r["Elements"], r["XYZ_Ang"]) for r in csv.DictReader(f))
    chosen = range(len(rows)) if num is None else np.sort(np.random.default_rng(seed).choice(len(rows), num, False))
    molecules = []
    for k in chosen:
        elements, xyz = rows[k]
        z = np.array([atomic_numbers[e] for e in ast.literal_eval(elements)])
        molecules.append((z, np.array(_NUMBER.findall(xyz), float).reshape(len(z), 3)))
    return molecules


def _featurize(task: tuple[np.ndarray, np.ndarray, str]) -> tuple[int, float]:
    """Edges of one molecule and the CPU seconds this process spent on it."""
    z, positions, mode = task
    start = time.process_time()
    edges = len(neighbors.neighbors_from_arrays(z, positions, mode=mode).receivers)
    return edges, time.process_time() - start


def _pymatgen_original(task: tuple[np.ndarray, np.ndarray, str]) -> tuple[int, float]:
    """The original's path: boxed float32 molecule, VoronoiNN(cutoff=7) per site, R + 5 retries."""
    from pymatgen.analysis.local_env import VoronoiNN
    from pymatgen.core import Molecule

    z, positions, _ = task
    start = time.process_time()
    coords = positions.astype(np.float32)
    extent = coords.max(axis=0) - coords.min(axis=0)
    box = np.maximum(10.0, extent.astype(np.float64) + 0.1)
    structure = Molecule(z.tolist(), coords).get_boxed_structure(*box, reorder=False)
    radius, edges = 7.0, 0
    for i in range(len(structure)):
        while radius <= 30:
            try:
                nn = VoronoiNN(cutoff=radius, allow_pathological=True, weight="solid_angle",
                               compute_adj_neighbors=False).get_nn_info(structure, i)
                edges += sum(1 for e in nn if e["poly_info"]["solid_angle"] >= 0.4 and e["weight"] >= 0.2
                             and e["site"].nn_distance <= 4.0)
                break
            except Exception:  # noqa: BLE001 - the original retries on anything
                radius += 5
    return edges, time.process_time() - start


def run(molecules, mode: str, procs: int, worker=_featurize, chunksize: int = 64) -> dict:
    tasks = [(z, x, mode) for z, x in molecules]
    warm = tasks[: min(20, len(tasks))]
    if procs == 1:
        for t in warm:
            worker(t)
        start = time.perf_counter()
        results = list(map(worker, tasks))
        seconds = time.perf_counter() - start
    else:
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            pool.map(worker, warm * procs, chunksize=1)  # import and warm every worker
            start = time.perf_counter()
            results = list(pool.imap(worker, tasks, chunksize=chunksize))
            seconds = time.perf_counter() - start
    cpu = sum(r[1] for r in results)
    # CPU seconds spent inside the featuriser: on a shared machine, molecules per CPU-second
    # estimates what one free core does, while wall-clock molecules/s depends on the load.
    return {"mode": mode, "procs": procs, "molecules": len(tasks), "seconds": seconds,
            "molecules_per_s": len(tasks) / seconds, "cpu_seconds": cpu, "molecules_per_cpu_s": len(tasks) / cpu,
            "edges": int(sum(r[0] for r in results))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=5000, help="molecules in the sample")
    parser.add_argument("--all", action="store_true", help="all 130,831 QM9 molecules")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="exact,original")
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--pymatgen-num", type=int, default=200,
                        help="molecules (evenly spaced in the sample) for the pymatgen column (0: skip)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    t0 = time.perf_counter()
    molecules = read_qm9(None if args.all else args.num, args.seed)
    read_s = time.perf_counter() - t0
    load_before = os.getloadavg()
    rows = [run(molecules, mode, int(p)) for mode in args.modes.split(",") for p in args.procs.split(",")]
    try:
        import pymatgen.core  # noqa: F401
        has_pymatgen = args.pymatgen_num > 0
    except ImportError:
        has_pymatgen = False
    if has_pymatgen:  # an evenly spaced subset (the sample is in file order, small molecules first)
        subset = molecules[:: max(1, len(molecules) // args.pymatgen_num)][: args.pymatgen_num]
        rows.append(run(subset, "pymatgen VoronoiNN (original)", 1, worker=_pymatgen_original))
        rows.append(dict(run(subset, "original", 1), mode="original, same subset"))
    load_after = os.getloadavg()

    print(f"QM9 sample: {len(molecules)} molecules (seed {args.seed}), read in {read_s:.1f} s; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores")
    print(f"{'mode':32s} {'procs':>5s} {'molecules':>9s} {'seconds':>8s} {'mol/s':>8s} {'mol/s/proc':>10s} "
          f"{'mol/CPU-s':>9s} {'edges':>8s}")
    for r in rows:
        print(f"{r['mode']:32s} {r['procs']:5d} {r['molecules']:9d} {r['seconds']:8.2f} {r['molecules_per_s']:8.1f} "
              f"{r['molecules_per_s'] / r['procs']:10.1f} {r['molecules_per_cpu_s']:9.1f} {r['edges']:8d}")
    if not has_pymatgen:
        print("pymatgen not importable: no pymatgen column")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": " ".join(sys.argv), "neighbors_version": neighbors.NEIGHBORS_VERSION, "seed": args.seed,
        "sample": "all" if args.all else args.num, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(), "loadavg_before": load_before, "loadavg_after": load_after,
        "pymatgen": has_pymatgen, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
