"""fullerene-MD HOMO from scratch vs fine-tuned from a QM9 HOMO run, at the same time budget.

Both runs use ``configs/fullerene.py:<arg>`` unchanged (same architecture, split, seed,
optimiser) except ``max_wall_time_s`` (the budget, which includes the final evaluation),
``log_every_steps`` (dense learning curves) and ``final_train_eval_limit`` (bounds the final
training-split evaluation); the fine-tuned run adds ``init_from``. They run one after the other
through ``main.py`` so that each has the whole machine; each run's command, wall and CPU time and
the load average before and after are recorded. ``--seeds`` repeats the pair with other
initialisation / data-order seeds (``config.seed``; the split's ``split_seed`` stays fixed, so
every run sees the same split).

Usage::

    python experiments/finetune_fullerene.py --init_from=runs/qm9_homo_30min --budget_s=300 --seeds=0,1

Writes ``experiments/results/finetune_fullerene.json`` and
``experiments/plots/finetune_fullerene.png`` (learning curves of both runs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init_from", default=str(REPO / "runs" / "qm9_homo_30min"),
                        help="QM9 workdir to fine-tune from; '' runs the from-scratch side only")
    parser.add_argument("--budget_s", type=float, default=300.0,
                        help="max_wall_time_s of each run (training + final evaluation), seconds")
    parser.add_argument("--config_arg", default="homo", help="argument of configs/fullerene.py")
    parser.add_argument("--seeds", default="0", help="comma-separated config.seed values, one pair of runs each")
    parser.add_argument("--log_every_steps", type=int, default=2)
    parser.add_argument("--final_train_eval_limit", type=int, default=300)
    parser.add_argument("--workdir_root", default=str(REPO / "runs" / "finetune_fullerene"),
                        help="each run's workdir is <root>/<scratch|finetuned> (emptied first)")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "finetune_fullerene.json"))
    parser.add_argument("--plot", default=str(REPO / "experiments" / "plots" / "finetune_fullerene.png"))
    return parser.parse_args(argv)


def run_one(name: str, args: argparse.Namespace, init_from: str, seed: int) -> dict:
    """Trains one side through main.py; returns its results.json plus timing and command."""
    workdir = Path(args.workdir_root) / name
    if workdir.exists():
        shutil.rmtree(workdir)  # a fresh run, not a resumed one
    command = [sys.executable, "main.py", f"--config=configs/fullerene.py:{args.config_arg}",
               f"--workdir={workdir}", f"--config.max_wall_time_s={args.budget_s}",
               f"--config.log_every_steps={args.log_every_steps}",
               f"--config.final_train_eval_limit={args.final_train_eval_limit}", f"--config.seed={seed}"]
    if init_from:
        command.append(f"--config.init_from={init_from}")
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    print(f"[{name}] {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    wall = time.time() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    results = json.loads((workdir / "results.json").read_text())
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    return {
        "command": " ".join(command),
        "workdir": str(workdir.relative_to(REPO) if workdir.is_relative_to(REPO) else workdir),
        "init_from": init_from,
        "seed": seed,
        "test_mae": results["test_mae"],
        "mae": results["mae"],
        "rmse": results["rmse"],
        "num_structures": results["num_structures"],
        "train_mae_on": results["train_mae_on"],
        "params_from": results["params_from"],
        "epochs_completed": results["epochs_run"],
        "epochs_reached": max((r["epoch_progress"] for r in lines if "epoch_progress" in r), default=0.0),
        "steps_run": results["steps_run"],
        "stop_reason": results["stop_reason"],
        "target_scaler": results["target_scaler"],
        "run_wall_time_s": results["wall_time_s"],
        "process_wall_time_s": wall,
        "process_cpu_time_s": (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "curves": {
            "interval": [[r["epoch_progress"], r["running_train_mae"]] for r in lines if "epoch_progress" in r],
            "epoch": [[r["epoch"] + 1, r["train_mae"], r["val_mae"]] for r in lines if "val_mae" in r],
        },
    }


def plot(runs: dict[str, dict], path: Path, units: str) -> None:
    """Running training MAE within epochs, and validation MAE at epoch ends, of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in runs.items():
        color = "C1" if run["init_from"] else "C0"
        marker = "so^vD"[run["seed"] % 5]
        interval = run["curves"]["interval"]
        if interval:
            ax.plot(*zip(*interval), color=color, lw=1, alpha=0.7, label=f"{name}: running train MAE")
        epochs = run["curves"]["epoch"]
        if epochs:
            ax.plot([e[0] for e in epochs], [e[2] for e in epochs], marker, color=color, ms=6,
                    label=f"{name}: validation MAE (epoch end)")
        ax.axhline(run["test_mae"], color=color, ls="--", lw=1,
                   label=f"{name}: test MAE {run['test_mae']:.4f} {units} ({run['params_from']})")
    ax.set(xlabel="epoch", ylabel=f"HOMO MAE ({units})", yscale="log",
           title="fullerene-MD HOMO, same wall-time budget: from scratch vs fine-tuned from QM9")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        runs[f"scratch_seed{seed}"] = run_one(f"scratch_seed{seed}", args, "", seed)
        if args.init_from:
            runs[f"finetuned_seed{seed}"] = run_one(f"finetuned_seed{seed}", args,
                                                    str(Path(args.init_from).absolute()), seed)
    units = "eV"
    summary = {}
    for side, fine_tuned in (("scratch", False), ("finetuned", True)):
        maes = [run["test_mae"] for run in runs.values() if bool(run["init_from"]) == fine_tuned]
        if maes:
            summary[side] = {"test_mae": maes, "mean": float(np.mean(maes)), "std": float(np.std(maes)),
                             "n": len(maes)}
    print(f"\n{'run':<16} {'test MAE (eV)':>14} {'val MAE':>9} {'epochs':>7} {'steps':>6} {'wall s':>7} "
          f"{'CPU s':>7}  load before/after")
    for name, run in runs.items():
        print(f"{name:<16} {run['test_mae']:>14.5f} {run['mae']['validation']:>9.5f} "
              f"{run['epochs_reached']:>7.2f} {run['steps_run']:>6d} {run['process_wall_time_s']:>7.0f} "
              f"{run['process_cpu_time_s']:>7.0f}  {run['loadavg_before'][0]:.2f}/{run['loadavg_after'][0]:.2f}")
    out = {
        "budget_s": args.budget_s,
        "budget_means": "config.max_wall_time_s of each run: wall time incl. data loading, compilation "
                        "and the (estimated) final evaluation; runs one after the other",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "config": f"configs/fullerene.py:{args.config_arg}",
        "machine": {"cpu_count": os.cpu_count()},
        "summary": summary,
        "runs": runs,
    }
    for side, stats in summary.items():
        print(f"{side}: test MAE {stats['mean']:.5f} ± {stats['std']:.5f} eV over {stats['n']} seed(s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(runs, Path(args.plot), units)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
