"""Benchmark of the QM9 batcher: bucket choice, padding efficiency, shapes per epoch, batches/s.

Featurises QM9 once (or loads the feature cache), chooses buckets for the training split, then
walks whole shuffled training epochs at the given batch size, counting real and padded nodes and
edges and the distinct padded shapes, and times `pad_batch` alone and `BatchPlan.batches` (the
training path) with and without `prefetch`, in batches/s and CPU µs per batch. The first
`--warmup` batches of each timing are not counted. Nothing is compiled here (NumPy only); the
one-time costs reported instead are the cache load and the bucket choice.

  python experiments/bench_batching.py --batch_size=128 --max_buckets=4
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
from absl import app, flags

from scannet_jax import batching
from scannet_jax.datasets import featurize, qm9
from scannet_jax.neighbors import NEIGHBORS_VERSION, FeaturizerSettings

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "structures per batch")
flags.DEFINE_integer("max_buckets", 4, "number of padded shapes")
flags.DEFINE_integer("epochs", 3, "shuffled training epochs walked for the padding statistics")
flags.DEFINE_integer("timed_batches", 600, "batches timed per throughput measurement")
flags.DEFINE_integer("warmup", 20, "batches run before each timing")
flags.DEFINE_integer("seed", 0, "split and shuffle seed")
flags.DEFINE_integer("limit", None, "use only the first N molecules (quick runs)")
flags.DEFINE_integer("num_workers", None, "featurisation processes (default: all cores)")
flags.DEFINE_string("mode", "exact", "neighbour mode")
flags.DEFINE_string("cache_dir", None, "feature cache root (default: featurize.default_cache_dir())")
flags.DEFINE_string("out", str(Path(__file__).parent / "results" / "bench_batching.json"), "JSON output")


def _timed(step, count: int, warmup: int) -> tuple[float, float]:
    """Batches per second (wall clock) and CPU µs per batch (this process, every thread) over
    `count` calls of `step` after `warmup` calls. CPU time is the steadier figure on a loaded
    machine, where the wall clock also measures the other processes' share of the cores."""
    for _ in range(warmup):
        step()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        step()
    return count / (time.perf_counter() - start), (time.process_time() - cpu) / count * 1e6


def _endless(plan: batching.BatchPlan, prefetched: bool):
    def epochs():
        epoch = 0
        while True:
            yield from plan.batches(FLAGS.seed, epoch)
            epoch += 1
    return batching.prefetch(epochs()) if prefetched else epochs()


