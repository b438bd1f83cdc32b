"""Train and forward steps of every network with and without XLA CPU's YNNPACK fusions, side by side.

    python experiments/bench_compiler_options.py [--networks=scannplus,scann,megnet,lstm,alignn] [--steps=6]

jaxlib 0.10's CPU backend hands dots and their fused neighbours to YNNPACK by default;
`steps.compiler_options` turns that off per network and step (`models.ModelSpec.train_with_ynn`,
``forward_with_ynn``).
This measures what that choice rests on: per network, its recipe's model on one training batch of
the MP band-gap set (``configs/mp.py:gap[,network]``, the recipe's batch size, one bucket), the
train step and the predict step compiled both ways (`steps.make_steps(..., ynn=True|False)`) in
one process, then ``--rounds`` interleaved rounds of ``--steps`` calls of each (the order of the
two settings alternating), medians of wall and CPU ms per call. The numbers of both settings are
compared too (largest difference of the predictions, eV). Writes
experiments/results/bench_compiler_options.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timed(call, steps: int) -> tuple[float, float]:
    import jax

    jax.block_until_ready(call())
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = call()
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - t) / steps, 1e3 * (time.process_time() - c) / steps


def bench_network(network: str, steps: int, rounds: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from scannet_jax import parallel, train
    from scannet_jax.configs import mp
    from scannet_jax.steps import make_steps, set_learning_rate

    config = mp.get_config("gap" + ("" if network == "scannplus" else "," + network))
    config.num_buckets = 1
    trainer = train.setup(config)
    batch = parallel.shard_batch(next(iter(trainer.train_plan.batches(0, 0))), trainer.mesh)
    built = {ynn: make_steps(trainer.mesh, config.model, config.loss, config.optimizer.l2, ynn=ynn)
             for ynn in (True, False)}
    # one state per setting: the train step donates it
    states = {ynn: set_learning_rate(jax.tree.map(jnp.copy, trainer.state), 1e-5, trainer.mesh) for ynn in built}
    predictions = {ynn: np.asarray(built[ynn].predict(states[ynn], batch)) for ynn in built}

    def call(ynn: bool, step: str):
        if step == "predict":
            return lambda: built[ynn].predict(states[ynn], batch)

        def train_call():
            states[ynn], metrics = built[ynn].train(states[ynn], batch)
            return metrics
        return train_call

    label = {True: "ynn", False: "no_ynn"}
    times: dict[str, list[tuple[float, float]]] = {f"{s}/{label[y]}": [] for s in ("train", "predict") for y in label}
    for r in range(rounds):
        for ynn in ((True, False) if r % 2 == 0 else (False, True)):
            for step in ("train", "predict"):
                times[f"{step}/{label[ynn]}"].append(_timed(call(ynn, step), steps))
    out = {"batch_structures": int(config.batch_size), "padded_edges": int(np.asarray(getattr(batch, "graphs", batch).n_edge).sum()),
           "max_prediction_difference": float(np.max(np.abs(predictions[True] - predictions[False])))}
    for key, values in times.items():
        out[key] = {"wall_ms": statistics.median(v[0] for v in values), "cpu_ms": statistics.median(v[1] for v in values),
                    "wall_ms_runs": [v[0] for v in values]}
    for step in ("train", "predict"):
        out[f"{step}/speedup_without_ynn"] = out[f"{step}/ynn"]["wall_ms"] / out[f"{step}/no_ynn"]["wall_ms"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default="scannplus,scann,megnet,lstm,alignn")
    parser.add_argument("--steps", type=int, default=6, help="timed calls per step, setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_compiler_options.json"))
    args = parser.parse_args(argv)

    import jax

    from scannet_jax import models

    results = {}
    for network in args.networks.split(","):
        load = os.getloadavg()[0]
        spec = models.get_spec(network)
        results[network] = dict(bench_network(network, args.steps, args.rounds), loadavg_before=load,
                                train_with_ynn=spec.train_with_ynn, forward_with_ynn=spec.forward_with_ynn)
        r = results[network]
        print(f"{network:10} train {r['train/ynn']['wall_ms']:8.1f} ms with YNNPACK, {r['train/no_ynn']['wall_ms']:8.1f} "
              f"without ({r['train/speedup_without_ynn']:.2f}x); predict {r['predict/ynn']['wall_ms']:7.1f} / "
              f"{r['predict/no_ynn']['wall_ms']:7.1f} ms ({r['predict/speedup_without_ynn']:.2f}x); "
              f"predictions differ by {r['max_prediction_difference']:.1e}; load {load:.1f}", flush=True)
        Path(args.out).write_text(json.dumps({  # after every network: a cut-short run keeps what it measured
            "command": "python experiments/bench_compiler_options.py " + " ".join(sys.argv[1:]),
            "jax_version": jax.__version__, "cpu_count": os.cpu_count(), "device": str(jax.devices()[0]),
            "steps": args.steps, "rounds": args.rounds, "results": results}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
