"""What one call costs a user: a pre-built model from a cold process start.

    python experiments/bench_cold_start.py --model=scannplus-qm9-homo [--repeats=3]

Writes a sample of QM9 molecules (``--num-molecules``, seed ``--seed``) to an extended XYZ file,
then starts fresh Python processes, each of which times from its own start: importing
``scannet_jax.predict``, loading ``Predictor.pretrained(model)``, predicting 1 molecule (its first
call compiles), then the whole sample in one call (featurisation in worker processes and the
batch buckets' compilations included), then the sample again (warm). ``--repeats`` fresh processes
are timed; the medians, min–max and load averages go to ``experiments/results/bench_cold_start.json``.
A crystal model (``scannplus-mp-*``) is given rock-salt and perovskite crystals instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "experiments" / "results" / "bench_cold_start.json"

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import ase.io
from scannet_jax import predict
t_import = time.perf_counter()
structures = ase.io.read(sys.argv[2], index=":")
t_read = time.perf_counter()
predictor = predict.Predictor.pretrained(sys.argv[1])
t_load = time.perf_counter()
predictor(structures[0])
t_one = time.perf_counter()
predictor(structures)
t_all = time.perf_counter()
predictor(structures)
t_warm = time.perf_counter()
predictor.close()
print(json.dumps({"import_s": t_import - start, "read_s": t_read - t_import, "load_s": t_load - t_read,
                  "first_structure_s": t_one - t_load, "all_first_s": t_all - t_one, "all_warm_s": t_warm - t_all,
                  "compiles": predictor.num_compiles, "n": len(structures)}))
"""


def sample_structures(model: str, n: int, seed: int) -> list:
    from ase import Atoms
    from ase.build import bulk

    if "-mp-" in model:
        rng = np.random.default_rng(seed)
        pairs = [("NaCl", 5.64), ("MgO", 4.21), ("KCl", 6.29), ("LiF", 4.03), ("CaO", 4.81), ("NaF", 4.63)]
        return [bulk(f, "rocksalt", a=a * (1 + 0.02 * rng.standard_normal())) for f, a in
                (pairs[k % len(pairs)] for k in range(n))]
    from scannet_jax.datasets import qm9

    molecules = qm9.read_qm9()
    picks = np.random.default_rng(seed).choice(len(molecules), n, replace=False)
    return [Atoms(molecules.structure(int(s)).numbers, molecules.structure(int(s)).positions) for s in picks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a pre-built model's name")
    parser.add_argument("--num-molecules", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes timed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import ase.io

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample.extxyz"
        ase.io.write(path, sample_structures(args.model, args.num_molecules, args.seed), format="extxyz")
        runs = []
        for k in range(args.repeats):
            load = os.getloadavg()[0]
            t = time.perf_counter()
            child = subprocess.run([sys.executable, "-c", CHILD, args.model, str(path)], capture_output=True,
                                   text=True, check=True, cwd=tmp)
            total = time.perf_counter() - t
            run = json.loads(child.stdout.strip().splitlines()[-1])
            runs.append({**run, "process_s": total, "loadavg_1min": load})
            print(f"run {k}: " + ", ".join(f"{key} {value:.2f}" for key, value in runs[-1].items()
                                          if isinstance(value, float)), flush=True)
    stages = [key for key in runs[0] if key.endswith("_s")]
    summary = {key: {"median": float(np.median([r[key] for r in runs])), "min": min(r[key] for r in runs),
                     "max": max(r[key] for r in runs)} for key in stages}
    n = runs[0]["n"]
    median = {key: value["median"] for key, value in summary.items()}
    result = {
        "command": "python experiments/bench_cold_start.py " + " ".join(sys.argv[1:]),
        "model": args.model, "structures": n, "cpu_count": os.cpu_count(), "repeats": args.repeats,
        "stages_s": summary, "runs": runs,
        "one_structure_from_cold_s": median["import_s"] + median["load_s"] + median["first_structure_s"],
        "structures_per_s_first_call": n / median["all_first_s"],
        "structures_per_s_warm": n / median["all_warm_s"],
    }
    print(f"{args.model}: import {median['import_s']:.1f} s, load {median['load_s']:.1f} s, first structure "
          f"{median['first_structure_s']:.1f} s; {n} structures: first call {median['all_first_s']:.1f} s "
          f"({result['structures_per_s_first_call']:.0f}/s), warm {median['all_warm_s']:.1f} s "
          f"({result['structures_per_s_warm']:.0f}/s); whole process {median['process_s']:.1f} s")
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    entries = [r for r in previous.get("runs", []) if r["model"] != args.model] + [result]
    OUT.write_text(json.dumps({"runs": entries}, indent=1) + "\n")


if __name__ == "__main__":
    main()
