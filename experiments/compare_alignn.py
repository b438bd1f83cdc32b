"""This project's ALIGNN against the reference ``alignn`` package, side by side on the MP formation-energy split.

    python experiments/compare_alignn.py --epochs=300                 # the comparison (full model)
    nice -n 19 python experiments/compare_alignn.py --tiny --train 48 --val 16 --test 16 \
        --epochs 2 --batch_size 16                                     # smoke test

Data: the Materials Project formation-energy set that installs with the project
(`scannet_jax.datasets.mp.read("e_form")`) and its stored split (``data/mp/e_form_split.json``);
``--train/--val/--test N`` take the first N crystals of the stored train/validation/test lists
(0 = all). Both sides get the same crystals, in the same split, the same model sizes
(``configs/mp.py:e_form,alignn[,tiny]``'s model, copied into the reference's ``ALIGNNConfig``), the
same graphs settings (k = 12 nearest bonds from an 8 Å radius, canonised, with the line graph), the
same recipe (MSE, AdamW lr 1e-3 with weight decay 1e-5 on the reference's parameter groups,
one-cycle stepped per batch, ``--batch_size``, ``--epochs``, no early stopping) and report the test
MAE of the best-validation epoch.

* Ours: a subprocess of this interpreter (``--worker ours``) featurises the subset with
  `featurize.build_store` (``--graph_workers`` processes, default 1) and trains it with
  `train.train_and_evaluate`.
* Reference: PyPI ``alignn`` 2026.8.11 (PyTorch + DGL) in its own venv (``--ref_python``, default
  /work/venvs/alignn_ref/bin/python), never imported here. The subset is written in the
  reference's JSON folder format (``id_prop.json`` of jarvis ``Atoms`` records, as
  ``train_alignn.py --root_dir`` reads; see `write_reference_folder`) with a ``TrainingConfig``
  JSON; ``experiments/alignn_ref/reference_alignn.py`` times its graph building (``graphs``) and
  trains it (``train``; see that file for why the training loop is written there: ``train_dgl``
  of 2026.8.11 does not train the ``alignn`` model).

Figures, per side and round: graph construction structures/s (one process; ours
`featurize.build_store`, i.e. k-NN bonds, line graph and the store's arrays; the reference's
``Graph.atom_dgl_multigraph``, i.e. its neighbour search, line graph, DGL graphs and bond cosines;
both after the structures are in memory), training structures/s in the steady state (the median
over the epochs after the first, which holds ours' XLA compilation and the reference's warm-up,
of structures trained / training-loop seconds; validation, checkpoints and logging excluded),
test MAE, peak RSS and wall/CPU seconds of the training process (`os.wait4` of the subprocess:
imports, graph building, training and evaluation). The bond and triplet counts of every crystal
are compared between the sides. ``--rounds`` repeats ours and the reference, interleaved, the
side going first alternating, round r with seed ``--seed`` + r on both sides (so the test MAE's
spread over rounds is the seed noise).

Writes ``experiments/results/compare_alignn.json`` (``compare_alignn_smoke.json`` with ``--tiny``:
a smoke test of the script, not the comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
REFERENCE_SCRIPT = REPO / "experiments" / "alignn_ref" / "reference_alignn.py"
DEFAULT_REF_PYTHON = "/work/venvs/alignn_ref/bin/python"
SPLITS = ("train", "validation", "test")
SHARED_NOTE = ("The machine is shared: every time-based figure (graph construction and training "
               "structures/s, wall and CPU seconds, and their ratios) depends on what else ran; the "
               "load averages around each run are recorded. Test MAE, bond/triplet counts and "
               "parameter counts do not depend on the load; peak RSS hardly does.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=0, help="first N of the stored training split (0 = all)")
    parser.add_argument("--val", type=int, default=0, help="first N of the stored validation split (0 = all)")
    parser.add_argument("--test", type=int, default=0, help="first N of the stored test split (0 = all)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the config's, 300 or tiny's)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="the small model config (smoke runs)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of both sides")
    parser.add_argument("--seed", type=int, default=0,
                        help="initialisation and shuffling seed of both sides in round 0; round r uses seed + r")
    parser.add_argument("--graph_workers", type=int, default=1, help="our featurisation processes")
    parser.add_argument("--ref_python", default=DEFAULT_REF_PYTHON, help="the reference venv's python")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: see the docstring)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the work files in this folder")
    parser.add_argument("--worker", choices=("ours",), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def ours_config(args: argparse.Namespace):
    """``configs/mp.py:e_form,alignn[,tiny]`` with the run's epochs, batch size and seed."""
    from scannet_jax.configs import mp as mp_config

    config = mp_config.get_config("e_form,alignn" + (",tiny" if args.tiny else ""))
    if args.epochs is not None:
        config.num_epochs = args.epochs
    config.patience = config.num_epochs  # the reference does not stop early
    config.batch_size = config.eval_batch_size = args.batch_size
    config.seed = args.seed
    config.checkpoint_every_steps = 0  # checkpoints at epoch ends only (outside the timed loop)
    return config


