"""Setting sensitivity of the LSTM neighbour-list model (zoo-reference.md §3), randomly initialised.

The source's model orders the atoms by fractional coordinates, so its prediction depends on the
crystal's setting (§3.2, "update"). This measures, for randomly initialised `NeighbourListLSTM`s
(several seeds), the spread of the prediction over the six permutations of the lattice axes of
the same crystal (same atoms, same Cartesian positions), over the source's augmentation settings
(identity and the xy, yz, xz swaps, identical settings dropped), and, as controls, over random
rotations with atom reorderings (the model should be invariant: the neighbour lists and
fractional coordinates do not change) and over random origin shifts (which change the fractional
coordinates and hence the order, so it is not invariant to them either).

A random model's output scale is arbitrary, so spreads are reported relative to the standard
deviation of the identity-setting predictions across the crystals (scale-free).

With ``--workdirs`` it measures trained models instead, through `predict.Predictor` (the path a
user predicts with): for each training workdir (e.g. ``configs/mp.py:gap,lstm`` and
``gap,lstm,augment``) and the test split of the band-gap set, each crystal is predicted in the six
settings made by permuting its lattice axes (the cell's rows reordered, the atoms where they are),
without and with the test-time averaging over the source's swaps (``average_settings``). Reported
in eV: the range and std of the six predictions per crystal, and the test MAE of the original
setting, of the mean over the six, and with the averaging. Writes
``experiments/results/lstm_sensitivity_trained.json``.

Data: the Materials Project band-gap crystals of `data/mp/dielectric.extxyz.gz` (1,056 from the
matminer 0.3.9 archive), or with --ase a handful of `ase.build.bulk` crystals.

    python experiments/lstm_sensitivity.py
    python experiments/lstm_sensitivity.py --ase --seeds 2
    python experiments/lstm_sensitivity.py --workdirs runs/compare/gap_lstm_s0 runs/compare/gap_lstm_augment_s0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import ase
import ase.io
import jax
import numpy as np
from ase.build import bulk
from scipy.spatial.transform import Rotation

from scannet_jax import neighbor_lists as nl
from scannet_jax.lstm import NeighbourListLSTM

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "lstm_sensitivity.json"
TRAINED_RESULTS = ROOT / "experiments" / "results" / "lstm_sensitivity_trained.json"
MP_FILE = ROOT / "data" / "mp" / "dielectric.extxyz.gz"


def ase_crystals() -> list[ase.Atoms]:
    return [bulk("NaCl", "rocksalt", a=5.64), bulk("Si", "diamond", a=5.43), bulk("GaAs", "zincblende", a=5.65),
            bulk("ZnO", "wurtzite", a=3.25, c=5.2), bulk("MgO", "rocksalt", a=4.21, cubic=True),
            bulk("Ti", "hcp", a=2.95, c=4.68), bulk("Cu", "fcc", a=3.6, orthorhombic=True),
            bulk("CsCl", "cesiumchloride", a=4.12)]


def setting_inputs(atoms: ase.Atoms, lists: nl.NeighbourLists, axes) -> nl.SequenceInputs:
    return nl.sequence_inputs(atoms.numbers, lists, nl.atom_order(atoms.positions, atoms.cell.array, True, axes))


def predict(model: NeighbourListLSTM, params, structures: list[nl.SequenceInputs], num_atoms: int,
            batch_size: int = 512) -> np.ndarray:
    apply = jax.jit(model.apply)
    batch_size = min(batch_size, len(structures))
    out = []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start:start + batch_size]
        out.append(np.asarray(apply(params, **nl.pad_sequences(chunk, num_atoms, batch_size)))[:len(chunk)])
    return np.concatenate(out)


def spread_stats(predictions: np.ndarray, scale: float) -> dict[str, float]:
    """predictions [C, S] per crystal and variant; range and std over variants, relative to `scale`."""
    ranges = predictions.max(1) - predictions.min(1)
    return {"mean_range_rel": float(ranges.mean() / scale), "max_range_rel": float(ranges.max() / scale),
            "mean_std_rel": float(predictions.std(1).mean() / scale),
            "fraction_changed": float((ranges > 1e-6 * scale).mean())}


def permuted_setting(atoms: ase.Atoms, axes: tuple[int, int, int]) -> ase.Atoms:
    """The same crystal with lattice vectors ``cell[axes]``: atoms at the same positions."""
    out = atoms.copy()
    out.set_cell(atoms.cell.array[list(axes)], scale_atoms=False)
    return out


def trained(workdirs: list[Path], out: Path) -> None:
    """The six-permutation spread and test MAEs of trained models (see the module docstring)."""
    from scannet_jax.datasets import mp
    from scannet_jax.predict import Predictor

    atoms, splits = mp.read("gap")
    crystals = [atoms[k] for k in splits["test"]]
    y = np.array([a.info["band_gap"] for a in crystals])
    runs = []
    for workdir in workdirs:
        config = json.loads((workdir / "config.json").read_text())
        row = {"workdir": str(workdir), "augment": bool(config["model"].get("augment", False)),
               "test_crystals": len(crystals)}
        for averaged in (False, True):
            predictor = Predictor.from_workdir(workdir, num_workers=1, average_settings=averaged)
            try:
                predictions = np.array([[p.value for p in predictor.predict_each(
                    [permuted_setting(a, axes) for a in crystals])] for axes in nl.AXIS_PERMUTATIONS]).T  # [C, 6]
            finally:
                predictor.close()
            ranges = predictions.max(1) - predictions.min(1)
            row["averaged" if averaged else "single_setting"] = {
                "six_permutations_mean_range_ev": float(ranges.mean()),
                "six_permutations_max_range_ev": float(ranges.max()),
                "six_permutations_mean_std_ev": float(predictions.std(1).mean()),
                "fraction_changed": float((ranges > 1e-4).mean()),
                "test_mae_original_setting_ev": float(np.abs(predictions[:, 0] - y).mean()),
                "test_mae_mean_of_six_ev": float(np.abs(predictions.mean(1) - y).mean())}
        runs.append(row)
        for key in ("single_setting", "averaged"):
            r = row[key]
            print(f"{workdir.name} ({'augmented' if row['augment'] else 'not augmented'}), {key}: six-permutation "
                  f"range {r['six_permutations_mean_range_ev']:.4f} eV (max {r['six_permutations_max_range_ev']:.3f}), "
                  f"test MAE {r['test_mae_original_setting_ev']:.4f} eV (mean of six "
                  f"{r['test_mae_mean_of_six_ev']:.4f})")
    result = {"experiment": "lstm_sensitivity_trained", "data": "MP band gap, test split (data/mp/dielectric_split.json)",
              "runs": runs, "note": "single_setting: predict as is; averaged: predict --average-settings "
              "(the mean over the source's swaps of each setting)",
              "machine": {"platform": platform.platform(), "jax": jax.__version__, "load_average": os.getloadavg()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ase", action="store_true", help="use ase.build.bulk crystals instead of data/mp")
    parser.add_argument("--limit", type=int, default=None, help="first N crystals only")
    parser.add_argument("--seeds", type=int, default=3, help="random initialisations")
    parser.add_argument("--controls", type=int, default=3, help="random rotations / origin shifts per crystal")
    parser.add_argument("--workdirs", type=Path, nargs="*", default=[],
                        help="trained lstm workdirs: measure them instead (see the module docstring)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.workdirs:
        trained(args.workdirs, args.out or TRAINED_RESULTS)
        return
    args.out = args.out or RESULTS

    if args.ase or not MP_FILE.exists():
        crystals, source = ase_crystals(), "ase.build.bulk (8 crystals)"
    else:
        crystals = ase.io.read(MP_FILE, index=":")
        source = f"{MP_FILE.relative_to(ROOT)} (Materials Project band-gap crystals, matminer 0.3.9)"
    crystals = crystals[:args.limit]
    num_atoms = max(len(a) for a in crystals)
    rng = np.random.default_rng(0)

    start = time.perf_counter()
    lists = [nl.neighbour_lists(a) for a in crystals]
    lists_s = time.perf_counter() - start
    swaps = [nl.equivalent_settings(a.numbers, a.positions, a.cell.array) for a in crystals]
    distinct = [nl.equivalent_settings(a.numbers, a.positions, a.cell.array, nl.AXIS_PERMUTATIONS) for a in crystals]
    permuted = [[setting_inputs(a, l, p) for p in nl.AXIS_PERMUTATIONS] for a, l in zip(crystals, lists)]
    distinct_orders = [len({tuple(s.order) for s in row}) for row in permuted]

    controls_rot, controls_shift = [], []
    for a in crystals:
        for _ in range(args.controls):
            moved = a[rng.permutation(len(a))]
            moved.set_cell(moved.cell.array @ Rotation.random(random_state=rng).as_matrix().T, scale_atoms=True)
            controls_rot.append(setting_inputs(moved, nl.neighbour_lists(moved), nl.IDENTITY))
            shifted = a.copy()
            shifted.positions += rng.random(3) @ a.cell.array
            controls_shift.append(setting_inputs(shifted, nl.neighbour_lists(shifted), nl.IDENTITY))

    per_seed = []
    model = NeighbourListLSTM()
    for seed in range(args.seeds):
        params = model.init(jax.random.key(seed), **nl.pad_sequences(permuted[0][:1], num_atoms))
        flat = [s for row in permuted for s in row]
        y_perm = predict(model, params, flat, num_atoms).reshape(len(crystals), 6)
        scale = float(y_perm[:, 0].std())
        swap_index = [[nl.AXIS_PERMUTATIONS.index(p) for p in kept] for kept in swaps]
        y_swaps = [y_perm[c, idx] for c, idx in enumerate(swap_index)]
        swap_ranges = np.array([y.max() - y.min() for y in y_swaps])
        averaged = np.array([y.mean() for y in y_swaps])
        y_rot = predict(model, params, controls_rot, num_atoms).reshape(len(crystals), args.controls)
        y_shift = predict(model, params, controls_shift, num_atoms).reshape(len(crystals), args.controls)
        per_seed.append({
            "seed": seed,
            "prediction_std_across_crystals": scale,
            "six_permutations": spread_stats(y_perm, scale),
            "source_swaps": {"mean_range_rel": float(swap_ranges.mean() / scale),
                             "max_range_rel": float(swap_ranges.max() / scale),
                             "mean_abs_average_minus_identity_rel":
                                 float(np.abs(averaged - y_perm[:, 0]).mean() / scale)},
            "rotation_and_atom_order": {"max_abs_diff_rel": float(
                np.abs(y_rot - y_perm[:, :1]).max() / scale)},
            "origin_shift": spread_stats(np.concatenate([y_perm[:, :1], y_shift], 1), scale),
        })

    def mean_over_seeds(path: tuple[str, str]) -> float:
        return float(np.mean([s[path[0]][path[1]] for s in per_seed]))

    result = {
        "experiment": "lstm_sensitivity",
        "data": source,
        "num_crystals": len(crystals),
        "atoms_per_crystal": {"mean": float(np.mean([len(a) for a in crystals])), "max": num_atoms},
        "model": {"class": "NeighbourListLSTM", "embedding_dim": model.embedding_dim,
                  "atom_features": model.atom_features, "crystal_features": model.crystal_features,
                  "head_features": list(model.head_features), "centre_factor": model.centre_factor,
                  "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
                  "initialisation": "random (flax defaults), untrained"},
        "settings": {
            "source_swaps_kept_histogram": {str(k): int(v) for k, v in
                                            zip(*np.unique([len(s) for s in swaps], return_counts=True))},
            "six_permutations_distinct_histogram": {str(k): int(v) for k, v in
                                                    zip(*np.unique([len(s) for s in distinct], return_counts=True))},
            "six_permutations_distinct_atom_orders_histogram": {
                str(k): int(v) for k, v in zip(*np.unique(distinct_orders, return_counts=True))},
        },
        "neighbour_lists_per_s": len(crystals) / lists_s,
        "per_seed": per_seed,
        "summary": {
            "six_permutations_mean_range_rel": mean_over_seeds(("six_permutations", "mean_range_rel")),
            "six_permutations_mean_std_rel": mean_over_seeds(("six_permutations", "mean_std_rel")),
            "six_permutations_fraction_changed": mean_over_seeds(("six_permutations", "fraction_changed")),
            "source_swaps_mean_range_rel": mean_over_seeds(("source_swaps", "mean_range_rel")),
            "origin_shift_mean_range_rel": mean_over_seeds(("origin_shift", "mean_range_rel")),
            "rotation_and_atom_order_max_abs_diff_rel": max(
                s["rotation_and_atom_order"]["max_abs_diff_rel"] for s in per_seed),
        },
        "note": ("Spreads are relative to the std of the identity-setting predictions across the crystals "
                 "(a random model's output scale is arbitrary). Trained-model figures (without and with the "
                 "axis-swap augmentation, and with test-time averaging) need the training pipeline."),
        "machine": {"platform": platform.platform(), "jax": jax.__version__, "device": str(jax.devices()[0]),
                    "load_average": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"data: {source}; {len(crystals)} crystals, {num_atoms} atoms at most; "
          f"neighbour lists {result['neighbour_lists_per_s']:.0f} crystals/s")
    print(f"source swaps kept (settings per crystal): {result['settings']['source_swaps_kept_histogram']}; "
          f"distinct atom orders over the six permutations: "
          f"{result['settings']['six_permutations_distinct_atom_orders_histogram']}")
    print("seed | pred std | 6-perm range/std (mean, max) | changed | swaps range | origin shift range | rot+order")
    for s in per_seed:
        p, o = s["six_permutations"], s["origin_shift"]
        print(f"{s['seed']:4d} | {s['prediction_std_across_crystals']:.3g} | {p['mean_range_rel']:.3f}, "
              f"{p['max_range_rel']:.3f} | {p['fraction_changed']:.2f} | {s['source_swaps']['mean_range_rel']:.3f} | "
              f"{o['mean_range_rel']:.3f} | {s['rotation_and_atom_order']['max_abs_diff_rel']:.1e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
