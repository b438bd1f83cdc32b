"""``python main.py predict``: predictions and GA scores for structure files.

Usage::

    python main.py predict --workdir=runs/qm9_homo mols.xyz POSCAR data.db \\
        --output=scored.extxyz --png=pictures --json=table.json

Every file is read with ``ase.io.read(path, index=":")`` (any format ASE reads; every frame).
A table (file, frame, formula, prediction, the three atoms with the highest GA score) goes to
stdout; ``--output`` writes an extended XYZ with the prediction in each frame's info (key = the
target name) and a per-atom ``ga_score`` column; ``--png`` draws each structure coloured by GA
score; ``--json`` writes the table. A file that cannot be read or a frame that cannot be
predicted is reported on stderr with its file and frame; the others are still predicted and the
exit status is 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import ase
import ase.io

EXIT_SOME_FAILED = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python main.py predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="structure files (any format ase.io.read reads)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir, or a checkpoint directory inside one")
    source.add_argument("--original-weights", help="weights of the original model (.npz or Keras .h5)")
    parser.add_argument("--target-mean", type=float, default=0.0, help="with --original-weights: target mean")
    parser.add_argument("--target-std", type=float, default=1.0, help="with --original-weights: target std")
    parser.add_argument("--output", help="extended XYZ to write (prediction in info, per-atom ga_score)")
    parser.add_argument("--png", metavar="DIR", help="directory for one GA-coloured picture per structure")
    parser.add_argument("--json", metavar="FILE", help="write the table as JSON")
    parser.add_argument("--allow-unseen-elements", action="store_true",
                        help="predict structures with elements absent from the training data")
    parser.add_argument("--batch-size", type=int, default=128, help="structures per padded batch")
    parser.add_argument("--num-workers", type=int, default=None, help="featurisation processes (default: all cores)")
    return parser.parse_args(argv)


def _png_name(path: str, frame: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).name)
    return f"{stem}_{frame}.png"


def _format_table(rows: list[dict[str, Any]], units: str) -> str:
    header = ("file", "frame", "formula", f"prediction ({units})" if units else "prediction", "top GA atoms")
    lines = [(r["file"], str(r["frame"]), r["formula"], f"{r['prediction']:.6g}",
              ", ".join(f"{a['symbol']}{a['index']} {a['ga_score']:.2f}" for a in r["top_atoms"])) for r in rows]
    widths = [max(len(h), *(len(line[c]) for line in lines)) if lines else len(h) for c, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def main(argv: list[str]) -> int:
    """Runs the command on ``argv`` (the arguments after ``predict``); returns the exit status."""
    args = parse_args(argv)
    from scannet_jax import predict, render

    options = {"batch_size": args.batch_size, "num_workers": args.num_workers}
    if args.workdir:
        predictor = predict.Predictor.from_workdir(args.workdir, **options)
    else:
        predictor = predict.Predictor.from_original(args.original_weights, mean=args.target_mean,
                                                    std=args.target_std, **options)
    errors: list[dict[str, Any]] = []
    frames: list[tuple[str, int, ase.Atoms]] = []
    for path in args.files:
        try:
            read = ase.io.read(path, index=":")
        except Exception as err:  # noqa: BLE001 - any reader failure is reported for this file
            errors.append({"file": path, "frame": None, "error": f"cannot read: {type(err).__name__}: {err}"})
            continue
        if not read:
            errors.append({"file": path, "frame": None, "error": "no structure in the file"})
        frames.extend((path, k, atoms) for k, atoms in enumerate(read))

    results = predictor.predict_each([a for _, _, a in frames], allow_unseen_elements=args.allow_unseen_elements)
    rows, scored = [], []
    for (path, frame, atoms), result in zip(frames, results):
        if isinstance(result, predict.StructureError):
            errors.append({"file": path, "frame": frame, "error": str(result)})
            continue
        rows.append({
            "file": path, "frame": frame, "formula": atoms.get_chemical_formula(), "n_atoms": len(atoms),
            "prediction": result.value,
            "top_atoms": [{"index": i, "symbol": s, "ga_score": g} for i, s, g in predict.top_atoms(atoms, result.ga_scores)],
            "ga_scores": result.ga_scores.tolist(),
        })
        out = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        out.info.update({"source_file": path, "source_frame": frame, predictor.target: result.value})
        out.arrays["ga_score"] = result.ga_scores
        scored.append(out)
        if args.png:
            Path(args.png).mkdir(parents=True, exist_ok=True)
            title = f"{rows[-1]['formula']}: {predictor.target} = {result.value:.4g} {predictor.units}".rstrip()
            render.render_ga(atoms, result.ga_scores, Path(args.png) / _png_name(path, frame), title)

    predictor.close()
    print(_format_table(rows, predictor.units))
    for e in errors:
        where = e["file"] if e["frame"] is None else f"{e['file']} frame {e['frame']}"
        print(f"error: {where}: {e['error']}", file=sys.stderr)
    if args.output and scored:
        ase.io.write(args.output, scored, format="extxyz")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"target": predictor.target, "units": predictor.units, "structures": rows, "errors": errors}, indent=1))
    if errors:
        print(f"{len(errors)} of {len(frames) + sum(e['frame'] is None for e in errors)} input(s) failed",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0