def load_subset(args: argparse.Namespace) -> tuple[list, dict[str, list[int]]]:
    """All MP e_form crystals and the chosen indices per split (the stored split's first N)."""
    from scannet_jax.datasets import mp

    atoms, split = mp.read("e_form")
    sizes = {"train": args.train, "validation": args.val, "test": args.test}
    return atoms, {s: [int(i) for i in (split[s][:sizes[s]] if sizes[s] else split[s])] for s in SPLITS}


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--worker ours`` process: featurise the subset, train, evaluate; figures as a dict."""
    from scannet_jax import host_memory

    config = ours_config(args)
    if config.keep_freed_host_memory:
        host_memory.keep_freed_memory()  # as the command line does, before JAX starts
    import flax
    import jax
    import numpy as np
    import optax

    from scannet_jax import train
    from scannet_jax.datasets import featurize, splits
    from scannet_jax.structures import from_atoms

    atoms, chosen = load_subset(args)
    order = [i for s in SPLITS for i in chosen[s]]
    structures = [from_atoms(atoms[i]) for i in order]
    target = config.data.target
    settings = featurize.graph_settings(config.data.graph_builder, config.data.featurizer.to_dict())
    start = time.perf_counter()
    store = featurize.build_store(structures, settings, targets={target: [atoms[i].info[target] for i in order]},
                                  num_workers=args.graph_workers, progress=False)
    graph_s = time.perf_counter() - start
    bounds = np.cumsum([0] + [len(chosen[s]) for s in SPLITS])
    split = {s: np.arange(bounds[k], bounds[k + 1]) for k, s in enumerate(SPLITS)}
    data = splits.make_datasets(store, split, target, config.data.standardize)
    workdir = args.workdir / "ours_run"
    start = time.perf_counter()
    results = train.train_and_evaluate(config, str(workdir), data=data)
    train_call_s = time.perf_counter() - start
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [{"epoch": r["epoch"], "train_loss": r["train_loss"], "val_mae": r["val_mae"],
               "epoch_time_s": r["epoch_time_s"],
               "structures_trained": round(r["train_mol_per_s"] * r["epoch_time_s"]),
               "train_structures_per_s": r["train_mol_per_s"]} for r in records if "val_mae" in r]
    return {"graph_seconds": graph_s, "graph_structures_per_s": len(structures) / graph_s,
            "graph_workers": args.graph_workers, "train_and_evaluate_s": train_call_s, "epochs": epochs,
            "test_mae_best_val": results["test_mae"], "best_epoch": results["best_epoch"],
            "best_val_mae": results["mae"]["validation"], "params_from": results["params_from"],
            "num_structures": results["num_structures"], "compile_counts": results["compile_counts"],
            "n_edge": store.n_edge.tolist(), "n_triplet": store.extras["triplets"].counts.tolist(),
            "num_parameters": _count_parameters(workdir),
            "versions": {"python": sys.version.split()[0], "jax": jax.__version__, "flax": flax.__version__,
                         "optax": optax.__version__, "numpy": np.__version__,
                         "code_version": results.get("code_version")},
            "config": config.to_dict()}


def _count_parameters(workdir: Path) -> int:
    """Parameters of the best checkpoint in ``workdir``."""
    import jax
    import numpy as np

    from scannet_jax import checkpoints

    params = checkpoints.load_pretrained(workdir).params
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def reference_config(args: argparse.Namespace, config, sizes: dict[str, int], seed: int) -> dict[str, Any]:
    """The reference's ``TrainingConfig`` (keys of alignn/config.py) with ``config``'s settings
    and ``seed``."""
    model, opt, graphs = config.model.to_dict(), config.optimizer, config.data.featurizer
    if (config.loss, opt.name, opt.schedule, config.data.graph_builder) != ("mse", "adamw", "onecycle",
                                                                           "knn_line_graph"):
        raise ValueError("the reference runs only the ALIGNN recipe (MSE, AdamW, one-cycle, k-NN line graph)")
    return {
        "random_seed": seed, "n_train": sizes["train"], "n_val": sizes["validation"], "n_test": sizes["test"],
        "keep_data_order": True,  # id_prop.json lists train, validation, test in that order
        "epochs": int(config.num_epochs), "batch_size": args.batch_size, "learning_rate": float(opt.lr),
        "weight_decay": float(opt.weight_decay), "criterion": "mse", "optimizer": "adamw", "scheduler": "onecycle",
        "atom_features": "cgcnn", "neighbor_strategy": "k-nearest", "cutoff": float(graphs.cutoff),
        "max_neighbors": int(graphs.max_neighbors), "use_canonize": True, "compute_line_graph": True,
        "dtype": "float32", "id_tag": "jid", "num_workers": 0, "pin_memory": False, "use_lmdb": True,
        "n_early_stopping": None, "write_checkpoint": False, "filename": "sample",
        "model": {k: model[k] for k in ("name", "alignn_layers", "gcn_layers", "atom_input_features",
                                        "edge_input_features", "triplet_input_features",
                                        "embedding_features", "hidden_features", "output_features", "link")},
    }


def write_reference_folder(folder: Path, atoms: list, chosen: dict[str, list[int]], target: str) -> list[str]:
    """``id_prop.json`` in the reference's JSON folder format (train, validation, test order).

    Each entry's ``atoms`` holds the fields ``jarvis.core.atoms.Atoms.from_dict`` reads, with the
    Cartesian positions and lattice of the extxyz frame written exactly (JSON keeps every float64).
    POSCAR files with fractional coordinates would not do: their round trip moves distances by
    ~1e-15 Å, enough to change which tied 12th neighbours the reference keeps (seen on 24 of 80
    crystals of the smoke subset).

    Returns:
      The entries' ids (material_ids), in file order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in (i for s in SPLITS for i in chosen[s]):
        a = atoms[i]
        entries.append({"jid": a.info["material_id"], "target": float(a.info[target]),
                        "atoms": {"lattice_mat": a.cell[:].tolist(), "coords": a.get_positions().tolist(),
                                  "elements": a.get_chemical_symbols(), "cartesian": True,
                                  "props": [""] * len(a)}})
    (folder / "id_prop.json").write_text(json.dumps(entries))
    return [e["jid"] for e in entries]


