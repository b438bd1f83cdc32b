"""Networks side by side on one Materials Project split, or on QM9 HOMO, at equal CPU budget,
with seeds.

    taskset -c 0 python experiments/compare_networks.py --set=gap --oxides \
        --networks=amdnet,megnet,scannplus --seeds=0,1,2 --budget_s=300
    taskset -c 0 python experiments/compare_networks.py --set=gap \
        --networks=scannplus,scann,alignn,megnet,lstm,lstm_augment --seeds=0,1 --budget_s=300
    taskset -c 0 python experiments/compare_networks.py --set=qm9_homo --qm9_limit=20000 \
        --networks=scannplus,scann,alignn,megnet --seeds=0,1 --budget_s=300

Each network is trained with its own recipe (``configs/mp.py``) on the same stored split:

* ``scannplus``, ``scann``: ``configs/mp.py:<set>`` (Voronoi graphs, the original's recipe);
* ``alignn``: ``<set>,alignn`` (k-NN bonds and their line graph, the reference recipe);
* ``lstm``, ``lstm_augment``: ``<set>,lstm[,augment]`` (19-neighbour lists; the source's axis-swap
  augmentation);
* ``megnet``: ``<set>,megnet`` (5 Å radius graph, the released MEGNet/AMDNet recipe);
* ``amdnet``: ``<set>,amdnet`` (the radius graph and the oxides' motif graph; oxides only).

With ``--oxides`` every network gets ``,oxides``: each stored split restricted to its oxides
(`mp.oxides`), the split AMDNet is compared on; the paper's claim (Banjade et al. 2021) is that
the motif graph helps band gaps.

``--set=qm9_homo`` trains on the first ``--qm9_limit`` molecules of QM9 (``configs/qm9.py:
homo,limit=N[,scann|,alignn|,megnet]``, its 80/10/10 subset split; the target standardised by
the training split, as in every QM9 run); the networks that apply to molecules only.

Every run is ``main.py`` in its own process with ``--config.seed=S`` and the same
``--config.max_wall_time_s`` (the training budget, including the final evaluation, featurisation
excluded: the loop's clock starts after the data is loaded; each featurisation is cached and
shared by the seeds). Compilation is excluded too: a first, untimed run of each network
(``--warmup``, its first seed, workdir ``*_warmup``) fills a persistent XLA compilation cache
(``<workdir_root>/xla_cache``) that the measured runs load their programs from; without it the
bucket shapes' compilations (4-10 s per train step on this CPU, docs/performance.md) take much of a
five-minute budget. Runs go on whatever cores the script is pinned to (one,
with ``taskset -c``, makes wall time CPU time; ``cpu_s`` is measured per run). For band gaps every
network's test predictions are clipped at 0 (``prediction_floor=0``, the AMDNet evaluation's
``max(0, p)``), so all are scored alike. Per network it also reports the parameter count, the
median training structures/s (epochs after the first two; their times are listed, as a
program the warm-up did not reach is compiled there) and, measured on its first seed's model,
the largest change of a test prediction when the structure is rotated and its atoms reordered at
random (0 up to float rounding for an invariant network). The test MAE is that of the best-validation epoch, as
``results.json`` has it (``test_mae``: over the test structures of the run's own store) and over the
test structures every network could featurise (``test_mae_common``: AMDNet leaves out an oxide whose
motifs ChemEnv cannot find, as the released code does; each run's saved model predicts the test
structures through `predict.Predictor`). The baseline predicts the training split's mean for every
test structure.

A finished run (``results.json`` with the same budget and ``cost.json``) is reused; an unfinished
workdir is deleted and run again, so an interrupted comparison continues where it stopped and
every figure has the full budget. Writes ``experiments/results/compare_<set>[_oxides].json`` (or
``--out``) and the plot of the same name in ``experiments/plots/`` (test MAE per network, one
point per seed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from ase import Atoms

from scannet_jax import atomic
from scannet_jax.configs import qm9 as qm9_config
from scannet_jax.datasets import mp, qm9
from scannet_jax.structures import to_atoms

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_enum("set", "gap", ["gap", "e_form", "qm9_homo"],
                  "the Materials Project set (configs/mp.py) or QM9 HOMO (configs/qm9.py)")
flags.DEFINE_integer("qm9_limit", 20000, "qm9_homo: the first N molecules of QM9 (configs/qm9.py's limit=N)")
flags.DEFINE_list("seeds", ["0", "1", "2"], "config.seed of each run")
flags.DEFINE_list("networks", ["amdnet", "megnet", "scannplus"], "networks compared (keys of CONFIG_ARGS)")
flags.DEFINE_bool("oxides", False, "only the oxides of the set, every split restricted to them")
flags.DEFINE_float("budget_s", 240.0, "config.max_wall_time_s of every run (s)")
flags.DEFINE_string("workdir_root", str(REPO / "runs/compare"), "parent of the runs' workdirs")
flags.DEFINE_bool("warmup", True, "first fill a persistent XLA compilation cache with one untimed run per "
                  "network, so that no measured budget pays for compilation")
flags.DEFINE_float("warmup_budget_s", 0.0, "config.max_wall_time_s of each warm-up run (s); 0 = --budget_s")
flags.DEFINE_string("out", "", "results JSON (default experiments/results/compare_<set>[_oxides].json)")

CONFIG_ARGS = {"scannplus": "{set}", "scann": "{set},scann", "alignn": "{set},alignn", "lstm": "{set},lstm",
               "lstm_augment": "{set},lstm,augment", "megnet": "{set},megnet", "amdnet": "{set},amdnet"}
# the networks that apply to molecules (the LSTM orders atoms by fractional coordinates and
# permutes lattice axes; AMDNet's motifs are oxides' cation polyhedra)
MOLECULE_NETWORKS = ("scannplus", "scann", "alignn", "megnet")


def is_qm9() -> bool:
    return FLAGS.set == "qm9_homo"


def config_file() -> Path:
    return REPO / "configs" / ("qm9.py" if is_qm9() else "mp.py")


def config_arg(network: str) -> str:
    """The config file's argument for ``network`` on the chosen set (and oxides)."""
    arg = CONFIG_ARGS[network].format(set=f"homo,limit={FLAGS.qm9_limit}" if is_qm9() else FLAGS.set)
    return arg + ",oxides" if FLAGS.oxides and network != "amdnet" else arg


