"""This project against the original SCANN TensorFlow code, side by side on the same QM9 molecules.

    python experiments/compare_original.py --rounds=3

The original runs unmodified from the PyPI source archive ``scann-model`` 1.0 in its own
virtual environment (docs/original_env.md), with two harness changes it cannot run without on
TensorFlow 2.15: Open Babel is stubbed (only its QM9 preprocessing uses it) and the model is
compiled with Keras' legacy Adam (its ``Adam(decay=1e-5)`` raises on TF ≥ 2.11). It is never
imported by this project: the parent process starts one subprocess per (side, task), ours in
this interpreter and the original in the venv's python, 2 threads each, interleaved (task by task,
``--rounds`` times, the side that goes first alternating), and records the load average around
every run.

Tasks, all on the same ``--molecules`` QM9 molecules (seeded sample) with batch ``--batch``:
* ``scannplus`` / ``scann``: training molecules/s over ``--epochs`` timed epochs after one
  warm-up epoch (batches prepared ahead, as both codes' loops do), then model-only inference
  molecules/s (padded batches already built), and the process's peak RSS. Each also per CPU
  second of the process (all its threads), which a busy shared machine disturbs less than wall
  time. Both sides get the
  *same* neighbour lists, the original's own (pymatgen), computed once by the original.
* ``predict``: featurisation per core (one process, ``--featurize`` molecules: our Voronoi
  neighbours in the default ``exact`` mode against the original's pymatgen ``VoronoiNN``), and
  predict end to end (structures in, predictions out, 2 featurisation processes, full-size
  SCANN+ with random weights) on ``--predict`` molecules.

Ours runs with transparent huge pages for its heap, as its command line runs it (``--huge-pages``;
`scannet_jax.host_memory`); each run records its system CPU time and minor page faults.

Figures are medians over rounds with min–max; ratios are ours / original of the medians. Writes
experiments/results/compare_original.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORIGINAL_VENV = Path(os.environ.get("SCANN_ORIGINAL_VENV", "/work/venvs/scann_original"))
ORIGINAL_SRC = ORIGINAL_VENV / "src" / "scann-model-1.0"
THREADS = 2
TARGET = "homo"
VARIANTS = ("scannplus", "scann")
# The original's QM9 model (reference §2) as its create_model reads it.
ORIGINAL_MODEL = dict(feature="atomic", n_atoms=10, embedding_dim=48, use_ring=False, local_dim=128,
                      num_head=8, n_attention=7, gaussian_d=4.0, use_drop=False, use_attn_norm=True,
                      global_dim=128, dense_out=128, use_ga_norm=True, scale=0.5)
SYMBOLS = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--molecules", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="timed training epochs over the molecules")
    parser.add_argument("--featurize", type=int, default=200, help="molecules featurised per core")
    parser.add_argument("--predict", type=int, default=200, help="molecules predicted end to end")
    parser.add_argument("--seed", type=int, default=0, help="molecule sample")
    parser.add_argument("--tasks", default="scannplus,scann,predict")
    parser.add_argument("--neighbours", help="the original's neighbour lists (pickle) of this very sample, "
                        "saved by an earlier run (--save-neighbours), instead of recomputing them")
    parser.add_argument("--save-neighbours", help="keep the original's neighbour lists (pickle) here")
    parser.add_argument("--ours-root", default=str(REPO),
                        help="checkout whose scannet_jax is measured (e.g. an exported commit)")
    parser.add_argument("--huge-pages", choices=("ours", "both", "none"), default="ours",
                        help="which side runs with glibc's transparent huge pages for the heap "
                        "(host_memory.huge_page_environment): ours, as its command line runs it; both; none")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "compare_original.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # side:task, run in a subprocess
    parser.add_argument("--data", help=argparse.SUPPRESS)  # the molecules (npz) and neighbours (pickle)
    parser.add_argument("--result", help=argparse.SUPPRESS)  # worker JSON output
    return parser.parse_args(argv)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _molecule(data, s: int):
    a, b = data["atom_ptr"][s], data["atom_ptr"][s + 1]
    return data["numbers"][a:b], data["positions"][a:b]


def _timed_epochs(run_epoch, epochs: int) -> tuple[float, float]:
    """Runs one warm-up epoch, then ``epochs`` timed ones; returns (wall s, CPU s of this process)."""
    run_epoch()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        run_epoch()
    return time.perf_counter() - t0, time.process_time() - c0


def _rates(n: int, epochs: int, train: tuple[float, float], infer: tuple[float, float]) -> dict:
    """Molecules per wall second and per CPU second (all threads) of training and inference."""
    return {"train_molecules_per_s": epochs * n / train[0], "train_molecules_per_cpu_s": epochs * n / train[1],
            "infer_molecules_per_s": epochs * n / infer[0], "infer_molecules_per_cpu_s": epochs * n / infer[1],
            "peak_rss_mib": _peak_rss_mib()}


# ----------------------------------------------------------------------------------------------
# The original (runs in its venv's python; never imported by scannet_jax).


def _import_original():
    """Imports the original package with Open Babel stubbed (used only by its preprocessing)."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    babel = types.ModuleType("openbabel")
    babel.pybel = types.ModuleType("openbabel.pybel")
    sys.modules.setdefault("openbabel", babel)
    sys.modules.setdefault("openbabel.pybel", babel.pybel)
    sys.path.insert(0, str(ORIGINAL_SRC))
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(THREADS)
    from scann.models import scann_model
    from scann.utils import datagenerator, voronoi_neighbor

    return tf, scann_model, datagenerator, voronoi_neighbor