def main(argv: list[str]) -> None:
    del argv
    settings = FeaturizerSettings(mode=FLAGS.mode)
    name = "qm9" if FLAGS.limit is None else f"qm9-first{FLAGS.limit}"
    keyed = featurize.cache_path(FLAGS.cache_dir, name, settings, ring=False)
    cache_existed = (keyed / "graphs" / "manifest.json").exists()
    start = time.perf_counter()
    store, splits = qm9.load(settings, cache_dir=FLAGS.cache_dir, num_workers=FLAGS.num_workers,
                              limit=FLAGS.limit, seed=FLAGS.seed)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    store, splits = qm9.load(settings, cache_dir=FLAGS.cache_dir, limit=FLAGS.limit, seed=FLAGS.seed)
    cached_load_s = time.perf_counter() - start
    train = splits["train"]

    start = time.perf_counter()
    buckets = batching.choose_buckets(store, train, FLAGS.batch_size, max_buckets=FLAGS.max_buckets)
    choose_s = time.perf_counter() - start

    plan = batching.BatchPlan(store, train, "homo", FLAGS.batch_size, buckets)  # one device
    usage = {b: 0 for b in buckets}
    real_nodes = real_edges = pad_nodes = pad_edges = 0
    shapes_per_epoch = []
    for epoch in range(FLAGS.epochs):
        shapes = set()
        for stacked in plan.batches(FLAGS.seed, epoch):
            graphs = jax.tree.map(lambda x: x[0], stacked)
            bucket = batching.Bucket(int(graphs.n_node.sum()), int(graphs.n_edge.sum()), graphs.n_node.shape[0])
            usage[bucket] += 1
            shapes.add(bucket)
            real = graphs.globals["index"] >= 0
            real_nodes += int(graphs.n_node[real].sum())
            real_edges += int(graphs.n_edge[real].sum())
            pad_nodes += bucket.n_node
            pad_edges += bucket.n_edge
        shapes_per_epoch.append(len(shapes))

    fixed = batching.epoch_order(train, seed=FLAGS.seed, epoch=0)[: FLAGS.batch_size]
    bucket0 = batching.select_bucket(int(store.n_node[fixed].sum()), int(store.n_edge[fixed].sum()),
                                     len(fixed), buckets)
    timings = {"pad_batch": _timed(lambda: batching.pad_batch(store, fixed, bucket0, "homo"), FLAGS.timed_batches,
                                   FLAGS.warmup)}
    plain = _endless(plan, False)
    timings["plan_batches"] = _timed(lambda: next(plain), FLAGS.timed_batches, FLAGS.warmup)
    prefetch_gen = _endless(plan, True)
    timings["plan_batches_prefetch"] = _timed(lambda: next(prefetch_gen), FLAGS.timed_batches, FLAGS.warmup)
    prefetch_gen.close()

    result = {
        "config": {"batch_size": FLAGS.batch_size, "max_buckets": FLAGS.max_buckets, "epochs": FLAGS.epochs,
                   "mode": FLAGS.mode, "featurizer_key": settings.key(), "neighbors_version": NEIGHBORS_VERSION,
                   "limit": FLAGS.limit, "seed": FLAGS.seed, "timed_batches": FLAGS.timed_batches},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_at_end": list(os.getloadavg())},
        "dataset": {"structures": len(store), "train": len(train), "atoms": int(store.node_ptr[-1]),
                    "edges": int(store.edge_ptr[-1]),
                    "edges_per_molecule_mean": float(store.n_edge.mean()),
                    "edges_per_molecule_max": int(store.n_edge.max())},
        "buckets": [{"n_node": b.n_node, "n_edge": b.n_edge, "n_graph": b.n_graph, "batches": usage[b]}
                    for b in buckets],
        "padding": {"real_node_fraction": real_nodes / pad_nodes, "real_edge_fraction": real_edges / pad_edges,
                    "distinct_shapes_per_epoch": shapes_per_epoch},
        "seconds": {"first_call": load_s, "first_call_found_cache": cache_existed, "cached_load": cached_load_s,
                    "choose_buckets": choose_s},
        "batches_per_s": {name: per_s for name, (per_s, _) in timings.items()},
        "cpu_us_per_batch": {name: cpu_us for name, (_, cpu_us) in timings.items()},
    }
    print(f"QM9 {len(store)} molecules ({settings.key()}), train {len(train)}, batch {FLAGS.batch_size}, "
          f"{FLAGS.epochs} epochs")
    print(f"{'bucket (nodes, edges, graphs)':<32}{'batches':>9}")
    for b in buckets:
        print(f"{str((b.n_node, b.n_edge, b.n_graph)):<32}{usage[b]:>9}")
    print(f"real nodes {real_nodes / pad_nodes:.1%}   real edges {real_edges / pad_edges:.1%}   "
          f"shapes per epoch {shapes_per_epoch}")
    print(f"{'first call s':<32}{load_s:>9.2f} ({'cache hit' if cache_existed else 'built the cache'})")
    print(f"{'cached load s':<32}{cached_load_s:>9.2f}")
    print(f"{'choose_buckets s':<32}{choose_s:>9.2f}")
    for name, (per_s, cpu_us) in timings.items():
        print(f"{name + ' batches/s':<32}{per_s:>9.1f}   ({cpu_us:.0f} CPU µs per batch)")
    print(f"load average {os.getloadavg()}")
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
