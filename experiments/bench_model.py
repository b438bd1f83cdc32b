"""Forward and forward+backward time of SCANN / SCANN+ on batches of QM9-sized molecules.

Uses synthetic QM9-like graphs (sizes and edge counts drawn around QM9's means, random
geometry-like edge features), padded into one fixed bucket, so the timing is of the model alone.
Compilation is timed apart; steps are timed after warm-up with ``block_until_ready``.

Example:
  python experiments/bench_model.py --batch_size=128 --repeats=20
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jraph
import numpy as np
from absl import app, flags

from scannet_jax import losses, models

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "Molecules per batch.")
flags.DEFINE_float("mean_atoms", 18.0, "Mean atoms per molecule (QM9: 18.0).")
flags.DEFINE_float("edges_per_atom", 7.0, "Mean incoming edges per atom.")
flags.DEFINE_list("variants", ["scannplus", "scann"], "Any of scannplus (g_update), scann.")
flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes: float32, bfloat16.")
flags.DEFINE_integer("n_atoms", 95, "Embedding table rows.")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_integer("repeats", 20, "Timed steps.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic batch and the params.")
flags.DEFINE_string(
    "output", str(Path(__file__).resolve().parent / "results" / "bench_model.json"), "JSON output."
)


def synthetic_batch(rng: np.random.Generator, batch_size: int, mean_atoms: float, edges_per_atom: float):
    """A padded batch of QM9-like molecules: Z in {1, 6, 7, 8, 9}, d in [0.9, 4] Å, Ω in [0.4, 3] sr."""
    graphs = []
    for _ in range(batch_size):
        n = int(np.clip(rng.normal(mean_atoms, 3.0), 3, 29))
        degree = np.clip(rng.poisson(edges_per_atom, size=n), 1, n - 1)
        receivers = np.repeat(np.arange(n), degree)
        senders = (receivers + 1 + np.concatenate([rng.permutation(n - 1)[:k] for k in degree])) % n
        omega = rng.uniform(0.4, 3.0, len(receivers))
        largest = np.zeros(n)
        np.maximum.at(largest, receivers, omega)
        graphs.append(
            jraph.GraphsTuple(
                nodes={"atomic_numbers": rng.choice([1, 6, 7, 8, 9], size=n, p=[0.5, 0.35, 0.06, 0.08, 0.01]).astype(np.int32)},
                edges={
                    "distances": rng.uniform(0.9, 4.0, len(receivers)).astype(np.float32),
                    "solid_angles": omega.astype(np.float32),
                    "relative_weights": (omega / largest[receivers]).astype(np.float32),
                },
                senders=senders.astype(np.int32),
                receivers=receivers.astype(np.int32),
                n_node=np.array([n], np.int32),
                n_edge=np.array([len(receivers)], np.int32),
                globals={"target": np.array([rng.normal()], np.float32)},
            )
        )
    batch = jraph.batch_np(graphs)
    round_up = lambda x, m: int(-(-x // m) * m)  # noqa: E731
    return jraph.pad_with_graphs(
        batch,
        round_up(batch.n_node.sum() + 1, 64),
        round_up(batch.n_edge.sum(), 256),
        batch_size + 1,
    )


def time_steps(fn, args, warmup: int, repeats: int) -> dict[str, float]:
    """Compiles ``fn`` (timed apart), warms up, then times ``repeats`` calls in ms."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(1e3 * (time.perf_counter() - start))
    memory = compiled.memory_analysis()
    return {
        "compile_s": compile_s,
        "ms_mean": float(np.mean(times)),
        "ms_std": float(np.std(times)),
        "ms_min": float(np.min(times)),
        "xla_temp_mib": memory.temp_size_in_bytes / 2**20 if memory else float("nan"),
        "xla_argument_mib": memory.argument_size_in_bytes / 2**20 if memory else float("nan"),
    }


