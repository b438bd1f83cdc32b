"""Where the time of the SCANN+ train and eval steps goes, by op class, on this machine.

    python experiments/profile_step.py [--variants=scannplus,scann] [--steps=8]

Builds the QM9 recipe's model, optimiser and jitted steps (as training does) on one padded batch
of ``--batch`` QM9 molecules, prints XLA's cost analysis (FLOPs, bytes accessed) beside the
measured time and this machine's measured peaks, and traces ``--steps`` calls of each step with
the JAX profiler. Every executed XLA op (thunk) of the trace is matched to its instruction in the
optimised HLO and put in one class:

* dense matmul: a dot (or a fusion containing one);
* scatter / segment sum: a scatter (segment sums and maxima, their gradients' gathers' transposes);
* gather: a gather or dynamic slice (edge gathers of node arrays, their gradients' scatters are
  counted above);
* softmax, LayerNorm: the remaining fusions whose ops come from ``masked_segment_softmax`` or
  Flax's LayerNorm;
* optimiser / loss: ops from optax, train.py or losses.py;
* elementwise: every other fusion (activations, Gaussians, masks, products, reductions);
* copy / layout: copies, transposes, broadcasts, concatenations, slices outside fusions.

With ``--roots=OLD,NEW`` (two checkouts, e.g. an exported earlier commit and this one) it
instead times the steps of each checkout's ``scannet_jax`` in separate subprocesses, alternating
which goes first, ``--rounds`` times, and reports medians with min–max side by side (no trace),
in wall time and in CPU time of the process (less disturbed by other work on a shared machine).
``--allocators=system,huge_pages`` does the same for one checkout under host-allocator settings
(`scannet_jax.host_memory`): ``system`` (glibc as it is), ``huge_pages`` (transparent huge pages
for the heap, as the command line runs), ``keep`` (freed memory kept), ``huge_pages+keep``; the
timings then include system CPU time and minor page faults per step.

Writes experiments/results/profile_step.json (the comparison under "before_after").
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

CLASSES = ("dense matmul", "scatter / segment sum", "gather", "softmax", "LayerNorm", "elementwise",
           "optimiser / loss", "copy / layout")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _stack_functions(text: str) -> dict[int, set[str]]:
    """stack_frame_id -> names of every function on that frame's call stack (HLO stack tables)."""
    tables: dict[str, dict[int, str]] = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {},
                                         "StackFrames": {}}
    table = None
    for line in text.splitlines():
        if line in tables:
            table = line
            continue
        entry = re.match(r"^(\d+) (.*)$", line)
        if table and entry:
            tables[table][int(entry.group(1))] = entry.group(2)
        elif line.strip() and table:
            table = None
    function_of_location = {k: int(re.search(r"function_name_id=(\d+)", v).group(1))
                            for k, v in tables["FileLocations"].items()}
    frames = {}
    for k, v in tables["StackFrames"].items():
        location, parent = (int(x) for x in re.findall(r"(?:file_location_id|parent_frame_id)=(\d+)", v))
        frames[k] = (location, parent)
    functions: dict[int, set[str]] = {}
    for k in frames:
        names, frame, seen = set(), k, set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            location, frame = frames[frame]
            names.add(tables["FunctionNames"].get(function_of_location.get(location, -1), "").strip('"'))
        functions[k] = names
    return functions


def parse_hlo(text: str) -> dict[str, dict]:
    """Instructions of an optimised HLO module: name -> {opcode, computation, calls, op_names,
    functions (on the Python call stack that made the op), custom_call}."""
    stacks = _stack_functions(text)
    instructions, computation = {}, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and "=" not in line.split("{")[0]:
            computation = header.group(1)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode, rest = match.groups()
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        instructions[name] = {"opcode": opcode, "computation": computation,
                              "calls": re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest),
                              "op_names": re.findall(r'op_name="([^"]+)"', rest),
                              "functions": stacks.get(int(frame.group(1)), set()) if frame else set(),
                              "custom_call": re.findall(r'custom_call_target="([^"]+)"', rest)}
    return instructions


def _members(name: str, instructions: dict, by_computation: dict) -> list[dict]:
    """An instruction and every instruction of the computations it calls (recursively)."""
    members, stack, seen = [instructions[name]], list(instructions[name]["calls"]), set()
    while stack:
        comp = stack.pop()
        if comp in seen:
            continue
        seen.add(comp)
        for member in by_computation.get(comp, ()):
            members.append(member)
            stack += member["calls"]
    return members