def _original_structure(data, s: int) -> dict:
    numbers, positions = _molecule(data, s)
    return {"Atoms": [SYMBOLS[int(z)] for z in numbers], "Coords": positions.tolist()}


def original_neighbours(data, indices, voronoi_neighbor, num_procs: int = 1) -> list:
    """The original's neighbour lists (its ``compute_voronoi_neighbor_wrapper``, d_t 4 Å, w_t 0.4)."""
    structures = [_original_structure(data, int(s)) for s in indices]
    if num_procs <= 1:
        return [voronoi_neighbor.compute_voronoi_neighbor_wrapper(s, 4.0, 0.4) for s in structures]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(num_procs) as pool:  # as its parallel_compute_neighbor does
        return list(pool.map(voronoi_neighbor.compute_voronoi_neighbor_wrapper, structures,
                             [4.0] * len(structures), [0.4] * len(structures), chunksize=8))


def _original_batches(data, neighbours, indices, batch: int, g_update: bool, datagenerator,
                      shuffle: bool) -> list:
    import numpy as np

    energy = np.empty((len(indices), 2), dtype=object)
    neighbour_array = np.empty(len(indices), dtype=object)
    for k, s in enumerate(indices):  # neighbours[k] belongs to molecule indices[k]
        energy[k, 0] = _molecule(data, int(s))[0].tolist()
        energy[k, 1] = float(data["target"][int(s)])
        neighbour_array[k] = neighbours[k]
    iterator = datagenerator.DataIterator(energy, neighbour_array, batch_size=batch, shuffle=shuffle,
                                          g_update=g_update)
    return iterator, [iterator[b] for b in range(len(iterator))]


def _original_model(tf, scann_model, variant: str):
    config = {"model": dict(ORIGINAL_MODEL, g_update=variant == "scannplus"), "hyper": {"target": TARGET}}
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # model.summary()
        model = scann_model.create_model(config)
    model.compile(loss=scann_model.root_mean_squared_error,
                  optimizer=tf.keras.optimizers.legacy.Adam(5e-4, decay=1e-5),
                  metrics=["mae", scann_model.r2_square])
    return model


