"""Time and memory of one large crystal cell: exact-mode neighbours and one prediction.

The cell is a supercell of cubic SrTiO3 (a = 3.905 Å; 5 atoms per cell, 5x4x3 = 300 atoms by
default) with seeded Gaussian displacements, so that no symmetry makes the Voronoi cells cheap.
Timed, after one untimed warm-up call each:

* ``neighbors.voronoi_neighbors(mode="exact")`` (input checks included), ``--repeats`` times;
* ``predict.Predictor`` on the cell with a small randomly initialised SCANN+ (the training
  path: featurise, pad, apply): the first call (featurisation + compilation) and the next ones
  (featurisation + the compiled model).

Memory: peak resident set size of the process (``resource.getrusage``, ru_maxrss) after the
imports, after the neighbours and after the predictions, and the peak of Python-tracked
allocations (``tracemalloc``, NumPy arrays included) during one neighbour call. Wall and CPU
seconds are both given: the machine may be shared (its load average is recorded)::

    nice -n 10 python experiments/bench_large_cell.py
    nice -n 10 python experiments/bench_large_cell.py --repeat 6,6,4   # 720 atoms

Prints a table; writes experiments/results/bench_large_cell.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_large_cell.json"
REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> tuple[list[float], list[float], object]:
    """Wall and CPU seconds of ``repeats`` calls of ``fn`` (its last result too)."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus, result


def stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "min": float(np.min(values)),
            "n": len(values)}


def perovskite_supercell(repeat: tuple[int, int, int], displacement: float, seed: int):
    """Cubic SrTiO3 repeated ``repeat`` times, every atom displaced by N(0, displacement²) Å per axis."""
    from ase import Atoms

    a = 3.905
    cell = Atoms("SrTiO3", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5],
                                             [0, 0.5, 0.5]], cell=[a, a, a], pbc=True)
    atoms = cell.repeat(repeat)
    atoms.positions += np.random.default_rng(seed).normal(0.0, displacement, atoms.positions.shape)
    return atoms


def small_predictor(atoms, settings):
    """A small random SCANN+ whose training domain is the cell's elements (40-atom structures)."""
    import jax

    from scannet_jax import batching, models, predict, structures
    from scannet_jax.datasets import featurize
    from scannet_jax.graphs import Domain, GraphStore

    config = models.default_model_config()
    config.update(n_attention=1, embedding_dim=8, local_dim=16, num_head=2, global_dim=16, dense_out=16)
    unit = atoms[:5]
    store = GraphStore.from_structures([unit.numbers], [featurize.featurize_one(structures.from_atoms(unit),
                                                                                settings, False)])
    graphs = batching.pad_batch(store, [0], batching.Bucket(64, 384, 2), None)
    params = models.build_model(config).init(jax.random.PRNGKey(0), graphs)["params"]
    domain = Domain(frozenset(int(z) for z in set(atoms.numbers)), True, 40)
    return predict.Predictor(config, params, settings=settings, target="e_form", units="eV/atom", domain=domain,
                             batch_size=1, num_workers=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", default="5,4,3", help="supercell repeats of the 5-atom cell, a,b,c")
    parser.add_argument("--displacement", type=float, default=0.05, help="σ of the random displacements, Å")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each kind")
    parser.add_argument("--cutoff", type=float, default=6.0, help="d_t, Å (MP2018 recipe: 6)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    import jax

    from scannet_jax import neighbors
    from scannet_jax.neighbors import FeaturizerSettings

    rss_imports = peak_rss_mib()
    repeat = tuple(int(x) for x in args.repeat.split(","))
    atoms = perovskite_supercell(repeat, args.displacement, args.seed)
    settings = FeaturizerSettings(mode="exact", cutoff=args.cutoff)
    call = lambda: neighbors.voronoi_neighbors(atoms, cutoff=settings.cutoff,  # noqa: E731
                                               min_solid_angle=settings.min_solid_angle,
                                               min_relative_weight=settings.min_relative_weight)
    call()  # warm-up
    tracemalloc.start()
    call()
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    nb_wall, nb_cpu, nb = timed(call, args.repeats)
    rss_neighbors = peak_rss_mib()

    predictor = small_predictor(atoms, settings)
    first_wall, first_cpu, first = timed(lambda: predictor(atoms), 1)
    compiles = predictor.num_compiles
    pred_wall, pred_cpu, result = timed(lambda: predictor(atoms), args.repeats)
    assert predictor.num_compiles == compiles and result.value == first.value
    rss_predict = peak_rss_mib()
    predictor.close()

    rows = [("neighbours (exact)", nb_wall, nb_cpu), ("predict, first call", first_wall, first_cpu),
            ("predict, later calls", pred_wall, pred_cpu)]
    print(f"{len(atoms)} atoms ({atoms.get_chemical_formula()}, {'x'.join(map(str, repeat))} SrTiO3, "
          f"σ = {args.displacement} Å), {len(nb.receivers)} edges, cutoff {args.cutoff} Å, "
          f"device {jax.devices()[0].platform}")
    print(f"{'step':<22} {'wall s':>16} {'CPU s':>16}")
    for name, wall, cpu in rows:
        print(f"{name:<22} {np.mean(wall):>8.3f} ± {np.std(wall):<5.3f} {np.mean(cpu):>8.3f} ± {np.std(cpu):<5.3f}")
    print(f"peak RSS: {rss_imports:.0f} MiB after imports, {rss_neighbors:.0f} MiB after neighbours, "
          f"{rss_predict:.0f} MiB after predictions; neighbour call's traced peak {traced_peak:.0f} MiB")
    print(f"prediction {result.value:.6g} eV/atom, GA scores sum {result.ga_scores.sum():.6f}, "
          f"warnings: {'; '.join(result.warnings) or 'none'}")

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "scannet_jax"], capture_output=True, text=True,
                           cwd=REPO).stdout.split("\n")
    out = {
        "command": " ".join(["python", *sys.argv]),
        "git_head": head,
        "scannet_jax_files_modified_since_head": sorted(line[3:] for line in dirty if line.strip()),
        "neighbors_py_sha256": hashlib.sha256(Path(neighbors.__file__).read_bytes()).hexdigest(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(jax.devices()[0]),
                    "load_average_1_5_15": os.getloadavg()},
        "structure": {"formula": atoms.get_chemical_formula(), "atoms": len(atoms), "repeat": repeat,
                      "displacement_sigma_A": args.displacement, "seed": args.seed,
                      "cell_A": atoms.cell.lengths().tolist()},
        "settings": {"cutoff": settings.cutoff, "min_solid_angle": settings.min_solid_angle,
                     "min_relative_weight": settings.min_relative_weight},
        "edges": int(len(nb.receivers)), "edges_per_atom": len(nb.receivers) / len(atoms),
        "neighbors_wall_s": stats(nb_wall), "neighbors_cpu_s": stats(nb_cpu),
        "predict_first_call_wall_s": first_wall[0], "predict_first_call_cpu_s": first_cpu[0],
        "predict_wall_s": stats(pred_wall), "predict_cpu_s": stats(pred_cpu),
        "peak_rss_mib": {"after_imports": rss_imports, "after_neighbors": rss_neighbors,
                         "after_predictions": rss_predict},
        "neighbors_traced_peak_mib": traced_peak,
        "prediction": {"value": result.value, "ga_sum": float(result.ga_scores.sum()),
                       "warnings": list(result.warnings)},
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