def classify(name: str, instructions: dict, by_computation: dict) -> str:
    """The op class (one of CLASSES) of HLO instruction ``name``."""
    members = _members(name, instructions, by_computation)
    opcodes = {m["opcode"] for m in members} | {c for m in members for c in m["custom_call"]}
    op_names = [n for m in members for n in m["op_names"]]
    functions = set().union(*(m["functions"] for m in members))
    if opcodes & {"dot", "convolution"} or any("matmul" in op.lower() or "gemm" in op.lower() for op in opcodes):
        return "dense matmul"
    if "scatter" in opcodes:
        return "scatter / segment sum"
    if opcodes & {"gather", "dynamic-slice"}:
        return "gather"
    if "masked_segment_softmax" in functions:
        return "softmax"
    if any("layer_norm" in n or "LayerNorm" in n for n in op_names):
        return "LayerNorm"
    if op_names and not any("Scann" in n for n in op_names):
        return "optimiser / loss"
    if instructions[name]["opcode"] == "fusion":
        return "elementwise"
    return "copy / layout"


def trace_op_times(fn, args_fn, steps: int) -> dict[str, float]:
    """Total µs per executed XLA op name over ``steps`` traced calls of ``fn(*args_fn())``."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(steps):
            jax.block_until_ready(fn(*args_fn()))
        jax.profiler.stop_trace()
        (path,) = Path(tmp).rglob("*.trace.json.gz")
        events = json.load(gzip.open(path))["traceEvents"]
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X":
            totals[e["name"]] += float(e.get("dur", 0.0))
    return totals


def profile(step_name: str, jitted, args_fn, steps: int, peaks: dict) -> dict:
    import jax

    from cost_analysis import fraction_of_peak, step_cost

    args = args_fn()
    cost = step_cost(jitted, *args)
    text = jitted.lower(*args).compile().as_text()
    instructions = parse_hlo(text)
    by_computation = collections.defaultdict(list)
    for inst in instructions.values():
        by_computation[inst["computation"]].append(inst)
    jax.block_until_ready(jitted(*args_fn()))  # compiled and warm
    t0 = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(jitted(*args_fn()))
    seconds = (time.perf_counter() - t0) / steps
    op_us = trace_op_times(jitted, args_fn, steps)
    per_class = collections.Counter()
    per_op = []
    for name, us in op_us.items():
        if name not in instructions:
            continue  # runtime events (dispatch, waits), not XLA ops
        cls = classify(name, instructions, by_computation)
        per_class[cls] += us / steps
        per_op.append({"op": name, "class": cls, "ms_per_step": us / steps / 1e3})
    total_us = sum(per_class.values())
    per_op.sort(key=lambda r: -r["ms_per_step"])
    return {
        "step": step_name, "ms_per_step": 1e3 * seconds, "cost": cost,
        "achieved": fraction_of_peak(cost, seconds, peaks),
        "op_ms_per_step_total": total_us / 1e3,
        "classes": {c: {"ms_per_step": per_class[c] / 1e3, "fraction": per_class[c] / max(total_us, 1e-9)}
                    for c in CLASSES},
        "top_ops": per_op[:25],
        "num_hlo_instructions": len(instructions),
    }


def _setup(args):
    """The featurised molecules' store (QM9 sample) and the measured peaks."""
    import numpy as np

    from compare_original import TARGET
    from scannet_jax.datasets import featurize, qm9
    from scannet_jax.neighbors import FeaturizerSettings

    molecules = qm9.read_qm9()
    sample = np.sort(np.random.default_rng(args.seed).choice(len(molecules), args.molecules, replace=False))
    return featurize.build_store([molecules.structure(int(s)) for s in sample], FeaturizerSettings(),
                                 targets={TARGET: molecules.targets[TARGET][sample]}, num_workers=1,
                                 progress=False)