def original_worker(task: str, args: argparse.Namespace) -> dict:
    import numpy as np

    tf, scann_model, datagenerator, voronoi_neighbor = _import_original()
    data = np.load(Path(args.data) / "molecules.npz")
    n = len(data["atom_ptr"]) - 1
    if task == "neighbours":
        neighbours = original_neighbours(data, range(n), voronoi_neighbor, THREADS)
        (Path(args.data) / "original_neighbours.pkl").write_bytes(pickle.dumps(neighbours))
        return {"edges": int(sum(len(lc) for mol in neighbours for lc in mol))}
    if task in VARIANTS:
        neighbours = pickle.loads((Path(args.data) / "original_neighbours.pkl").read_bytes())
        model = _original_model(tf, scann_model, task)
        train_iter, _ = _original_batches(data, neighbours, range(n), args.batch, task == "scannplus",
                                          datagenerator, shuffle=True)

        def epoch():
            batches = [train_iter[b] for b in range(len(train_iter))]  # prepared ahead
            t, c = time.perf_counter(), time.process_time()
            for inputs, y in batches:
                model.train_on_batch(inputs, y)
            train_iter.on_epoch_end()  # reshuffle, as fit does
            return np.array([time.perf_counter() - t, time.process_time() - c])

        epoch()  # warm-up (traces the train function)
        train = sum(epoch() for _ in range(args.epochs))
        _, eval_batches = _original_batches(data, neighbours, range(n), args.batch, task == "scannplus",
                                            datagenerator, shuffle=False)
        infer = _timed_epochs(lambda: [model.predict_on_batch(x) for x, _ in eval_batches], args.epochs)
        return _rates(n, args.epochs, tuple(train), infer)
    if task == "predict":
        t0 = time.perf_counter()
        original_neighbours(data, range(args.featurize), voronoi_neighbor, 1)
        featurize_s = time.perf_counter() - t0
        model = _original_model(tf, scann_model, "scannplus")
        warm = original_neighbours(data, range(2), voronoi_neighbor, 1)
        _, warm_batches = _original_batches(data, warm, range(2), args.batch, True, datagenerator, False)
        model.predict_on_batch(warm_batches[0][0])

        def predict_all() -> float:
            t = time.perf_counter()
            neighbours = original_neighbours(data, range(args.predict), voronoi_neighbor, THREADS)
            _, batches = _original_batches(data, neighbours, range(args.predict), args.batch, True,
                                           datagenerator, False)
            values = np.concatenate([model.predict_on_batch(x)[:, 0] for x, _ in batches])
            assert values.shape == (args.predict,)
            return time.perf_counter() - t

        predict_all()  # warm-up: traces the predict function on these shapes
        predict_s = predict_all()
        return {"featurize_molecules_per_s_per_core": args.featurize / featurize_s,
                "predict_molecules_per_s": args.predict / predict_s, "peak_rss_mib": _peak_rss_mib()}
    raise ValueError(f"unknown task {task!r}")


# ----------------------------------------------------------------------------------------------
# This project (default interpreter).


def store_from_original_neighbours(data, neighbours):
    """A GraphStore of the molecules with the original's neighbour lists (edges grouped by centre)."""
    import numpy as np

    from scannet_jax.graphs import GraphStore

    numbers, lists = [], []
    for s, mol in enumerate(neighbours):
        rows = [(i, nb[1], nb[2], nb[3], nb[4]) for i, centre in enumerate(mol) for nb in centre]
        r, j, omega, rho, d = (np.array(col) for col in zip(*rows))
        lists.append(types.SimpleNamespace(receivers=r.astype(np.int32), senders=j.astype(np.int32),
                                           distances=d.astype(np.float32), solid_angles=omega.astype(np.float32),
                                           weights=rho.astype(np.float32)))
        numbers.append(_molecule(data, s)[0])
    return GraphStore.from_structures(numbers, lists, targets={TARGET: np.asarray(data["target"], np.float64)})


def ours_training_setup(store, variant: str, batch: int, num_buckets: int = 2):
    """The QM9 recipe's model, optimiser, train state and jitted steps for ``store``.

    Returns:
      (state, steps, plan, mesh) as ``train.setup`` builds them (every molecule in the
      training split; the scaler of all of them).
    """
    import numpy as np

    from scannet_jax.configs import qm9 as qm9_config
    from scannet_jax import train
    from scannet_jax.steps import set_learning_rate
    from scannet_jax.datasets.splits import make_datasets

    config = qm9_config.get_config(TARGET + (",scann" if variant == "scann" else ""))
    config.batch_size = config.eval_batch_size = batch
    config.num_buckets = num_buckets
    everything = np.arange(len(store))
    data = make_datasets(store, {"train": everything, "validation": everything, "test": everything}, TARGET)
    trainer = train.setup(config, data)
    state = set_learning_rate(trainer.state, config.optimizer.lr, trainer.mesh)
    return state, trainer.steps, trainer.train_plan, trainer.mesh