def target_and_units() -> tuple[str, str]:
    if is_qm9():
        return "homo", qm9_config.TARGET_UNITS["homo"]
    return mp.DATASETS[FLAGS.set].target, mp.DATASETS[FLAGS.set].units


def study() -> str:
    return FLAGS.set + ("_oxides" if FLAGS.oxides else "")


def title() -> str:
    if is_qm9():
        return f"QM9 HOMO, first {FLAGS.qm9_limit:,} molecules"
    return f"MP {FLAGS.set}{' oxides' if FLAGS.oxides else ''}"


def compile_cache() -> Path:
    return Path(FLAGS.workdir_root) / "xla_cache"


def run_one(network: str, seed: int, workdir: Path, budget_s: float) -> dict:
    """Trains one network with one seed for ``budget_s`` (or reuses a finished run); its figures
    and costs."""
    results_file = workdir / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        if results["config"]["max_wall_time_s"] == budget_s and (workdir / "cost.json").is_file():
            return {**_figures(results), **json.loads((workdir / "cost.json").read_text()), "reused": True}
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    command = [sys.executable, str(REPO / "main.py"), f"--config={config_file()}:{config_arg(network)}",
               f"--workdir={workdir}", f"--config.seed={seed}",
               f"--config.max_wall_time_s={budget_s}", "--config.data.num_workers=1"]
    if FLAGS.set == "gap":
        command.append("--config.prediction_floor=0.0")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(compile_cache()),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    start = time.time()
    with open(workdir / "train.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{network} seed {seed}: exit {os.waitstatus_to_exitcode(status)}; see {workdir}/train.log")
    cost = {"wall_s": time.time() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024}
    atomic.write_atomically(workdir / "cost.json", lambda tmp: tmp.write_text(json.dumps(cost, indent=2)))
    return {**_figures(json.loads(results_file.read_text())), **cost, "reused": False}


def _figures(results: dict) -> dict:
    return {"test_mae": results["test_mae"], "test_rmse": results["rmse"]["test"],
            "val_mae": results["mae"]["validation"], "best_epoch": results["best_epoch"],
            "epochs_run": results["epochs_run"], "stop_reason": results["stop_reason"],
            "num_structures": results["num_structures"],
            **({"test_mae_unclipped": results["test_unclipped"]["mae"]} if "test_unclipped" in results else {})}


