"""Compile time and step time of every network's train step, two checkouts side by side.

    python experiments/bench_compile.py --roots=OLD,NEW [--networks=scannplus,scann,megnet,lstm,alignn]

Per checkout and network, a fresh subprocess with that checkout's ``scannet_jax`` on its path
builds the network's recipe (``configs/mp.py:gap[,network]``, one bucket) on the MP band-gap set,
takes one padded training batch and times: tracing and lowering the jitted train step
(``steps.train.lower``), XLA's compilation of it (``.compile()``, nothing cached: every process
starts cold), then ``--steps`` calls after one warm-up call (ms per call). It also counts the lines
of the optimised HLO. The checkouts alternate which goes first, ``--rounds`` times; medians with
min–max. Writes experiments/results/bench_compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("lower_s", "compile_s", "train_ms", "hlo_lines")


def measure(network: str, steps: int) -> dict[str, float]:
    """The figures of one network's train step in this process (``FIGURES``)."""
    import jax
    import jax.numpy as jnp

    from scannet_jax import parallel, train
    from scannet_jax.configs import mp
    from scannet_jax.steps import set_learning_rate

    config = mp.get_config("gap" + ("" if network == "scannplus" else "," + network))
    config.num_buckets = 1
    trainer = train.setup(config)
    batch = parallel.shard_batch(next(iter(trainer.train_plan.batches(0, 0))), trainer.mesh)
    state = set_learning_rate(jax.tree.map(jnp.copy, trainer.state), 1e-5, trainer.mesh)
    t0 = time.perf_counter()
    lowered = trainer.steps.train.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t3 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "train_ms": 1e3 * (time.perf_counter() - t3) / steps,
            "hlo_lines": float(len(compiled.as_text().splitlines()))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roots", default="", help="OLD,NEW checkouts (e.g. an exported commit and this one)")
    parser.add_argument("--networks", default="scannplus,scann,megnet,lstm,alignn")
    parser.add_argument("--steps", type=int, default=4, help="timed train-step calls after the warm-up call")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_compile.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # network, run in a subprocess
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(measure(args.worker, args.steps)))
        return
    if not args.roots:
        parser.error("--roots=OLD,NEW is required")

    roots = args.roots.split(",")
    runs: dict[str, dict[str, list[dict]]] = {n: {r: [] for r in roots} for n in args.networks.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        for network in runs:
            for k in range(args.rounds):
                for root in (roots if k % 2 == 0 else roots[::-1]):
                    result = Path(tmp) / "result.json"
                    load = os.getloadavg()[0]
                    cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker={network}", f"--result={result}",
                           f"--steps={args.steps}"]
                    proc = subprocess.run(cmd, cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True,
                                          text=True)
                    if proc.returncode:
                        raise RuntimeError(f"{network} in {root} failed:\n{proc.stderr[-3000:]}")
                    runs[network][root].append(dict(json.loads(result.read_text()), loadavg_before=load))
                    r = runs[network][root][-1]
                    print(f"  {network} round {k + 1} {root}: lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s, "
                          f"train step {r['train_ms']:.0f} ms, {r['hlo_lines']:.0f} HLO lines (load {load:.1f})", flush=True)

    table = {}
    for network, by_root in runs.items():
        table[network] = {}
        for figure in FIGURES:
            row = {root: {"median": statistics.median(x[figure] for x in by_root[root]),
                          "min": min(x[figure] for x in by_root[root]), "max": max(x[figure] for x in by_root[root])}
                   for root in roots}
            row["old_over_new"] = row[roots[0]]["median"] / row[roots[-1]]["median"]
            table[network][figure] = row
    print(f"\n{'network':10} {'figure':10}" + "".join(f"{Path(r).name:>26}" for r in roots) + f"{'old/new':>9}")
    for network, rows in table.items():
        for figure, row in rows.items():
            cells = "".join(f"{row[r]['median']:12.1f} ({row[r]['min']:.0f}-{row[r]['max']:.0f})".rjust(26) for r in roots)
            print(f"{network:10} {figure:10}{cells}{row['old_over_new']:9.2f}")
    Path(args.out).write_text(json.dumps({
        "command": "python experiments/bench_compile.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "roots": roots, "rounds": args.rounds, "steps": args.steps, "cpu_count": os.cpu_count(),
        "loadavg_after": os.getloadavg(), "table": table, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