def parameter_count(config: dict, graphs: jraph.GraphsTuple) -> int:
    shapes = jax.eval_shape(models.build_model(config).init, jax.random.key(0), graphs)["params"]
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def bench_one(variant: str, dtype: str, graphs: jraph.GraphsTuple) -> dict:
    """Times forward and forward+backward (original loss, dropout on) for one model."""
    config = models.default_model_config()
    config.update(n_atoms=FLAGS.n_atoms, g_update=variant == "scannplus", dtype=dtype)
    model = models.build_model(config)
    params = model.init(jax.random.key(FLAGS.seed), graphs)["params"]
    graph_mask = jraph.get_graph_padding_mask(graphs)

    def forward(params, graphs):
        return model.apply({"params": params}, graphs)

    def train_grad(params, graphs, key):
        def loss(p):
            predictions, _ = model.apply({"params": p}, graphs, train=True, rngs={"dropout": key})
            return losses.original_loss(p, predictions, graphs.globals["target"], graph_mask)[0]

        return jax.value_and_grad(loss)(params)

    return {
        "variant": variant,
        "dtype": dtype,
        "params_n_atoms_10": parameter_count(dict(config, n_atoms=10), graphs),
        "params_n_atoms_95": parameter_count(dict(config, n_atoms=95), graphs),
        "forward": time_steps(forward, (params, graphs), FLAGS.warmup, FLAGS.repeats),
        "forward_backward": time_steps(
            train_grad, (params, graphs, jax.random.key(1)), FLAGS.warmup, FLAGS.repeats
        ),
    }


def main(argv):
    del argv
    rng = np.random.default_rng(FLAGS.seed)
    graphs = synthetic_batch(rng, FLAGS.batch_size, FLAGS.mean_atoms, FLAGS.edges_per_atom)
    graphs = jax.tree.map(jnp.asarray, graphs)
    load_before = os.getloadavg()
    runs = [bench_one(v, d, graphs) for v in FLAGS.variants for d in FLAGS.dtypes]
    config = models.default_model_config()
    record = {
        "command": " ".join(["python experiments/bench_model.py"] + sys.argv[1:]),
        "device": str(jax.devices()[0]),
        "platform": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "data": "synthetic QM9-like graphs (not real QM9)",
        "batch_size": FLAGS.batch_size,
        "real_atoms": int(graphs.n_node[:-1].sum()),
        "real_edges": int(graphs.n_edge[:-1].sum()),
        "bucket": {
            "n_node": int(graphs.n_node.sum()),
            "n_edge": int(graphs.senders.shape[0]),
            "n_graph": int(graphs.n_node.shape[0]),
        },
        "config": {k: config[k] for k in ("n_attention", "local_dim", "num_head", "embedding_dim", "global_dim", "dense_out")},
        "n_atoms": FLAGS.n_atoms,
        "warmup": FLAGS.warmup,
        "repeats": FLAGS.repeats,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "runs": runs,
    }
    print(f"device {record['device']}  batch {FLAGS.batch_size} molecules ({record['real_atoms']} atoms, "
          f"{record['real_edges']} edges; bucket {record['bucket']}), synthetic QM9-like graphs")
    print(f"{'model':<22}{'step':<18}{'compile s':>10}{'ms mean':>10}{'± std':>8}{'ms min':>9}{'mol/s':>8}{'XLA temp MiB':>14}")
    for run in runs:
        for step in ("forward", "forward_backward"):
            r = run[step]
            print(f"{run['variant'] + ' ' + run['dtype']:<22}{step:<18}{r['compile_s']:>10.1f}{r['ms_mean']:>10.1f}"
                  f"{r['ms_std']:>8.1f}{r['ms_min']:>9.1f}{1e3 * FLAGS.batch_size / r['ms_mean']:>8.0f}"
                  f"{r['xla_temp_mib']:>14.1f}")
        print(f"{'':<22}params {run['params_n_atoms_10']:,} (10-row table), {run['params_n_atoms_95']:,} (95-row)")
    print(f"peak RSS {record['peak_rss_mib']:.0f} MiB (whole process); load average before "
          f"{tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in record['loadavg_after'])}")
    Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.output).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