def read_split() -> tuple[list, dict[str, np.ndarray]]:
    """The set's structures (ASE Atoms, with an ``id`` and the target in ``info``) and the split
    every run trains on: the stored MP split, restricted to the oxides with ``--oxides``, or the
    QM9 subset's (`qm9.split_indices` with the configs' split seed)."""
    if is_qm9():
        molecules = qm9.read_qm9(limit=FLAGS.qm9_limit)
        atoms = []
        for s, structure in enumerate(molecules.structures()):
            atoms.append(to_atoms(structure))
            atoms[-1].info.update(id=f"gdb_{molecules.gdb_index[s]}", homo=molecules.targets["homo"][s])
        return atoms, qm9.split_indices(molecules.n_atoms, qm9_config.get_config("homo").split_seed)
    atoms, splits = mp.read(FLAGS.set)
    for a in atoms:
        a.info["id"] = a.info["material_id"]
    return mp.oxides(atoms, splits) if FLAGS.oxides else (atoms, splits)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def moved(atoms: Atoms, rng: np.random.Generator) -> Atoms:
    """The same structure rotated at random (its lattice with it), its atoms in a random order."""
    from scipy.spatial.transform import Rotation

    out = atoms[rng.permutation(len(atoms))]
    rotation = Rotation.random(random_state=rng).as_matrix()
    out.positions = out.positions @ rotation.T
    out.cell = out.cell.array @ rotation.T
    return out


def test_predictions(workdir: Path, structures: list, invariance: bool = False) -> tuple[dict[str, float], dict]:
    """id -> the run's best-validation prediction (its config's prediction floor
    applied), for the test structures its graph builder can featurise; with ``invariance``, also
    the parameter count and the largest change of a prediction when each structure is rotated and
    its atoms reordered at random (``max_abs_change``, target units)."""
    import jax

    from scannet_jax.predict import Predictor

    predictor = Predictor.from_workdir(workdir, num_workers=1)
    try:
        out = predictor.predict_each(structures, allow_unseen_elements=True)
        values = {a.info["id"]: p.value for a, p in zip(structures, out) if not isinstance(p, Exception)}
        extra = {}
        if invariance:
            rng = np.random.default_rng(0)
            again = predictor.predict_each([moved(a, rng) for a in structures], allow_unseen_elements=True)
            changes = [abs(q.value - values[a.info["id"]]) for a, q in zip(structures, again)
                       if not isinstance(q, Exception) and a.info["id"] in values]
            extra = {"parameters": int(sum(x.size for x in jax.tree.leaves(predictor._variables["params"]))),
                     "rotation_and_atom_order_max_abs_change": float(max(changes))}
    finally:
        predictor.close()
    return values, extra


def training_speed(workdir: Path) -> tuple[float, list[float]]:
    """Median training structures/s over the epochs after the first two (which may compile
    programs the warm-up did not; with fewer than three epochs, those after the first, or the
    first; with none, the unfinished epoch's running rate), and the first two epochs' seconds."""
    path = workdir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    epochs = [r for r in records if "val_mae" in r]
    if not epochs:
        partial = [r["train_mol_per_s"] for r in records if "running_train_loss" in r]
        return (partial[-1] if partial else float("nan")), []
    speeds = [r["train_mol_per_s"] for r in epochs[min(2, len(epochs) - 1):]]
    return float(np.median(speeds)), [r["epoch_time_s"] for r in epochs[:2]]


def common_test_maes(summary: dict, structures: list) -> dict:
    """Every run's test MAE on the test structures that every network could featurise (AMDNet
    leaves out an oxide whose motifs ChemEnv cannot find), and which those are; each network's
    parameter count, training speed and measured rotation / atom-order invariance (first seed)."""
    target, _ = target_and_units()
    truth = {a.info["id"]: float(a.info[target]) for a in structures}
    predictions = {}
    for network, s in summary.items():
        for k, run in enumerate(s["runs"]):
            predictions[network, run["seed"]], extra = test_predictions(Path(run["workdir"]), structures,
                                                                        invariance=k == 0)
            run["train_structures_per_s"], run["first_epochs_s"] = training_speed(Path(run["workdir"]))
            s.update(extra)
    common = sorted(set(truth).intersection(*map(set, predictions.values())))
    for (network, seed), values in predictions.items():
        run = next(r for r in summary[network]["runs"] if r["seed"] == seed)
        run["test_mae_common"] = float(np.mean([abs(values[m] - truth[m]) for m in common]))
    for network, s in summary.items():
        s["test_mae_common_mean"], s["test_mae_common_std"] = mean_std([r["test_mae_common"] for r in s["runs"]])
        speeds = [r["train_structures_per_s"] for r in s["runs"] if np.isfinite(r["train_structures_per_s"])]
        s["train_structures_per_s"] = float(np.median(speeds)) if speeds else float("nan")  # over runs with a record
    return {"num_structures": len(common), "left_out": sorted(set(truth) - set(common)),
            "baseline_note": "the baseline is over the whole test split"}


