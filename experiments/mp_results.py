"""Figures of SCANN+ runs on the Materials Project sets, beside the mean-absolute-deviation baseline.

    python experiments/mp_results.py --workdirs=runs/mp_e_form_1core,runs/mp_gap_1core \
        --picture_workdir=runs/mp_e_form_1core

For each training workdir (``main.py --config=configs/mp.py:<set>``): test MAE and RMSE of the
best-validation parameters (``results.json``), the baseline that predicts the training split's
mean for every test crystal (its MAE is the test targets' mean absolute deviation from that mean),
epochs, steps and wall time; its parity plot and learning curves are copied to
``experiments/plots/mp_<set>_*.png``. With ``--picture_workdir``, the test split's perovskite
oxides ABO3 (5 atoms) are predicted and one (``--picture_material``) is drawn coloured by GA
score (``docs/images/ga_<formula>_mp.png``). Writes ``experiments/results/mp_scannplus.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from absl import app, flags

from scannet_jax import render
from scannet_jax.datasets import mp
from scannet_jax.predict import Predictor

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", [], "training workdirs of configs/mp.py runs")
flags.DEFINE_string("picture_workdir", "", "workdir whose model draws a perovskite oxide of the test split")
flags.DEFINE_string("picture_material", "mp-18841", "material_id of the perovskite drawn (default cubic LaCrO3)")
flags.DEFINE_string("out", str(REPO / "experiments/results/mp_scannplus.json"), "results JSON")

SET_OF_DATASET = {"mp_e_form": "e_form", "mp_gap": "gap"}


def baseline(name: str) -> dict[str, float]:
    """MAE / RMSE on the test split of predicting the training split's mean target."""
    structures, splits = mp.read(name)
    target = mp.DATASETS[name].target
    y = np.array([a.info[target] for a in structures], np.float64)
    mean = y[splits["train"]].mean()
    error = y[splits["test"]] - mean
    return {"train_mean": float(mean), "test_mae": float(np.abs(error).mean()),
            "test_rmse": float(np.sqrt((error**2).mean())), "test_crystals": int(len(error))}


def summarise(workdir: Path) -> dict:
    """The run's figures (``results.json``, ``metrics.jsonl``) and its baseline; copies the plots."""
    config = json.loads((workdir / "config.json").read_text())
    name = SET_OF_DATASET[config["data"]["dataset"]]
    results = json.loads((workdir / "results.json").read_text())
    epochs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
              if '"val_mae"' in line]
    plots = {}
    for plot in ("parity_test.png", "learning_curves.png"):
        target = REPO / "experiments/plots" / f"mp_{name}_{plot}"
        shutil.copyfile(workdir / plot, target)
        plots[plot] = str(target.relative_to(REPO))
    return {"set": name, "target": results["target"], "units": results["units"], "model": config["model"]["name"],
            "test_mae": results["mae"]["test"], "test_rmse": results["rmse"]["test"],
            "validation_mae": results["mae"]["validation"], "train_mae": results["mae"]["train"],
            "num_structures": results["num_structures"], "best_epoch": results["best_epoch"],
            "epochs_run": results["epochs_run"], "steps_run": results["steps_run"],
            "stop_reason": results["stop_reason"], "wall_time_s": results["wall_time_s"],
            "epoch_time_s_median": float(np.median([e["epoch_time_s"] for e in epochs])) if epochs else None,
            "code_version": results["code_version"], "baseline_mean_of_training": baseline(name), "plots": plots}


def perovskite_picture(workdir: Path) -> dict:
    """Predicts the test split's ABO3 perovskites (5 atoms) and draws ``--picture_material``."""
    config = json.loads((workdir / "config.json").read_text())
    name = SET_OF_DATASET[config["data"]["dataset"]]
    structures, splits = mp.read(name)
    target, units = mp.DATASETS[name].target, mp.DATASETS[name].units
    chosen = [structures[i] for i in splits["test"]
              if len(structures[i]) == 5 and structures[i].get_chemical_symbols().count("O") == 3
              and len(set(structures[i].get_chemical_symbols())) == 3]
    if not chosen:
        raise SystemExit(f"{name}: no ABO3 perovskite in the test split")
    predictor = Predictor.from_workdir(workdir)
    predictions = predictor(chosen)
    rows = [{"material_id": a.info["material_id"], "formula": a.get_chemical_formula(), "dft": float(a.info[target]),
             "predicted": float(p.value), "ga_scores": {f"{s}{k}": round(float(g), 4) for k, (s, g) in
                                                        enumerate(zip(a.get_chemical_symbols(), p.ga_scores))}}
            for a, p in zip(chosen, predictions)]
    drawn = [k for k, row in enumerate(rows) if row["material_id"] == FLAGS.picture_material]
    if not drawn:
        raise SystemExit(f"{FLAGS.picture_material} is not an ABO3 perovskite of the {name} test split: "
                         f"{[row['material_id'] for row in rows]}")
    row, atoms = rows[drawn[0]], chosen[drawn[0]]
    path = REPO / "docs/images" / f"ga_{row['formula']}_mp.png"
    render.render_ga(atoms, predictions[drawn[0]].ga_scores, path, rotation="-75x,-20y,0z",
                     title=(f"{row['formula']} ({row['material_id']}, test split)\npredicted "
                            f"{row['predicted']:.3f}, DFT {row['dft']:.3f} {units}"))
    return {"picture": str(path.relative_to(REPO)), "drawn": row["material_id"], "perovskites": rows}


def main(argv: list[str]) -> None:
    del argv
    out = {"command": "python experiments/mp_results.py " + " ".join(f"--{k}={v}" for k, v in (
        ("workdirs", ",".join(FLAGS.workdirs)), ("picture_workdir", FLAGS.picture_workdir)) if v),
        "runs": [summarise(Path(w)) for w in FLAGS.workdirs]}
    if FLAGS.picture_workdir:
        out["perovskite"] = perovskite_picture(Path(FLAGS.picture_workdir))
    Path(FLAGS.out).write_text(json.dumps(out, indent=1))
    for run in out["runs"]:
        b = run["baseline_mean_of_training"]
        print(f"{run['set']}: test MAE {run['test_mae']:.4f} RMSE {run['test_rmse']:.4f} {run['units']} "
              f"(baseline MAE {b['test_mae']:.4f} RMSE {b['test_rmse']:.4f}); {run['epochs_run']} epochs, "
              f"best {run['best_epoch']}, {run['wall_time_s'] / 60:.0f} min")
    for row in out.get("perovskite", {}).get("perovskites", []):
        print(f"{row['formula']} {row['material_id']}: predicted {row['predicted']:.3f}, DFT {row['dft']:.3f}")


if __name__ == "__main__":
    app.run(main)
