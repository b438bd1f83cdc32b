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
deviation of the identity-setting predictions across the crystals (scale-free). What a trained
model does (without and with augmentation, and with test-time averaging) needs the training
pipeline and is not measured here.

Data: the Materials Project band-gap crystals of `data/mp/dielectric.extxyz.gz` (1,056 from the
matminer 0.3.9 archive), or with --ase a handful of `ase.build.bulk` crystals.

    python experiments/lstm_sensitivity.py
    python experiments/lstm_sensitivity.py --ase --seeds 2
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ase", action="store_true", help="use ase.build.bulk crystals instead of data/mp")
    parser.add_argument("--limit", type=int, default=None, help="first N crystals only")
    parser.add_argument("--seeds", type=int, default=3, help="random initialisations")
    parser.add_argument("--controls", type=int, default=3, help="random rotations / origin shifts per crystal")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

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