def baseline(atoms: list, splits: dict[str, np.ndarray]) -> dict:
    """The training split's mean predicted for every test structure."""
    target, _ = target_and_units()
    y = np.array([a.info[target] for a in atoms], np.float64)
    error = y[splits["test"]] - y[splits["train"]].mean()
    return {"test_mae": float(np.abs(error).mean()), "test_rmse": float(np.sqrt((error**2).mean())),
            "split": {k: int(len(v)) for k, v in splits.items()}}


def plot(path: Path, summary: dict, base: dict, units: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names)), 3.4), dpi=150)
    for k, name in enumerate(names):
        maes = [r["test_mae_common"] for r in summary[name]["runs"]]
        ax.scatter([k] * len(maes), maes, color="C0", zorder=3)
        ax.hlines(np.mean(maes), k - 0.25, k + 0.25, color="C1", zorder=2)
    ax.axhline(base["test_mae"], color="0.5", ls="--", label="training mean")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(f"test MAE ({units}), common test structures")
    ax.set_title(f"{title()}, {FLAGS.budget_s:.0f} s training each",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    name = {"gap": "mp_gap", "e_form": "mp_e_form", "qm9_homo": "qm9_homo"}[FLAGS.set]
    _, units = target_and_units()
    if is_qm9() and (FLAGS.oxides or set(FLAGS.networks) - set(MOLECULE_NETWORKS)):
        raise app.UsageError(f"qm9_homo: molecules, no --oxides; networks among {', '.join(MOLECULE_NETWORKS)}")
    if "amdnet" in FLAGS.networks and not FLAGS.oxides:
        raise app.UsageError("amdnet trains on oxides only: compare it with --oxides")
    atoms, splits = read_split()
    base = baseline(atoms, splits)
    print(f"{title()}: split {base['split']}; training-mean baseline test MAE "
          f"{base['test_mae']:.4f}", flush=True)
    summary = {}
    for network in FLAGS.networks:
        if FLAGS.warmup:  # the same shapes as the measured runs: every program they compile
            warm = run_one(network, int(FLAGS.seeds[0]), Path(FLAGS.workdir_root) / f"{study()}_{network}_warmup",
                           FLAGS.warmup_budget_s or FLAGS.budget_s)
            print(f"{network} warm-up (compilations cached, not reported): {warm['cpu_s']:.0f} CPU-s", flush=True)
        runs = []
        for seed in map(int, FLAGS.seeds):
            workdir = Path(FLAGS.workdir_root) / f"{study()}_{network}_s{seed}"
            run = {"seed": seed, "workdir": str(workdir), **run_one(network, seed, workdir, FLAGS.budget_s)}
            runs.append(run)
            print(f"{network} seed {seed}: test MAE {run['test_mae']:.4f} ({run['epochs_run']} epochs, best "
                  f"{run['best_epoch']}, {run['cpu_s']:.0f} CPU-s, {run['wall_s']:.0f} s wall)", flush=True)
        mean, std = mean_std([r["test_mae"] for r in runs])
        summary[network] = {"config": f"configs/{config_file().name}:{config_arg(network)}", "test_mae_mean": mean,
                            "test_mae_std": std, "runs": runs}
    common = common_test_maes(summary, [atoms[k] for k in splits["test"]])
    out = Path(FLAGS.out or REPO / f"experiments/results/compare_{study()}.json")
    result = {"set": name, "oxides_only": FLAGS.oxides, **({"qm9_limit": FLAGS.qm9_limit} if is_qm9() else {}),
              "split": base["split"], "budget_s": FLAGS.budget_s,
              "seeds": list(map(int, FLAGS.seeds)), "prediction_floor": 0.0 if FLAGS.set == "gap" else None,
              "baseline": base, "common_test_set": common, "networks": summary,
              "cpu_affinity": sorted(os.sched_getaffinity(0)), "command": " ".join(sys.argv)}
    atomic.write_atomically(out, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    plot(REPO / "experiments/plots" / f"{out.stem}.png", summary, base, units)
    for network, s in summary.items():
        print(f"{network}: test MAE {s['test_mae_mean']:.4f} ± {s['test_mae_std']:.4f} over {len(s['runs'])} seeds; "
              f"on the {common['num_structures']} common test structures {s['test_mae_common_mean']:.4f} ± "
              f"{s['test_mae_common_std']:.4f}; {s['parameters']:,} parameters, {s['train_structures_per_s']:.0f} "
              f"structures/s, rotation + atom order change {s['rotation_and_atom_order_max_abs_change']:.2g}")
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