def _variant_steps(store, variant: str, batch_size: int):
    """(train call, eval call, argument getters, batch description) of one variant on one batch."""
    import numpy as np

    from compare_original import ours_training_setup
    from scannet_jax import parallel

    state, steps, plan, mesh = ours_training_setup(store, variant, batch_size, num_buckets=1)
    # A random batch: the store keeps QM9's order, sorted by atom count.
    batch = parallel.shard_batch(plan.batch(np.random.default_rng(0).choice(len(store), batch_size, replace=False)),
                                 mesh)
    holder = {"state": state}

    def train_call(s, b):
        holder["state"], metrics = steps.train(s, b)
        return metrics

    described = {"graphs": batch_size, "padded_nodes": int(np.asarray(batch.n_node).sum()),
                 "padded_edges": int(np.asarray(batch.n_edge).sum()),
                 "real_edges": int(np.asarray(batch.n_edge)[..., :batch_size].sum())}
    return (_Jitted(train_call, steps.train), steps.eval, lambda: (holder["state"], batch), described)


def _time_steps(args) -> dict:
    """Wall ms/step, CPU ms/step (all threads), system CPU ms/step and minor page faults per step of
    the train and eval steps of every variant."""
    import resource

    if "keep" in args.timing_allocator.split("+"):
        from scannet_jax import host_memory

        host_memory.keep_freed_memory()  # before JAX starts
    import jax

    store = _setup(args)
    out = {}
    for variant in args.variants.split(","):
        train_call, eval_call, step_args, _ = _variant_steps(store, variant, args.batch)
        for name, fn in (("train", train_call), ("eval", eval_call)):
            jax.block_until_ready(fn(*step_args()))
            t0, c0, u0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            for _ in range(args.steps):
                jax.block_until_ready(fn(*step_args()))
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            out[f"{variant}/{name}"] = 1e3 * (time.perf_counter() - t0) / args.steps
            out[f"{variant}/{name} cpu"] = 1e3 * (time.process_time() - c0) / args.steps
            if args.timing_allocator:
                out[f"{variant}/{name} sys"] = 1e3 * (u1.ru_stime - u0.ru_stime) / args.steps
                out[f"{variant}/{name} faults"] = (u1.ru_minflt - u0.ru_minflt) / args.steps
    return out


def _allocator_environment(allocator: str) -> dict[str, str]:
    """This process's environment with glibc's huge-page tunable added (``huge_pages`` in
    ``allocator``) or removed."""
    from scannet_jax import host_memory

    env = dict(os.environ, SCANNET_JAX_MALLOC="")
    kept = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    if "huge_pages" in allocator.split("+"):
        env = host_memory.huge_page_environment(env) or env
    return env


