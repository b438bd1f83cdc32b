"""Training and evaluation throughput at the QM9 config (batch 128) on this machine.

    python experiments/bench_train.py --steps=40

For SCANN+ and SCANN: compile time of the train step (per bucket), train and eval molecules/s,
the step's FLOPs and bytes from XLA's cost model with the achieved FLOP/s and bytes/s as
fractions of this machine's measured matmul and streaming peaks (`cost_analysis.py`),
over timed steps (eval: timed batches already on device) with batches prepared ahead (background prefetch), compile counts, padding
efficiency of the training buckets over a whole epoch, and the process's peak resident memory.
Writes a table to stdout and JSON to experiments/results/bench_train.json.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "homo", "QM9 target.")
flags.DEFINE_list("variants", ["scannplus", "scann"], "Models to time.")
flags.DEFINE_integer("limit", 0, "QM9 molecules loaded (0 = all 130,831 with the reference split).")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("num_buckets", 4, "Bucket shapes per split.")
flags.DEFINE_integer("steps", 40, "Timed training steps (after every bucket has compiled).")
flags.DEFINE_integer("eval_batches", 20, "Timed evaluation batches.")
flags.DEFINE_string("out", str(REPO / "experiments" / "results" / "bench_train.json"), "JSON output.")

def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads), s."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_variant(variant: str) -> dict:
    import jax

    from scannet_jax.configs import qm9
    from scannet_jax import batching, parallel, train
    from scannet_jax.steps import set_learning_rate

    config = qm9.get_config(f"{FLAGS.target},limit={FLAGS.limit}" + (",scann" if variant == "scann" else ""))
    config.batch_size = config.eval_batch_size = FLAGS.batch_size
    config.num_buckets = FLAGS.num_buckets
    trainer = train.setup(config)
    mesh, plan, steps = trainer.mesh, trainer.train_plan, trainer.steps
    eval_plan = trainer.eval_plans["validation"]
    state = set_learning_rate(trainer.state, config.optimizer.lr, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))

    # Compile every bucket first: one representative batch per bucket, timed apart.
    order = plan.order(config.seed, 0)
    batches_by_bucket = {}
    for b in range(plan.num_batches()):
        idx = order[b * plan.batch_size:(b + 1) * plan.batch_size]
        batches_by_bucket.setdefault(plan.bucket_for(plan.chunks(idx)), idx)
    compile_s = {}
    for bucket, idx in sorted(batches_by_bucket.items()):
        batch = parallel.shard_batch(plan.batch(idx), mesh)
        t0 = time.perf_counter()
        state, metrics = steps.train(state, batch)
        jax.block_until_ready(metrics)
        compile_s[str(tuple(bucket))] = time.perf_counter() - t0

    # XLA's cost model of the step on the bucket most batches use (FLOPs, bytes accessed).
    from cost_analysis import fraction_of_peak, measure_peaks, step_cost

    counts = {}
    for b in range(plan.num_batches()):
        bucket = plan.bucket_for(plan.chunks(order[b * plan.batch_size:(b + 1) * plan.batch_size]))
        counts[bucket] = counts.get(bucket, 0) + 1
    common = max(counts, key=counts.get)
    cost = step_cost(steps.train, state, parallel.shard_batch(plan.batch(batches_by_bucket[common]), mesh))

    # Timed training: batches 1..n of epoch 1 in order, prepared ahead by the prefetch thread;
    # no host synchronisation inside the loop (as in train_and_evaluate between log intervals).
    n = min(FLAGS.steps, plan.num_batches() - 2)
    epoch_order = plan.order(config.seed, 1)
    molecules = sum(len(epoch_order[b * plan.batch_size:(b + 1) * plan.batch_size]) for b in range(1, n + 1))
    batches = batching.device_batches(plan, mesh, config.seed, 1, 0, config.prefetch)
    state, metrics = steps.train(state, next(batches))
    jax.block_until_ready(metrics)
    time.sleep(1.0)  # let the prefetch queue fill
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for _, batch in zip(range(n), batches):
        state, metrics = steps.train(state, batch)
    jax.block_until_ready((state, metrics))
    train_s, train_cpu_s = time.perf_counter() - t0, _cpu_seconds() - cpu0

    # Timed evaluation (compiled first on every bucket the validation batches use).
    eval_batches = list(eval_plan.batches(None, 0))[: FLAGS.eval_batches]
    for batch in eval_batches:
        jax.block_until_ready(steps.eval(state, parallel.shard_batch(batch, mesh)))
    device_batches = [parallel.shard_batch(batch, mesh) for batch in eval_batches]
    t0 = time.perf_counter()
    sums = [steps.eval(state, batch) for batch in device_batches]
    jax.block_until_ready(sums)
    eval_s = time.perf_counter() - t0
    eval_molecules = sum(float(m["count"]) for m in sums)

    train_rate = molecules / train_s
    achieved = fraction_of_peak(cost, train_s / n, measure_peaks())
    return {
        "step_cost_common_bucket": {"bucket": list(common), **cost},
        "achieved_vs_measured_peak": achieved,
        "variant": variant,
        "num_params": int(num_params),
        "structures": {"train": len(plan), "validation": len(eval_plan)},
        "train_molecules_per_s": train_rate,
        "train_ms_per_step_mean": 1e3 * train_s / n,
        "train_cpu_s_per_step": train_cpu_s / n,
        "train_molecules_per_cpu_s": molecules / train_cpu_s,
        "timed_train_steps": n,
        "eval_molecules_per_s": eval_molecules / eval_s,
        "timed_eval_batches": len(eval_batches),
        "compile_s_per_train_bucket": compile_s,
        "compile_counts": steps.compile_counts(),
        "buckets": [list(b) for b in plan.buckets],
        "padding_efficiency_epoch": plan.padding_efficiency(config.seed, 0),
    }


def main(argv):
    del argv
    import jax

    load_before = os.getloadavg()
    rows = [bench_variant(v) for v in FLAGS.variants]
    result = {
        "device": f"{jax.devices()[0].platform} x{jax.device_count()} ({jax.devices()[0].device_kind})",
        "cpu_count": os.cpu_count(),
        "batch_size": FLAGS.batch_size,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "jax_version": jax.__version__,
        "command": " ".join(sys.argv),
        "results": rows,
    }
    print(f"device {result['device']}, batch {FLAGS.batch_size}, load {load_before[0]:.1f} -> "
          f"{result['loadavg_after'][0]:.1f}, peak RSS {result['peak_rss_mib']:.0f} MiB")
    print(f"{'variant':10} {'params':>8} {'train mol/s':>12} {'mol/CPU-s':>10} {'ms/step':>8} {'eval mol/s':>11} "
          f"{'compile s':>24} {'pad eff n/e':>12} {'GFLOP/s':>8} {'of peak':>8} {'GB/s':>6} {'of peak':>8}")
    for r in rows:
        a = r["achieved_vs_measured_peak"]
        compiles = ", ".join(f"{v:.1f}" for v in r["compile_s_per_train_bucket"].values())
        pad = r["padding_efficiency_epoch"]
        print(f"{r['variant']:10} {r['num_params']:8d} {r['train_molecules_per_s']:12.1f} "
              f"{r['train_molecules_per_cpu_s']:10.1f} "
              f"{r['train_ms_per_step_mean']:8.1f} "
              f"{r['eval_molecules_per_s']:11.1f} {compiles:>24} {pad['nodes']:.2f}/{pad['edges']:.2f} "
              f"{a['flops_per_s'] / 1e9:8.1f} {a['flops_fraction']:8.1%} {a['bytes_per_s'] / 1e9:6.1f} "
              f"{a['bytes_fraction']:8.1%}")
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
