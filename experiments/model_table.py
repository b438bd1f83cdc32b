"""The README's model table: every network on every task it applies to, from the comparison runs.

    python experiments/model_table.py          # prints the Markdown table, writes the JSON

Reads the results of `compare_networks.py` (``experiments/results/compare_<study>.json``; the
default studies are ``e_form``, ``gap``, ``qm9_homo``, ``gap_oxides`` and ``e_form_oxides``, the splits AMDNet
applies to) and writes one row per (task, network): parameters, median training structures/s,
the test MAE of each seed (best-validation epoch, on the test structures every network of the
study could featurise) with its mean ± sample standard deviation, and the largest change of a
test prediction under a random rotation and reordering of the atoms (measured on the first
seed's model). Each study's training-mean baseline comes first. Writes
``experiments/results/model_table.json`` (the rows, and where each came from).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scannet_jax import atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
TASKS = {"mp_e_form": ("MP formation energy", "eV/atom"), "mp_gap": ("MP band gap", "eV"),
         "qm9_homo": ("QM9 HOMO", "eV")}
NAMES = {"scannplus": "SCANN+", "scann": "SCANN", "alignn": "ALIGNN", "megnet": "MEGNet", "amdnet": "AMDNet",
         "lstm": "LSTM", "lstm_augment": "LSTM + axis swaps"}


def task_name(result: dict) -> str:
    name, units = TASKS[result["set"]]
    if result["set"] == "qm9_homo":
        name += f" (first {result['qm9_limit']:,} molecules)"
    return f"{name}{' oxides' if result['oxides_only'] else ''} ({units})"


def rows(result: dict, source: str) -> list[dict]:
    """The study's baseline row and one row per network."""
    split = result["split"]
    common = result["common_test_set"]
    out = [{"task": task_name(result), "network": "training mean", "test_mae_mean": result["baseline"]["test_mae"],
            "split": split, "budget_s": result["budget_s"], "source": source}]
    for network, s in result["networks"].items():
        out.append({"task": task_name(result), "network": NAMES[network], "config": s["config"],
                    "parameters": s["parameters"], "train_structures_per_s": s["train_structures_per_s"],
                    "test_mae_per_seed": {r["seed"]: r["test_mae_common"] for r in s["runs"]},
                    "test_mae_mean": s["test_mae_common_mean"], "test_mae_std": s["test_mae_common_std"],
                    "epochs_run": [r["epochs_run"] for r in s["runs"]],
                    "cpu_s": [round(r["cpu_s"]) for r in s["runs"]],
                    "rotation_and_atom_order_max_abs_change": s["rotation_and_atom_order_max_abs_change"],
                    "test_structures": common.get("num_structures", common.get("num_crystals")),
                    "split": split, "budget_s": result["budget_s"], "source": source})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| task | network | parameters | epochs in the budget | training structures/s | test MAE per seed | "
             "mean ± std | max change, rotated + reordered |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
        if "parameters" not in r:
            lines.append(f"| {r['task']} | {r['network']} | | | | | {r['test_mae_mean']:.3f} | |")
            continue
        seeds = " / ".join(f"{v:.3f}" for v in r["test_mae_per_seed"].values())
        epochs = f"{min(r['epochs_run'])}–{max(r['epochs_run'])}" if len(set(r["epochs_run"])) > 1 else r["epochs_run"][0]
        lines.append(f"| {r['task']} | {r['network']} | {r['parameters']:,} | {epochs} | {r['train_structures_per_s']:.0f} | "
                     f"{seeds} | {r['test_mae_mean']:.3f} ± {r['test_mae_std']:.3f} | "
                     f"{r['rotation_and_atom_order_max_abs_change']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", default="e_form,gap,qm9_homo,gap_oxides,e_form_oxides",
                        help="comma-separated <study> of experiments/results/compare_<study>.json")
    parser.add_argument("--out", default=str(RESULTS / "model_table.json"))
    args = parser.parse_args()
    table = []
    for study in args.studies.split(","):
        path = RESULTS / f"compare_{study}.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no such file; run experiments/compare_networks.py for {study} first")
        table += rows(json.loads(path.read_text()), str(path.relative_to(REPO)))
    atomic.write_atomically(Path(args.out), lambda tmp: tmp.write_text(json.dumps(table, indent=2)))
    print(markdown(table))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