def ours_worker(task: str, args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from scannet_jax import parallel

    data = np.load(Path(args.data) / "molecules.npz")
    n = len(data["atom_ptr"]) - 1
    if task in VARIANTS:
        neighbours = pickle.loads((Path(args.data) / "original_neighbours.pkl").read_bytes())
        store = store_from_original_neighbours(data, neighbours)
        state, steps, plan, mesh = ours_training_setup(store, task, args.batch)
        counter = iter(range(1, 10**6))

        def epoch():
            nonlocal state
            batches = [parallel.shard_batch(b, mesh) for b in plan.batches(0, next(counter))]  # ahead
            t, c = time.perf_counter(), time.process_time()
            for b in batches:
                state, metrics = steps.train(state, b)
            jax.block_until_ready((state, metrics))
            return np.array([time.perf_counter() - t, time.process_time() - c])

        epoch()  # warm-up: compiles every bucket of the training batches
        train = sum(epoch() for _ in range(args.epochs))
        eval_batches = [parallel.shard_batch(b, mesh) for b in plan.batches(None, 0)]
        infer = _timed_epochs(lambda: jax.block_until_ready([steps.predict(state, b) for b in eval_batches]),
                              args.epochs)
        return dict(_rates(n, args.epochs, tuple(train), infer), edges=int(store.n_edge.sum()))
    if task == "predict":
        from ase import Atoms

        sys.path.insert(0, str(Path(args.ours_root) / "experiments"))
        from bench_predict import random_predictor

        from scannet_jax.datasets import featurize
        from scannet_jax.structures import molecule
        from scannet_jax.neighbors import FeaturizerSettings

        settings = FeaturizerSettings()
        structures = [molecule(*_molecule(data, s)) for s in range(args.featurize)]
        featurize.featurize_one(structures[0], settings, False)
        t0 = time.perf_counter()
        for s in structures:
            featurize.featurize_one(s, settings, False)
        featurize_s = time.perf_counter() - t0
        predictor = random_predictor("full", args.batch, THREADS)
        atoms = [Atoms(*_molecule(data, s)) for s in range(args.predict)]
        predictor(atoms)  # warm-up: starts the worker pool, compiles the buckets
        t0 = time.perf_counter()
        results = predictor(atoms)
        predict_s = time.perf_counter() - t0
        predictor.close()
        assert len(results) == args.predict
        return {"featurize_molecules_per_s_per_core": args.featurize / featurize_s,
                "predict_molecules_per_s": args.predict / predict_s, "peak_rss_mib": _peak_rss_mib()}
    raise ValueError(f"unknown task {task!r}")


# ----------------------------------------------------------------------------------------------
# Parent: sample, interleave, aggregate.


def _run_worker(side: str, task: str, args: argparse.Namespace, data_dir: Path) -> dict:
    python = str(ORIGINAL_VENV / "bin" / "python") if side == "original" else sys.executable
    result = data_dir / f"{side}_{task}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), TF_NUM_INTRAOP_THREADS=str(THREADS),
               TF_NUM_INTEROP_THREADS=str(THREADS), PYTHONPATH=args.ours_root if side == "ours" else "")
    if args.huge_pages == "both" or args.huge_pages == side:
        from scannet_jax import host_memory

        env = host_memory.huge_page_environment(env) or env
    cmd = [python, str(Path(__file__).resolve()), f"--worker={side}:{task}", f"--data={data_dir}",
           f"--ours-root={args.ours_root}",
           f"--result={result}", f"--batch={args.batch}", f"--epochs={args.epochs}",
           f"--featurize={args.featurize}", f"--predict={args.predict}"]
    load_before, t0 = os.getloadavg(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=args.ours_root if side == "ours" else data_dir,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{side}:{task} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(result.read_text())
    out.update(wall_s=time.perf_counter() - t0, loadavg_before=load_before, loadavg_after=os.getloadavg(),
               glibc_tunables=env.get("GLIBC_TUNABLES", ""))
    print(f"  {side:8} {task:9} " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()
                                               if isinstance(v, float) and not k.startswith("load"))
          + f", load {load_before[0]:.1f}->{out['loadavg_after'][0]:.1f}", flush=True)
    return out


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main() -> None:
    args = parse_args()
    if args.worker:
        side, task = args.worker.split(":")
        out = (original_worker if side == "original" else ours_worker)(task, args)
        usage = resource.getrusage(resource.RUSAGE_SELF)  # the whole worker, set-up included
        out.update(system_cpu_s=usage.ru_stime, minor_faults=usage.ru_minflt)
        Path(args.result).write_text(json.dumps(out))
        return

    import numpy as np

    sys.path.insert(0, args.ours_root)
    from scannet_jax.datasets import qm9

    molecules = qm9.read_qm9()
    sample = np.sort(np.random.default_rng(args.seed).choice(len(molecules), args.molecules, replace=False))
    parts = [molecules.structure(int(s)) for s in sample]
    tasks = args.tasks.split(",")
    with tempfile.TemporaryDirectory(prefix="compare_original_") as tmp:
        data_dir = Path(tmp)
        np.savez(data_dir / "molecules.npz", numbers=np.concatenate([p.numbers for p in parts]),
                 positions=np.concatenate([p.positions for p in parts]),
                 atom_ptr=np.concatenate([[0], np.cumsum([len(p.numbers) for p in parts])]),
                 target=molecules.targets[TARGET][sample])
        print(f"{args.molecules} QM9 molecules (seed {args.seed}, {sum(len(p.numbers) for p in parts)} atoms); "
              "the original's neighbours:", flush=True)
        if args.neighbours:
            lists = pickle.loads(Path(args.neighbours).read_bytes())
            if [len(mol) for mol in lists] != [len(p.numbers) for p in parts]:
                raise ValueError(f"{args.neighbours} does not hold this sample's molecules")
            (data_dir / "original_neighbours.pkl").write_bytes(pickle.dumps(lists))
            neighbours = {"edges": int(sum(len(lc) for mol in lists for lc in mol)), "from": args.neighbours}
        else:
            neighbours = _run_worker("original", "neighbours", args, data_dir)
        if args.save_neighbours:
            Path(args.save_neighbours).write_bytes((data_dir / "original_neighbours.pkl").read_bytes())
        runs: dict[str, dict[str, list[dict]]] = {t: {"ours": [], "original": []} for t in tasks}
        for k, task in enumerate(tasks):  # task by task, so that a cut-short run keeps whole tasks
            for r in range(args.rounds):
                print(f"{task} round {r + 1}/{args.rounds}", flush=True)
                for side in (("ours", "original") if r % 2 == 0 else ("original", "ours")):
                    runs[task][side].append(_run_worker(side, task, args, data_dir))
            write_results(args, runs, tasks[:k + 1], neighbours, args.rounds)


