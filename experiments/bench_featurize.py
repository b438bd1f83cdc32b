"""Voronoi neighbour featurisation speed on QM9 (molecules/s), per mode and process count.

Reads molecules straight from qm9pack's CSV files, featurises a seeded random sample (or all
130,831 with --all) with `neighbors.neighbors_from_arrays` in 1 and 2 worker processes, and, if
pymatgen is importable, times the original's pymatgen VoronoiNN path on a smaller sample. Prints a
table and writes experiments/results/bench_featurize.json (with the machine's load average, since
the machine may be shared).

    python experiments/bench_featurize.py --num 5000
    python experiments/bench_featurize.py --all --modes exact --procs 2

With --baseline REV it instead times this checkout's `scannet_jax/neighbors.py` against the same
file at git revision REV, side by side in one run: each version in its own subprocess, kept
alive, the same molecules in --chunks chunks that the two versions take in turn (the order
alternating), --rounds times over the sample; it reports the medians over rounds of each rate
and of the per-round ratio, and compares the two versions' outputs on --compare-num molecules. Writes experiments/results/bench_featurize_baseline.json.

    python experiments/bench_featurize.py --baseline 6aef04e --num 2000 --rounds 5

With --large it instead measures peak memory and seconds of exact-mode featurisation of single
large structures (--sizes atoms, default 100,1000,3000,10000): a seeded random packing of H/C/N/O
at liquid density in a sphere (`packed_molecule`) and a supercell of rocksalt MgO with seeded
displacements (`displaced_crystal`). Each structure is featurised in a fresh subprocess (memory
capped by --memory-limit-gb, so that a quadratic version fails instead of swapping): peak RSS
(ru_maxrss minus the same process's RSS after import and building the structure, i.e. with
Qhull's own allocations), then, in a second run, the tracemalloc peak of NumPy/Python allocations
split into input validation and the Voronoi computation. With --baseline REV the same is done for
`scannet_jax/neighbors.py` at REV. Writes experiments/results/bench_featurize_large.json.

    python experiments/bench_featurize.py --large --baseline HEAD --sizes 100,1000,3000
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.resources
import importlib.util
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers

from scannet_jax import neighbors

RESULTS = Path(__file__).resolve().parent / "results" / "bench_featurize.json"
BASELINE_RESULTS = RESULTS.with_name("bench_featurize_baseline.json")
LARGE_RESULTS = RESULTS.with_name("bench_featurize_large.json")
REPO = Path(__file__).resolve().parents[1]
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


def time_tasks(tasks: list, procs: int, worker, chunksize: int, num_warm: int) -> tuple[list, float]:
    """(results of ``worker`` on every task, wall seconds), in this process or a pool of
    ``procs``, after ``num_warm`` warm-up tasks (per worker); each result is (edges, CPU seconds)."""
    warm = tasks[: min(num_warm, len(tasks))]
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
    return results, seconds


def run(molecules, mode: str, procs: int, worker=_featurize, chunksize: int = 64) -> dict:
    tasks = [(z, x, mode) for z, x in molecules]
    results, seconds = time_tasks(tasks, procs, worker, chunksize, num_warm=20)
    cpu = sum(r[1] for r in results)
    # CPU seconds spent inside the featuriser: on a shared machine, molecules per CPU-second
    # estimates what one free core does, while wall-clock molecules/s depends on the load.
    return {"mode": mode, "procs": procs, "molecules": len(tasks), "seconds": seconds,
            "molecules_per_s": len(tasks) / seconds, "cpu_seconds": cpu, "molecules_per_cpu_s": len(tasks) / cpu,
            "edges": int(sum(r[0] for r in results))}


def load_neighbors_module(path: Path | None):
    """This checkout's `scannet_jax.neighbors` (path None), or the file at `path` as its own module."""
    if path is None:
        return neighbors
    spec = importlib.util.spec_from_file_location("neighbors_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _save_sample(molecules, path: Path) -> None:
    ptr = np.cumsum([0] + [len(z) for z, _ in molecules])
    np.savez(path, numbers=np.concatenate([z for z, _ in molecules]),
             positions=np.concatenate([x for _, x in molecules]), ptr=ptr)


def _time_worker(sample: Path, module: Path | None) -> None:
    """Serve timing requests for one version (run in its own subprocess, kept alive).

    Reads lines "mode start stop" from stdin, featurises molecules start..stop-1 of the saved
    sample and answers one JSON line (CPU and wall seconds, edges); every mode is warmed up first.
    """
    nb = load_neighbors_module(module)
    data = np.load(sample)
    molecules = [(data["numbers"][a:b], data["positions"][a:b]) for a, b in zip(data["ptr"][:-1], data["ptr"][1:])]
    warm = set()
    for line in sys.stdin:
        mode, start, stop = line.split()
        if mode not in warm:
            for z, x in molecules[:20]:
                nb.neighbors_from_arrays(z, x, mode=mode)
            warm.add(mode)
        wall, cpu, edges = time.perf_counter(), time.process_time(), 0
        for z, x in molecules[int(start):int(stop)]:
            edges += len(nb.neighbors_from_arrays(z, x, mode=mode).receivers)
        print(json.dumps({"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall, "edges": edges}),
              flush=True)


def compare_outputs(molecules, baseline, mode: str) -> dict:
    """This checkout against the baseline module: facets (Ω > 1e-9 sr) and default-threshold edges."""
    every = {"cutoff": np.inf, "min_solid_angle": 0.0, "min_relative_weight": 0.0}
    changed_facets = changed_edges = changed_molecules = 0
    worst = 0.0
    for z, x in molecules:
        facets = []
        for module in (neighbors, baseline):
            nb = module.neighbors_from_arrays(z, x, mode=mode, **every)
            facets.append({(i, j, tuple(s)): w for i, j, s, w in zip(
                nb.receivers.tolist(), nb.senders.tolist(), nb.shifts.tolist(), nb.solid_angles) if w > 1e-9})
        new, old = facets
        changed_facets += len(new.keys() ^ old.keys())
        delta = max(abs(new.get(k, 0.0) - old.get(k, 0.0)) for k in new.keys() | old.keys())
        worst = max(worst, delta)
        changed_molecules += delta > 1e-8
        edges = [{(i, j, tuple(s)) for i, j, s in zip(nb.receivers.tolist(), nb.senders.tolist(), nb.shifts.tolist())}
                 for nb in (module.neighbors_from_arrays(z, x, mode=mode) for module in (neighbors, baseline))]
        changed_edges += len(edges[0] ^ edges[1])
    return {"mode": mode, "molecules": len(molecules), "facets_in_one_version_only": changed_facets,
            "max_abs_delta_solid_angle": worst, "molecules_changed_over_1e-8_sr": int(changed_molecules),
            "default_edges_in_one_version_only": changed_edges}


def run_baseline(args, molecules) -> None:
    """Side-by-side timing and output comparison against `args.baseline` (module docstring)."""
    revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.baseline], check=True,
                              capture_output=True, text=True).stdout.strip()
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        base_file = Path(tmp) / "neighbors_baseline.py"
        base_file.write_text(subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:scannet_jax/neighbors.py"],
                                            check=True, capture_output=True, text=True).stdout)
        sample = Path(tmp) / "sample.npz"
        _save_sample(molecules, sample)
        baseline = load_neighbors_module(base_file)
        subset = molecules[:: max(1, len(molecules) // args.compare_num)][: args.compare_num]
        comparisons = [compare_outputs(subset, baseline, mode) for mode in modes]
        load_before = os.getloadavg()
        workers = {}
        for version, module in (("baseline", base_file), ("this checkout", None)):
            command = [sys.executable, __file__, "--time-worker", str(sample)]
            if module is not None:
                command += ["--worker-module", str(module)]
            workers[version] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        # Fine-grained interleaving: chunk by chunk, the two versions alternate (order flipping
        # every chunk), so that both see the same load; each round covers the whole sample.
        bounds = np.linspace(0, len(molecules), args.chunks + 1).astype(int)
        runs = []
        for r in range(args.rounds):
            for mode in modes:
                total = {v: {"cpu_s": 0.0, "wall_s": 0.0, "edges": 0} for v in workers}
                for c, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
                    order = list(workers) if (r + c) % 2 == 0 else list(workers)[::-1]
                    for version in order:
                        workers[version].stdin.write(f"{mode} {start} {stop}\n")
                        workers[version].stdin.flush()
                        answer = json.loads(workers[version].stdout.readline())
                        for key in total[version]:
                            total[version][key] += answer[key]
                for version, t in total.items():
                    runs.append({"round": r, "version": version, "mode": mode, "edges": t["edges"],
                                 "molecules_per_cpu_s": len(molecules) / t["cpu_s"],
                                 "molecules_per_s": len(molecules) / t["wall_s"]})
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
        load_after = os.getloadavg()
    print(f"QM9 sample: {len(molecules)} molecules (seed {args.seed}); baseline {revision} "
          f"(NEIGHBORS_VERSION {baseline.NEIGHBORS_VERSION}) vs this checkout ({neighbors.NEIGHBORS_VERSION}); "
          f"{args.rounds} rounds of {args.chunks} interleaved chunks, one process per version; "
          f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    summary = []
    for mode in modes:
        row = {"mode": mode}
        for version in ("baseline", "this checkout"):
            mine = [r for r in runs if r["mode"] == mode and r["version"] == version]
            for key in ("molecules_per_s", "molecules_per_cpu_s"):
                row[f"{version} {key} median"] = statistics.median(r[key] for r in mine)
            row[f"{version} edges"] = mine[0]["edges"]
        pairs = [(a, b) for a in runs for b in runs if a["mode"] == b["mode"] == mode and a["round"] == b["round"]
                 and a["version"] == "this checkout" and b["version"] == "baseline"]
        row["ratio mol/CPU-s (this / baseline), median over rounds"] = statistics.median(
            a["molecules_per_cpu_s"] / b["molecules_per_cpu_s"] for a, b in pairs)
        row["ratio mol/s (this / baseline), median over rounds"] = statistics.median(
            a["molecules_per_s"] / b["molecules_per_s"] for a, b in pairs)
        summary.append(row)
        print(f"{mode:9s} mol/CPU-s median: baseline {row['baseline molecules_per_cpu_s median']:7.1f}, this "
              f"{row['this checkout molecules_per_cpu_s median']:7.1f} "
              f"(x{row['ratio mol/CPU-s (this / baseline), median over rounds']:.3f}); mol/s median: baseline "
              f"{row['baseline molecules_per_s median']:7.1f}, this {row['this checkout molecules_per_s median']:7.1f} "
              f"(x{row['ratio mol/s (this / baseline), median over rounds']:.3f}); "
              f"edges {row['baseline edges']} -> {row['this checkout edges']}")
    for c in comparisons:
        print(f"{c['mode']:9s} outputs on {c['molecules']} molecules: {c['facets_in_one_version_only']} facets "
              f"(> 1e-9 sr) in one version only, max |dOmega| {c['max_abs_delta_solid_angle']:.3g} sr, "
              f"{c['molecules_changed_over_1e-8_sr']} molecules changed by > 1e-8 sr, "
              f"{c['default_edges_in_one_version_only']} default-threshold edges in one version only")
    out = args.out if args.out != RESULTS else BASELINE_RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(sys.argv), "baseline": revision, "baseline_neighbors_version": baseline.NEIGHBORS_VERSION,
        "neighbors_version": neighbors.NEIGHBORS_VERSION, "seed": args.seed, "sample": len(molecules),
        "rounds": args.rounds, "chunks": args.chunks, "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
        "summary": summary, "comparisons": comparisons, "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")


def packed_molecule(num_atoms: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(Z [N], positions [N, 3] Å): H/C/N/O (50/30/10/10 %) at 0.1 atoms/Å^3 in a sphere.

    Uniform points in the ball, every atom of a pair closer than 0.9 Å redrawn until none is
    (random sequential packing: water's number density, its shortest bond just above 0.9 Å).
    """
    rng = np.random.default_rng(seed)
    radius = (3 * num_atoms / (4 * np.pi * 0.1)) ** (1 / 3)

    def ball(k: int) -> np.ndarray:
        u = rng.normal(size=(k, 3))
        return radius * rng.random((k, 1)) ** (1 / 3) * u / np.linalg.norm(u, axis=1, keepdims=True)

    from scipy.spatial import cKDTree

    positions = ball(num_atoms)
    while True:
        pairs = cKDTree(positions).query_pairs(0.9, output_type="ndarray")
        if not len(pairs):
            break
        redo = np.unique(pairs[:, 1])
        positions[redo] = ball(len(redo))
    numbers = rng.choice([1, 6, 7, 8], num_atoms, p=[0.5, 0.3, 0.1, 0.1])
    return numbers, positions


def displaced_crystal(num_atoms: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Z [N], positions [N, 3] Å, cell [3, 3] Å): rocksalt MgO (a = 4.21 Å, 2-atom primitive cell)
    repeated n1 x n2 x n3 times (the most nearly cubic factorisation of num_atoms / 2), every atom
    displaced by a seeded normal of 0.05 Å per axis."""
    from ase.build import bulk

    half = num_atoms // 2
    if 2 * half != num_atoms:
        raise ValueError(f"displaced_crystal: even atom count expected, got {num_atoms}")
    reps = min(((a, b, half // (a * b)) for a in range(1, half + 1) for b in range(a, half + 1)
                if half % (a * b) == 0 and half // (a * b) >= b), key=lambda r: r[2] / r[0])
    atoms = bulk("MgO", "rocksalt", a=4.21).repeat(reps)
    rng = np.random.default_rng(seed)
    return atoms.numbers, atoms.positions + rng.normal(scale=0.05, size=atoms.positions.shape), atoms.cell.array


def _rss_mb() -> float:
    """This process's peak resident set so far, MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _large_worker(kind: str, num_atoms: int, module: Path | None, memory_limit_gb: float) -> None:
    """Featurise one large structure; print one JSON line.

    First the Voronoi part alone (`_exact_molecule` / `_exact_crystal` and `_select`, default
    thresholds): seconds and peak RSS above this process's RSS before it; then the input checks
    (`_validate`): seconds (a MemoryError is recorded, not raised); then both again under
    tracemalloc for the peaks of traced allocations.
    """
    limit = int(memory_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    nb = load_neighbors_module(module)
    if kind == "molecule":
        numbers, positions = packed_molecule(num_atoms)
        cell, pbc = np.zeros((3, 3)), False
    else:
        numbers, positions, cell = displaced_crystal(num_atoms)
        pbc = True

    def voronoi():
        facets = nb._exact_crystal(numbers, positions, cell) if pbc else nb._exact_molecule(numbers, positions)
        return nb._select(facets, positions, cell, 4.0, 0.4, 0.2, nb.TIE_TOLERANCE)

    def validate():
        nb._validate(numbers, positions, cell, pbc, "exact")

    row: dict = {"kind": kind, "atoms": num_atoms}
    baseline = _rss_mb()
    for part, work in (("voronoi", voronoi), ("validate", validate)):
        try:
            start = time.perf_counter()
            result = work()
            row[f"{part}_seconds"] = time.perf_counter() - start
            if part == "voronoi":
                row["peak_rss_mb"] = _rss_mb() - baseline
                row["edges"] = int(len(result.receivers))
        except MemoryError:
            row[f"{part}_error"] = f"MemoryError (address space capped at {memory_limit_gb:g} GB)"
    row["peak_rss_mb_with_validate"] = _rss_mb() - baseline
    for part, work in (("voronoi", voronoi), ("validate", validate)):
        if f"{part}_error" in row:
            continue
        tracemalloc.start()
        work()
        row[f"tracemalloc_{part}_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    print(json.dumps(row), flush=True)


def run_large(args) -> None:
    """Peak memory and seconds on large structures, each in a fresh subprocess (module docstring)."""
    versions: list[tuple[str, Path | None]] = [("this checkout", None)]
    with tempfile.TemporaryDirectory() as tmp:
        revision = None
        if args.baseline:
            revision = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.baseline], check=True,
                                      capture_output=True, text=True).stdout.strip()
            base_file = Path(tmp) / "neighbors_baseline.py"
            base_file.write_text(subprocess.run(
                ["git", "-C", str(REPO), "show", f"{revision}:scannet_jax/neighbors.py"],
                check=True, capture_output=True, text=True).stdout)
            versions.insert(0, (f"baseline {revision}", base_file))
        rows = []
        for kind in args.kinds.split(","):
            for num_atoms in (int(s) for s in args.sizes.split(",")):
                for version, module in versions:
                    command = [sys.executable, __file__, "--large-worker", kind, str(num_atoms),
                               "--memory-limit-gb", str(args.memory_limit_gb)]
                    if module is not None:
                        command += ["--worker-module", str(module)]
                    try:
                        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                        lines = done.stdout.strip().splitlines()
                        row = json.loads(lines[-1]) if done.returncode == 0 and lines else {
                            "kind": kind, "atoms": num_atoms,
                            "error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
                    except subprocess.TimeoutExpired:
                        row = {"kind": kind, "atoms": num_atoms, "error": f"over {args.timeout:g} s"}
                    row["version"] = version
                    if "peak_rss_mb" in row:
                        row["rss_mb_per_atom"] = row["peak_rss_mb"] / num_atoms
                    rows.append(row)
                    print(_large_line(row), flush=True)
    print(f"\n{'kind':9s} {'version':16s} {'atoms':>6s} {'seconds':>8s} {'peak MB':>8s} {'MB/atom':>8s} "
          f"{'traced MB':>10s} {'check s':>9s} {'check MB':>11s} {'edges':>7s}")
    print("(seconds, peak RSS, RSS per atom and traced peak of the Voronoi part; seconds and traced peak of the "
          "input checks, _validate)")
    for row in rows:
        print(_large_line(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = args.out if args.out != RESULTS else LARGE_RESULTS
    out.write_text(json.dumps({
        "command": " ".join(sys.argv), "baseline": revision, "neighbors_version": neighbors.NEIGHBORS_VERSION,
        "memory_limit_gb": args.memory_limit_gb, "cpu_count": os.cpu_count(), "loadavg": os.getloadavg(),
        "peak_rss_mb": "Voronoi part (_exact_molecule/_exact_crystal + _select): ru_maxrss of the subprocess minus "
                       "its RSS after import and building the structure; _with_validate: after _validate too",
        "tracemalloc_mb": "peak of traced (NumPy and Python) allocations, in a second run of each part",
        "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


def _large_line(row: dict) -> str:
    def number(key: str, width: int, digits: int) -> str:
        return f"{row[key]:{width}.{digits}f}" if key in row else f"{'-':>{width}s}"

    line = (f"{row['kind']:9s} {row['version']:16s} {row['atoms']:6d} {number('voronoi_seconds', 8, 2)} "
            f"{number('peak_rss_mb', 8, 1)} {number('rss_mb_per_atom', 8, 4)} {number('tracemalloc_voronoi_mb', 10, 1)} "
            f"{number('validate_seconds', 9, 2)} {number('tracemalloc_validate_mb', 11, 1)} "
            f"{row.get('edges', '-'):>7}")
    errors = [f"{k}: {v}" for k, v in row.items() if k.endswith("error")]
    return line + ("  " + "; ".join(errors) if errors else "")

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
    parser.add_argument("--baseline", help="git revision to time side by side with this checkout (docstring)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over the sample with --baseline")
    parser.add_argument("--chunks", type=int, default=20, help="interleaved chunks per round with --baseline")
    parser.add_argument("--compare-num", type=int, default=300, help="molecules whose outputs --baseline compares")
    parser.add_argument("--large", action="store_true", help="peak memory on large structures (docstring)")
    parser.add_argument("--sizes", default="100,1000,3000,10000", help="atoms per structure with --large")
    parser.add_argument("--kinds", default="molecule,crystal", help="structures with --large")
    parser.add_argument("--memory-limit-gb", type=float, default=6.0, help="address-space cap per --large run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per --large run")
    parser.add_argument("--large-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--time-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-module", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_worker is not None:
        _time_worker(args.time_worker, args.worker_module)
        return
    if args.large_worker is not None:
        _large_worker(args.large_worker[0], int(args.large_worker[1]), args.worker_module, args.memory_limit_gb)
        return
    if args.large:
        run_large(args)
        return

    t0 = time.perf_counter()
    molecules = read_qm9(None if args.all else args.num, args.seed)
    read_s = time.perf_counter() - t0
    if args.baseline:
        run_baseline(args, molecules)
        return
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
