"""Training on QM9 replicated on disk to 1x, 10x and 40x its size: peak memory and molecules/s.

    python experiments/bench_scale.py --copies=1,10,40 --steps=30

The featurised QM9 store (the feature cache, built on first use) is written ``k`` times into one
store on disk (`graphs.StoreWriter`, part by part, never whole in memory), the reference split
replicated with it. For each ``k`` a fresh process opens the store (memory-mapped), builds the
trainer (`train.setup`: buckets from the full size scan, the model, the state) and times
``--steps`` SCANN+ training steps at batch 128 after one compiling step. It reports the peak
resident set (``VmHWM``) split into anonymous memory (what the process allocated: must not grow
with the data set) and file-backed pages of the mapping (page cache the kernel can drop), plus
molecules/s. Writes experiments/results/bench_scale.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLAGS = flags.FLAGS
flags.DEFINE_list("copies", ["1", "10", "40"], "Replication factors.")
flags.DEFINE_integer("steps", 30, "Timed training steps per factor.")
flags.DEFINE_integer("limit", 0, "QM9 molecules replicated (0 = all 130,831).")
flags.DEFINE_bool("small_model", False, "The tiny config's model sizes (quick compiles; memory is about data).")
flags.DEFINE_string("scratch", "/tmp/scannet_jax_scale", "Where the replicated stores are written.")
flags.DEFINE_bool("keep", False, "Keep the replicated stores.")
flags.DEFINE_string("out", str(REPO / "experiments" / "results" / "bench_scale.json"), "JSON output.")
# internal: run one factor in this process
flags.DEFINE_string("run_store", "", "Store to time (internal: child process).")
flags.DEFINE_string("run_splits", "", "Its splits (internal: child process).")


def _memory() -> dict[str, float]:
    """Peak and current resident memory of this process from /proc, MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def replicate(copies: int, limit: int) -> tuple[Path, Path, dict]:
    """Writes QM9 ``copies`` times into one store; returns (store dir, splits file, sizes)."""
    import numpy as np

    from scannet_jax.configs import qm9
    from scannet_jax import train
    from scannet_jax.graphs import StoreWriter

    config = qm9.get_config(f"homo,limit={limit}")
    data = train.get_datasets(config)
    base, n = data.store, len(data.store)
    path = Path(FLAGS.scratch) / f"qm9x{copies}"
    start = time.perf_counter()
    with StoreWriter(path, base, num_structures=copies * n, num_atoms=copies * int(base.node_ptr[-1]),
                     num_edges=copies * int(base.edge_ptr[-1])) as writer:
        for k in range(copies):
            writer.append(base, index=base.index + k * n)
        writer.close({"copies": copies})
    splits = {name: np.concatenate([data.indices(name) + k * n for k in range(copies)]).tolist()
              for name in train.SPLITS}
    splits_file = path.with_suffix(".splits.json")
    splits_file.write_text(json.dumps(splits))
    size = sum(f.stat().st_size for f in path.iterdir())
    return path, splits_file, {"structures": copies * n, "bytes_on_disk": size,
                               "write_s": time.perf_counter() - start}


def time_training(store_dir: str, splits_file: str) -> dict:
    """Child process: open the store, set up training, time the steps."""
    import jax
    import numpy as np

    from scannet_jax.configs import qm9
    from scannet_jax import batching, parallel, train
    from scannet_jax.steps import set_learning_rate
    from scannet_jax.datasets.splits import make_datasets
    from scannet_jax.graphs import GraphStore

    t0 = time.perf_counter()
    store = GraphStore.load(store_dir)
    splits = {k: np.asarray(v, np.int64) for k, v in json.loads(Path(splits_file).read_text()).items()}
    data = make_datasets(store, splits, "homo")
    config = qm9.get_config("homo,tiny" if FLAGS.small_model else "homo")
    config.batch_size = config.eval_batch_size = 128
    config.num_buckets = 4
    trainer = train.setup(config, data)
    setup_s = time.perf_counter() - t0
    state = set_learning_rate(trainer.state, config.optimizer.lr, trainer.mesh)
    plan, mesh = trainer.train_plan, trainer.mesh
    order = plan.order(config.seed, 0)
    first_of_bucket = {}  # compile every bucket before timing
    for b in range(plan.num_batches()):
        idx = order[b * plan.batch_size:(b + 1) * plan.batch_size]
        first_of_bucket.setdefault(plan.bucket_for(plan.chunks(idx)), idx)
    compile_start = time.perf_counter()
    for idx in first_of_bucket.values():
        state, metrics = trainer.steps.train(state, parallel.shard_batch(plan.batch(idx), mesh))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - compile_start
    memory_after_compile = _memory()
    batches = batching.device_batches(plan, mesh, config.seed, 1, 0, config.prefetch)
    molecules, start = 0.0, time.perf_counter()
    for _, batch in zip(range(FLAGS.steps), batches):
        state, metrics = trainer.steps.train(state, batch)
        molecules += float(metrics["count"])  # synchronises: the count is what was trained on
    seconds = time.perf_counter() - start
    return {"setup_s": setup_s, "compile_s": compile_s, "molecules_per_s": molecules / seconds, "timed_steps": FLAGS.steps,
            "memory_after_compile_mib": memory_after_compile, "memory_end_mib": _memory(),
            "compile_counts": trainer.steps.compile_counts()}


def main(argv):
    del argv
    if FLAGS.run_store:
        print(json.dumps(time_training(FLAGS.run_store, FLAGS.run_splits)))
        return
    rows = []
    for copies in map(int, FLAGS.copies):
        path, splits_file, sizes = replicate(copies, FLAGS.limit)
        child = subprocess.run([sys.executable, __file__, f"--run_store={path}", f"--run_splits={splits_file}",
                                f"--steps={FLAGS.steps}", f"--small_model={FLAGS.small_model}"],
                               capture_output=True, text=True, check=True)
        row = {"copies": copies, **sizes, **json.loads(child.stdout.strip().splitlines()[-1])}
        rows.append(row)
        end = row["memory_end_mib"]
        print(f"x{copies:<3} {row['structures']:>9} structures {row['bytes_on_disk'] / 2**30:6.2f} GiB  "
              f"{row['molecules_per_s']:7.1f} mol/s  peak RSS {end['VmHWM']:7.0f} MiB "
              f"(now: anon {end['RssAnon']:6.0f}, file {end['RssFile']:6.0f})  setup {row['setup_s']:.1f} s",
              flush=True)
        if not FLAGS.keep:
            shutil.rmtree(path)
            splits_file.unlink()
    result = {"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "loadavg_end": os.getloadavg(),
              "limit": FLAGS.limit, "small_model": FLAGS.small_model, "results": rows}
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