def write_results(args: argparse.Namespace, runs: dict, tasks: list[str], neighbours: dict, rounds: int) -> None:
    """Medians, min-max and ratios of the tasks done so far: printed and written to ``args.out``."""
    model_metrics = ("train_molecules_per_s", "train_molecules_per_cpu_s", "infer_molecules_per_s",
                     "infer_molecules_per_cpu_s", "peak_rss_mib")
    metrics = {"scannplus": model_metrics, "scann": model_metrics,
               "predict": ("featurize_molecules_per_s_per_core", "predict_molecules_per_s", "peak_rss_mib")}
    figures, loads = {}, []
    for task in tasks:
        for side in ("ours", "original"):
            loads += [run["loadavg_before"][0] for run in runs[task][side]]
        for metric in metrics[task]:
            row = {side: _summary([run[metric] for run in runs[task][side]]) for side in ("ours", "original")}
            row["ratio"] = row["ours"]["median"] / row["original"]["median"]
            figures[f"{task}/{metric}"] = row
    result = {
        "command": "python experiments/compare_original.py " + " ".join(sys.argv[1:]),
        "molecules": f"{args.molecules} QM9 molecules sampled with seed {args.seed}; the original's "
                     f"neighbour lists for training/inference ({neighbours['edges']} edges)",
        "batch": args.batch, "timed_epochs": args.epochs, "rounds": rounds, "tasks_done": tasks, "threads": THREADS,
        "huge_pages": args.huge_pages, "cpu_count": os.cpu_count(), "original": str(ORIGINAL_SRC), "ours_root": args.ours_root,
        "loadavg_1min_before_runs": _summary(loads), "figures": figures,
        "runs": {task: runs[task] for task in tasks},
    }
    print(f"\n{'figure':45} {'ours (min-max)':>24} {'original (min-max)':>24} {'ratio':>6}")
    for name, row in figures.items():
        cell = lambda s: f"{s['median']:.1f} ({s['min']:.0f}-{s['max']:.0f})"  # noqa: E731
        print(f"{name:45} {cell(row['ours']):>24} {cell(row['original']):>24} {row['ratio']:6.2f}")
    print(f"1-min load average before the runs: median {result['loadavg_1min_before_runs']['median']:.1f} "
          f"({min(loads):.1f}-{max(loads):.1f})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