def compare_roots(args) -> dict:
    """Interleaved subprocess timings of the steps of each checkout in ``args.roots``, or of this
    checkout under each host-allocator setting in ``args.allocators``."""
    import statistics
    import subprocess

    if args.allocators:
        setups = {a: (str(REPO), a, _allocator_environment(a)) for a in args.allocators.split(",")}
    else:
        setups = {root: (root, "", dict(os.environ)) for root in args.roots.split(",")}
    roots = list(setups)
    runs: dict[str, list[dict]] = {root: [] for root in roots}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in (roots if r % 2 == 0 else roots[::-1]):
                root, allocator, env = setups[name]
                result = Path(tmp) / "times.json"
                load = os.getloadavg()[0]
                cmd = [sys.executable, str(Path(__file__).resolve()), f"--timing-root={root}", f"--out={result}",
                       f"--timing-allocator={allocator}",
                       f"--variants={args.variants}", f"--molecules={args.molecules}", f"--batch={args.batch}",
                       f"--steps={args.steps}", f"--seed={args.seed}"]
                proc = subprocess.run(cmd, cwd=root, env=dict(env, PYTHONPATH=root), capture_output=True,
                                      text=True)
                if proc.returncode:
                    raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
                times = json.loads(result.read_text())
                runs[name].append(dict(times, loadavg_before=load))
                print(f"  round {r + 1} {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
                      + f" (load {load:.1f})", flush=True)
    keys = [k for k in runs[roots[0]][0] if k != "loadavg_before"]
    table = {}
    for key in keys:
        row = {root: {"median_ms": statistics.median(x[key] for x in runs[root]),
                      "min_ms": min(x[key] for x in runs[root]), "max_ms": max(x[key] for x in runs[root])}
               for root in roots}
        last = row[roots[-1]]["median_ms"]
        row["speedup"] = row[roots[0]]["median_ms"] / last if last else float("nan")  # faults can be 0
        table[key] = row
    # keys: "<variant>/<step>" wall ms, "... cpu" ms, "... sys" ms, "... faults" per step; ratio first / last
    print(f"\n{'step':22}" + "".join(f"{Path(r).name + ' (min-max)':>28}" for r in roots) + f"{'ratio':>9}")
    for key, row in table.items():
        cells = "".join(f"{row[r]['median_ms']:>14.0f} ({row[r]['min_ms']:.0f}-{row[r]['max_ms']:.0f})".rjust(28)
                        for r in roots)
        print(f"{key:22}{cells}{row['speedup']:9.2f}")
    return {"setups": {n: {"root": root, "allocator": a, "glibc_tunables": env.get("GLIBC_TUNABLES", "")}
                       for n, (root, a, env) in setups.items()}, "rounds": args.rounds, "steps": args.steps, "table": table, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="scannplus")
    parser.add_argument("--molecules", type=int, default=1000, help="QM9 molecules featurised (seeded sample)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed and traced calls per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--roots", default="", help="OLD,NEW checkouts to time side by side instead")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds with --roots")
    parser.add_argument("--allocators", default="", help="host-allocator settings to time side by side instead, "
                        "e.g. system,huge_pages (see the module doc)")
    parser.add_argument("--timing-root", help=argparse.SUPPRESS)  # worker of --roots / --allocators
    parser.add_argument("--timing-allocator", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "profile_step.json"))
    args = parser.parse_args(argv)
    if args.timing_root:
        sys.path.insert(0, args.timing_root)
        Path(args.out).write_text(json.dumps(_time_steps(args)))
        return
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    if args.roots or args.allocators:
        previous["allocators" if args.allocators else "before_after"] = dict(compare_roots(args), loadavg_after=os.getloadavg(),
                                        command="python experiments/profile_step.py " + " ".join(sys.argv[1:]))
        Path(args.out).write_text(json.dumps(previous, indent=1) + "\n")
        return

    sys.path.insert(0, str(REPO))
    import jax

    from cost_analysis import measure_peaks

    load_before = os.getloadavg()
    store = _setup(args)
    peaks = measure_peaks()
    results = []
    for variant in args.variants.split(","):
        train_call, eval_call, step_args, described = _variant_steps(store, variant, args.batch)
        for name, fn in (("train", train_call), ("eval", eval_call)):
            results.append(dict(profile(name, fn, step_args, args.steps, peaks), variant=variant, batch=described))

    previous.update({"command": "python experiments/profile_step.py " + " ".join(sys.argv[1:]),
                     "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
                     "peaks_measured": peaks, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                     "results": results})
    print(f"device {previous['device']}, load {load_before[0]:.1f} -> {previous['loadavg_after'][0]:.1f}; "
          f"measured peaks {peaks['flops_per_s'] / 1e9:.0f} GFLOP/s (f32 matmul), "
          f"{peaks['bytes_per_s'] / 1e9:.1f} GB/s (read)")
    for r in results:
        c, a = r["cost"], r["achieved"]
        print(f"\n{r['variant']} {r['step']}: {r['ms_per_step']:.0f} ms/step; batch {r['batch']['graphs']} graphs, "
              f"{r['batch']['padded_nodes']} nodes, {r['batch']['padded_edges']} edges; "
              f"{c['flops'] / 1e9:.1f} GFLOP, {c['bytes_accessed'] / 1e9:.2f} GB -> "
              f"{a['flops_per_s'] / 1e9:.0f} GFLOP/s ({100 * a['flops_fraction']:.0f} % of peak), "
              f"{a['bytes_per_s'] / 1e9:.1f} GB/s ({100 * a['bytes_fraction']:.0f} %)")
        print(f"  {'op class':24} {'ms/step':>8} {'share':>6}   (sum of XLA op times {r['op_ms_per_step_total']:.0f} ms)")
        for name, v in sorted(r["classes"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
            print(f"  {name:24} {v['ms_per_step']:8.1f} {100 * v['fraction']:5.1f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(previous, indent=1) + "\n")


class _Jitted:
    """A callable that runs ``call`` but lowers like ``jitted`` (for the donated train step)."""

    def __init__(self, call, jitted):
        self._call, self.lower = call, jitted.lower

    def __call__(self, *args):
        return self._call(*args)


if __name__ == "__main__":
    main()
