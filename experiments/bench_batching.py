"""Benchmark of the QM9 batcher: bucket choice, padding efficiency, shapes per epoch, batches/s.

Featurises QM9 once (or loads the feature cache), chooses buckets for the training split, then
walks whole shuffled training epochs at the given batch size, counting real and padded nodes and
edges and the distinct padded shapes, and times `pad_batch` alone and `BatchPlan.batches` (the training path) with and without
`prefetch`. The first `--warmup` batches of each timing are not counted. Nothing is compiled
here (NumPy only); the one-time costs reported instead are the cache load and the bucket choice.

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


def _throughput(batches, count: int, warmup: int) -> float:
    """Batches per second over `count` items of `batches` after `warmup` items."""
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count / (time.perf_counter() - start)


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
    for _ in range(FLAGS.warmup):
        batching.pad_batch(store, fixed, bucket0, "homo")
    start = time.perf_counter()
    for _ in range(FLAGS.timed_batches):
        batching.pad_batch(store, fixed, bucket0, "homo")
    pad_batch_per_s = FLAGS.timed_batches / (time.perf_counter() - start)
    iterate_per_s = _throughput(_endless(plan, False), FLAGS.timed_batches, FLAGS.warmup)
    prefetch_gen = _endless(plan, True)
    prefetch_per_s = _throughput(prefetch_gen, FLAGS.timed_batches, FLAGS.warmup)
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
        "batches_per_s": {"pad_batch": pad_batch_per_s, "plan_batches": iterate_per_s,
                          "plan_batches_prefetch": prefetch_per_s},
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
    for name, value in result["batches_per_s"].items():
        print(f"{name + ' batches/s':<32}{value:>9.1f}")
    print(f"load average {os.getloadavg()}")
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
