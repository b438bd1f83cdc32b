"""Prediction throughput on real QM9 molecules, featurisation included.

Measures ``Predictor`` (scannet_jax/predict.py) on a random sample of QM9 molecules as
``ase.Atoms``: single-structure calls (one call per molecule) and one call on the whole list
(batched, featurised in worker processes). The first call of each kind is timed apart (it
compiles); the batched call is also split into featurisation and model time.

Usage::

    python experiments/bench_predict.py                       # full-size QM9 model, random params
    python experiments/bench_predict.py --model=tiny
    python experiments/bench_predict.py --workdir=runs/qm9_homo
    python experiments/bench_predict.py --pretrained=scannplus-qm9-homo

What one call costs from a cold process start (import, load, compile) is
``experiments/bench_cold_start.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
from ase import Atoms

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scannet_jax import batching, models, predict  # noqa: E402
from scannet_jax.datasets import qm9  # noqa: E402
from scannet_jax.graphs import GraphStore  # noqa: E402
from scannet_jax.neighbors import FeaturizerSettings  # noqa: E402
from scannet_jax.structures import molecule  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--workdir", help="a trained workdir (default: random params, see --model)")
    source.add_argument("--pretrained", help="a pre-built model's name (scannet_jax.pretrained)")
    parser.add_argument("--model", choices=("full", "tiny"), default="full",
                        help="without --workdir: the QM9 model config (full) or configs/qm9.py:tiny sizes")
    parser.add_argument("--num-molecules", type=int, default=1000, help="molecules in the batched call")
    parser.add_argument("--num-single", type=int, default=200, help="single-structure calls timed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=None, help="featurisation processes (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed batched calls after the first")
    parser.add_argument("--seed", type=int, default=0, help="molecule sample")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_predict.json"))
    return parser.parse_args()


def random_predictor(model: str, batch_size: int, num_workers: int | None) -> predict.Predictor:
    from scannet_jax.configs import qm9 as qm9_config

    config = qm9_config.get_config("homo,tiny" if model == "tiny" else "homo").model
    example = Atoms("CH4", [[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63],
                            [0.63, -0.63, -0.63]])
    from scannet_jax.datasets import featurize

    features = featurize.featurize_one(molecule(example.numbers, example.positions),
                                       FeaturizerSettings(), False)
    graphs = batching.pad_batch(GraphStore.from_structures([example.numbers], [features]), [0],
                                batching.Bucket(64, 384, 2), None)
    params = models.build_model(config).init(jax.random.PRNGKey(0), graphs)["params"]
    return predict.Predictor(config, params, settings=FeaturizerSettings(), target="homo", units="eV",
                             domain=qm9.DOMAIN, batch_size=batch_size, num_workers=num_workers)


def main() -> None:
    args = parse_args()
    load_before = os.getloadavg()
    molecules = qm9.read_qm9()
    sample = np.random.default_rng(args.seed).choice(len(molecules), args.num_molecules, replace=False)
    atoms = [Atoms(molecules.structure(int(s)).numbers, molecules.structure(int(s)).positions) for s in sample]
    if args.workdir:
        predictor = predict.Predictor.from_workdir(args.workdir, batch_size=args.batch_size,
                                                   num_workers=args.num_workers)
        model_name = f"workdir {args.workdir}"
    elif args.pretrained:
        predictor = predict.Predictor.pretrained(args.pretrained, batch_size=args.batch_size,
                                                 num_workers=args.num_workers)
        model_name = f"pre-built model {args.pretrained}"
    else:
        predictor = random_predictor(args.model, args.batch_size, args.num_workers)
        model_name = f"{args.model} QM9 model, random params"

    # Single-structure calls: the first compiles the one single-structure bucket.
    t = time.perf_counter()
    predictor(atoms[0])
    single_first_s = time.perf_counter() - t
    times = []
    for a in atoms[1:args.num_single + 1]:
        t = time.perf_counter()
        predictor(a)
        times.append(time.perf_counter() - t)
    single_ms = 1e3 * np.array(times)

    # Batched calls on the whole list: the first compiles its buckets.
    compiles_before = predictor.num_compiles
    t = time.perf_counter()
    predictor(atoms)
    batch_first_s = time.perf_counter() - t
    batch_compiles = predictor.num_compiles - compiles_before
    batch_s, featurize_s, model_s = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        predictor(atoms)
        batch_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        features = predictor._featurize(atoms)
        featurize_s.append(time.perf_counter() - t)
        store = GraphStore.from_structures([a.numbers for a in atoms], features)
        t = time.perf_counter()
        predictor.predict_store(store)
        model_s.append(time.perf_counter() - t)
    predictor.close()
    load_after = os.getloadavg()

    n = args.num_molecules
    result = {
        "command": "python experiments/bench_predict.py " + " ".join(sys.argv[1:]),
        "device": str(jax.devices()[0]), "platform": platform.machine(), "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__, "model": model_name,
        "model_sizes": {k: getattr(predictor.model_config, k) for k in
                        ("n_attention", "local_dim", "num_head", "embedding_dim", "global_dim", "dense_out")},
        "data": f"{n} QM9 molecules sampled with seed {args.seed} (mean {np.mean([len(a) for a in atoms]):.1f} atoms)",
        "batch_size": args.batch_size, "num_workers": predictor.num_workers,
        "single": {"calls": len(times), "first_call_s": single_first_s, "ms_mean": float(single_ms.mean()),
                   "ms_std": float(single_ms.std()), "structures_per_s": float(1e3 / single_ms.mean())},
        "batched": {"structures": n, "first_call_s": batch_first_s, "compiles_in_first_call": batch_compiles,
                    "repeats": args.repeats, "s_mean": float(np.mean(batch_s)), "s_std": float(np.std(batch_s)),
                    "structures_per_s": float(n / np.mean(batch_s)),
                    "featurize_structures_per_s": float(n / np.mean(featurize_s)),
                    "model_structures_per_s": float(n / np.mean(model_s))},
        "total_compiles": predictor.num_compiles,
        "loadavg_before": load_before, "loadavg_after": load_after,
    }
    print(f"device {result['device']}, {model_name}, loadavg {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'mode':<10}{'structures':>11}{'struct/s':>10}{'ms/call':>18}{'first call s':>14}{'compiles':>10}")
    print(f"{'single':<10}{len(times):>11}{result['single']['structures_per_s']:>10.1f}"
          f"{single_ms.mean():>10.2f} ± {single_ms.std():<5.2f}{single_first_s:>14.2f}{1:>10}")
    b = result["batched"]
    print(f"{'batched':<10}{n:>11}{b['structures_per_s']:>10.1f}{1e3 * b['s_mean']:>10.0f} ± {1e3 * b['s_std']:<5.0f}"
          f"{batch_first_s:>14.2f}{batch_compiles:>10}")
    print(f"batched split: featurisation {b['featurize_structures_per_s']:.0f} structures/s, "
          f"model {b['model_structures_per_s']:.0f} structures/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    runs = [r for r in previous.get("runs", []) if r["command"] != result["command"]] + [result]
    Path(args.out).write_text(json.dumps({"runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