def run_process(command: list[str], log: Path, cwd: Path | None = None) -> dict[str, Any]:
    """Runs ``command`` to completion: wall and CPU seconds, peak RSS (MiB), load averages."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}; last lines of {log}:\n{tail}")
    return {"command": command, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024, "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg())}


def steady_rate(epochs: list[dict[str, Any]]) -> tuple[float, str]:
    """Training structures/s: the median over the epochs after the first of each epoch's structures
    trained / training-loop seconds (the median keeps out an epoch that compiles a new padding
    bucket); epoch 0 alone if only one ran."""
    timed = epochs[1:] or epochs
    rate = statistics.median(e["structures_trained"] / e["epoch_time_s"] for e in timed)
    what = (f"median over epochs {timed[0]['epoch']}-{timed[-1]['epoch']}" if len(epochs) > 1
            else "epoch 0 only (includes compilation / warm-up)")
    return rate, what


def summarise(values: list[float]) -> dict[str, float]:
    """Median, range, mean and sample standard deviation (0 for one value) over the rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker == "ours":
        result = run_ours(args)
        (args.workdir / "ours.json").write_text(json.dumps(result, indent=1))
        return
    config = ours_config(args)
    epochs = int(config.num_epochs)
    atoms, chosen = load_subset(args)
    sizes = {s: len(chosen[s]) for s in SPLITS}
    out = args.out or RESULTS / ("compare_alignn_smoke.json" if args.tiny else "compare_alignn.json")
    work = Path(tempfile.mkdtemp(prefix="compare_alignn-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "reference_data"
    names = write_reference_folder(folder, atoms, chosen, config.data.target)
    print(f"{sizes} crystals, {epochs} epochs, batch {args.batch_size}, "
          f"{'tiny' if args.tiny else 'full'} model; work files in {work}", flush=True)

    forwarded = [f"--train={args.train}", f"--val={args.val}", f"--test={args.test}", f"--epochs={epochs}",
                 f"--batch_size={args.batch_size}", f"--graph_workers={args.graph_workers}"]
    forwarded += ["--tiny"] if args.tiny else []
    rounds = []
    for r in range(args.rounds):
        seed = args.seed + r
        record: dict[str, Any] = {"round": r, "seed": seed}
        ref_config = reference_config(args, config, sizes, seed)
        (work / f"reference_config_seed{seed}.json").write_text(json.dumps(ref_config, indent=1))
        sides = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")
        for side in sides:
            run_dir = work / f"round{r}_{side}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir()
            if side == "ours":
                command = [sys.executable, str(Path(__file__).resolve()), "--worker=ours",
                           f"--workdir={run_dir}", *forwarded, f"--seed={seed}"]
                process = run_process(command, run_dir / "log.txt", cwd=REPO)
                record["ours"] = {"process": process, **json.loads((run_dir / "ours.json").read_text())}
            else:
                common = [f"--data={folder}", f"--config={work / f'reference_config_seed{seed}.json'}"]
                graphs = run_process([args.ref_python, str(REFERENCE_SCRIPT), "graphs", *common,
                                      f"--out={run_dir / 'graphs.json'}"], run_dir / "graphs_log.txt")
                process = run_process([args.ref_python, str(REFERENCE_SCRIPT), "train", *common,
                                       f"--workdir={run_dir / 'train'}", f"--out={run_dir / 'train.json'}"],
                                      run_dir / "train_log.txt")
                record["reference"] = {"graphs_process": graphs, "process": process,
                                       "graphs": json.loads((run_dir / "graphs.json").read_text()),
                                       **json.loads((run_dir / "train.json").read_text())}
            print(f"round {r}: {side} done in {process['wall_s']:.0f} s", flush=True)
        rounds.append(record)

    report = build_report(args, rounds, names, sizes, epochs, ref_config, out, work)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"wrote {out}")
    if args.keep is None:
        shutil.rmtree(work)


def build_report(args: argparse.Namespace, rounds: list[dict], names: list[str], sizes: dict[str, int],
                 epochs: int, ref_config: dict, out: Path, work: Path) -> dict[str, Any]:
    """Every figure per round, medians (and means, standard deviations) over rounds, the check of
    the split and graph counts; ``ref_config`` is the last round's."""
    expected = {"train": names[:sizes["train"]], "validation": names[sizes["train"]:-sizes["test"]],
                "test": names[-sizes["test"]:]}
    figures: dict[str, dict[str, list[float]]] = {"ours": {}, "reference": {}}
    per_round = []
    for record in rounds:
        ours, ref = record["ours"], record["reference"]
        if ref["split_ids"] != expected or ref["graphs"]["ids"] != names:
            raise RuntimeError("the reference's split or order differs from the stored split's subset")
        ours_rate, ours_what = steady_rate(ours["epochs"])
        ref_rate, ref_what = steady_rate(ref["epochs"])
        same_bonds = sum(a == b for a, b in zip(ours["n_edge"], ref["graphs"]["n_edge"]))
        same_triplets = sum(a == b for a, b in zip(ours["n_triplet"], ref["graphs"]["n_triplet"]))
        differing = [{"id": name, "ours": [ours["n_edge"][k], ours["n_triplet"][k]],
                      "reference": [ref["graphs"]["n_edge"][k], ref["graphs"]["n_triplet"][k]]}
                     for k, name in enumerate(names)
                     if (ours["n_edge"][k], ours["n_triplet"][k])
                     != (ref["graphs"]["n_edge"][k], ref["graphs"]["n_triplet"][k])]
        row = {
            "seed": record["seed"],
            "ours": {"test_mae": ours["test_mae_best_val"], "graph_structures_per_s": ours["graph_structures_per_s"],
                     "train_structures_per_s": ours_rate, "peak_rss_mib": ours["process"]["peak_rss_mib"],
                     "wall_s": ours["process"]["wall_s"], "cpu_s": ours["process"]["cpu_s"]},
            "reference": {"test_mae": ref["test_mae_best_val"],
                          "graph_structures_per_s": ref["graphs"]["graph_structures_per_s"],
                          "train_structures_per_s": ref_rate, "peak_rss_mib": ref["process"]["peak_rss_mib"],
                          "wall_s": ref["process"]["wall_s"], "cpu_s": ref["process"]["cpu_s"]},
            "reference_test_mae_last_epoch": ref["test_mae_last_epoch"],
            "train_rate_epochs": {"ours": ours_what, "reference": ref_what},
            "structures_with_equal_bond_counts": same_bonds, "structures_with_equal_triplet_counts": same_triplets,
            "graph_counts_differ (bonds, triplets)": differing,
        }
        for side in ("ours", "reference"):
            for key, value in row[side].items():
                figures[side].setdefault(key, []).append(value)
        per_round.append(row)
    summary = {side: {k: summarise(v) for k, v in figures[side].items()} for side in figures}
    ratios = {k: summary["ours"][k]["median"] / summary["reference"][k]["median"]
              for k in ("graph_structures_per_s", "train_structures_per_s", "peak_rss_mib", "wall_s", "cpu_s")}
    last = rounds[-1]
    smoke = args.tiny
    return {
        "kind": ("SMOKE TEST of the script (tiny model, a few crystals and epochs): checks that both sides "
                 "run end to end; these figures are NOT the comparison" if smoke else
                 "comparison of this project's ALIGNN with the reference alignn package"),
        "command": " ".join([sys.executable, *sys.argv]),
        "commands": {"ours": last["ours"]["process"]["command"],
                     "reference_graphs": last["reference"]["graphs_process"]["command"],
                     "reference_train": last["reference"]["process"]["command"]},
        "data": {"set": "mp e_form (data/mp/flla.extxyz.gz, stored split data/mp/e_form_split.json)",
                 "subset": "first N of each stored split", "num_structures": sizes,
                 "ours_counts": last["ours"]["num_structures"],
                 "reference_training_structures_per_epoch": last["reference"]["epochs"][0]["structures_trained"],
                 "note": ("the reference's training loader drops the last partial batch (drop_last=True); "
                          "ours pads it, so ours trains on every crystal each epoch")},
        "settings": {"epochs": epochs, "batch_size": args.batch_size, "tiny": args.tiny,
                     "seeds": [record["seed"] for record in rounds],
                     "rounds": args.rounds, "ours_graph_workers": args.graph_workers,
                     "ours_model": last["ours"]["config"]["model"], "reference_config": ref_config,
                     "ours_steps_per_epoch": -(-sizes["train"] // args.batch_size),
                     "reference_steps_per_epoch": last["reference"]["steps_per_epoch"]},
        "num_parameters": {"ours": last["ours"]["num_parameters"], "reference": last["reference"]["num_parameters"]},
        "versions": {"ours": last["ours"]["versions"], "reference": last["reference"]["versions"]},
        "machine": machine(),
        "what_is_measured": {
            "test_mae": "test MAE (eV/atom) with the best-validation epoch's parameters, both sides",
            "graph_structures_per_s": ("one process, structures already in memory: ours featurize.build_store "
                                       "(k-NN bonds, line graph, store arrays); the reference "
                                       "Graph.atom_dgl_multigraph (neighbours, line graph, DGL graphs)"),
            "train_structures_per_s": ("median over the epochs after the first (ours' first epoch holds the "
                                       "XLA compilation) of structures trained / training-loop seconds; "
                                       "validation, checkpoints and logging excluded"),
            "peak_rss_mib": ("peak RSS of the training process (os.wait4): imports, graph building, "
                             "training, evaluation"),
            "wall_s": "wall seconds of the training process (same span)",
            "cpu_s": "user + system CPU seconds of the training process (same span)",
        },
        "shared_machine": SHARED_NOTE,
        "summary": summary, "ratios_ours_over_reference": ratios, "per_round": per_round, "rounds": rounds,
        "output": str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out),
        "work_files": str(work) if args.keep is not None else "deleted",
    }


def machine() -> dict[str, Any]:
    """The machine: platform, CPU model and count, memory, load averages now."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = next((line.split(":", 1)[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), "")
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "memory": memory,
            "loadavg_at_end": list(os.getloadavg()), "niceness": os.nice(0)}


def print_table(report: dict[str, Any]) -> None:
    summary, ratios = report["summary"], report["ratios_ours_over_reference"]
    if report["settings"]["tiny"]:
        print("SMOKE TEST (tiny model): not the comparison")
    print(f"{'figure':<28}{'ours':>14}{'reference':>14}{'ours/ref':>10}")
    for key, fmt in (("test_mae", ".4f"), ("graph_structures_per_s", ".1f"), ("train_structures_per_s", ".1f"),
                     ("peak_rss_mib", ".0f"), ("wall_s", ".0f"), ("cpu_s", ".0f")):
        a, b = summary["ours"][key]["median"], summary["reference"][key]["median"]
        ratio = f"{ratios[key]:.2f}" if key in ratios else ""
        print(f"{key:<28}{a:>14{fmt}}{b:>14{fmt}}{ratio:>10}")
    row = report["per_round"][-1]
    print(f"reference test MAE, last epoch: {row['reference_test_mae_last_epoch']:.4f}; structures with equal "
          f"bond / triplet counts: {row['structures_with_equal_bond_counts']} / "
          f"{row['structures_with_equal_triplet_counts']} of {sum(report['data']['num_structures'].values())}")
    print(report["shared_machine"])


if __name__ == "__main__":
    main()
