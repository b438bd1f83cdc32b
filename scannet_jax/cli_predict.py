"""``scannet-jax predict``: predictions and GA scores for structure files.

Usage::

    scannet-jax predict --workdir=runs/qm9_homo mols.xyz POSCAR data.db \\
        --output=scored.extxyz --png=pictures --json=table.json
    scannet-jax predict --model=scannplus-qm9-homo mols.xyz --png=pictures
    scannet-jax predict --list-models

(``python main.py predict ...`` in a checkout is the same command.)

Every file is read with ``datasets.xyz.iread_frames`` (any format ASE reads, every frame; a CIF
one data block at a time, a block with a partially occupied site refused naming the site).
A table (file, frame, formula, prediction, the three atoms with the highest GA score) goes to
stdout; ``--output`` writes an extended XYZ with the prediction in each frame's info (key = the
target name) and a per-atom ``ga_score`` column; ``--png`` draws each structure coloured by GA
score; ``--json`` writes the table. A file that cannot be read or a frame that cannot be
predicted is reported on stderr with its file and frame; the others are still predicted and the
exit status is 2 (also when a prediction is not finite).

Nothing is lost or half-written: output locations are checked before any work, files are written
to a temporary name and renamed into place, inputs are opened read-only (an SQLite file that is
not an ASE database is refused, not modified), picture names are unique per input path, and a
file name containing ``@`` is a file name (not ASE's ``file@index`` syntax). Structures with no
neighbour within the cutoff, or larger than any structure the model was trained on, are
predicted with a warning naming the reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sqlite3
import sys
from pathlib import Path
from typing import Any

import ase
import ase.io

from scannet_jax import atomic

EXIT_SOME_FAILED = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scannet-jax predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="structure files (any format ase.io.read reads)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="training workdir, or a checkpoint directory inside one")
    source.add_argument("--model", help="a pre-built model shipped with the package (see --list-models)")
    source.add_argument("--list-models", action="store_true", help="list the pre-built models and exit")
    source.add_argument("--original-weights", help="weights of the original model (.npz or Keras .h5)")
    parser.add_argument("--target-mean", type=float, default=0.0, help="with --original-weights: target mean")
    parser.add_argument("--target-std", type=float, default=1.0, help="with --original-weights: target std")
    parser.add_argument("--output", help="extended XYZ to write (prediction in info, per-atom ga_score)")
    parser.add_argument("--png", metavar="DIR", help="directory for one GA-coloured picture per structure")
    parser.add_argument("--json", metavar="FILE", help="write the table as JSON")
    parser.add_argument("--allow-unseen-elements", action="store_true",
                        help="predict structures with elements absent from the training data")
    parser.add_argument("--average-settings", action="store_true",
                        help="lstm models: average the prediction over the crystal settings made by swapping "
                             "two lattice axes (test-time averaging)")
    parser.add_argument("--batch-size", type=int, default=128, help="structures per padded batch")
    parser.add_argument("--num-workers", type=int, default=None, help="featurisation processes (default: all cores)")
    args = parser.parse_args(argv)
    if not args.list_models and not args.files:
        parser.error("the structure files to predict are required")
    return args


def list_models() -> str:
    """A table of the pre-built models: name, target, units, test MAE, training cost."""
    from scannet_jax import pretrained

    rows = [("name", "target", "test MAE", "structures (train/val/test)", "training")]
    for name in pretrained.names():
        card = pretrained.card(name)
        n = card["structures"]
        rows.append((name, card["target"], f"{card['mae']['test']:.4g} {card['units']}".rstrip(),
                     f"{n['train']}/{n['validation']}/{n['test']}", card.get("training", "")))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _png_name(path: str, frame: int) -> str:
    """``<file name>_<short hash of the absolute path>_<frame>.png``: unique per input path."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).name)
    digest = hashlib.sha1(str(Path(path).absolute()).encode()).hexdigest()[:6]
    return f"{stem}_{digest}_{frame}.png"


def _check_output(path: str | None, what: str) -> None:
    """Refuses, before any work, an output whose directory is missing or not writable."""
    if not path:
        return
    folder = Path(path).absolute().parent
    if not folder.is_dir():
        raise SystemExit(f"error: {what} {path}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"error: {what} {path}: directory {folder} is not writable")


def _read_frames(path: str) -> tuple[list[tuple[int, ase.Atoms]], list[tuple[int | None, str]]]:
    """The frames of ``path`` (read-only, `xyz.iread_frames`) as (frame, atoms), and the
    problems as (frame or None for the file, reason): a frame that cannot be used (e.g. a CIF
    block with partial occupancy) and the reader failure that stopped reading, if any (the
    frames before it are kept)."""
    from scannet_jax.datasets import xyz

    if Path(path).suffix == ".db" and Path(path).is_file():
        uri = f"file:{Path(path).absolute()}?mode=ro"
        try:
            with sqlite3.connect(uri, uri=True) as db:
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.Error as err:
            return [], [(None, f"cannot read: not an SQLite database ({err})")]
        if "systems" not in tables:
            return [], [(None, "cannot read: an SQLite file but not an ASE database (no 'systems' table); "
                               "left unmodified")]
    frames: list[tuple[int, ase.Atoms]] = []
    errors: list[tuple[int | None, str]] = []
    try:
        for frame, item in enumerate(xyz.iread_frames(path)):
            if isinstance(item, xyz.FrameError):
                errors.append((item.frame, item.reason))
            else:
                frames.append((frame, item))
    except xyz.FrameError as err:
        errors.append((err.frame, err.reason))
    if not frames and not errors:
        errors.append((None, "no structure in the file"))
    return frames, errors


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
    if args.list_models:
        print(list_models())
        return 0
    _check_output(args.output, "--output")
    _check_output(args.json, "--json")
    if args.png and Path(args.png).exists() and not Path(args.png).is_dir():
        raise SystemExit(f"error: --png {args.png}: exists and is not a directory")
    from scannet_jax import predict, render

    options = {"batch_size": args.batch_size, "num_workers": args.num_workers}
    if args.average_settings:
        options["average_settings"] = True
    try:
        if args.workdir:
            predictor = predict.Predictor.from_workdir(args.workdir, **options)
        elif args.model:
            predictor = predict.Predictor.pretrained(args.model, **options)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    if args.original_weights:
        predictor = predict.Predictor.from_original(args.original_weights, mean=args.target_mean,
                                                    std=args.target_std, **options)
    errors: list[dict[str, Any]] = []
    warnings: list[dict[str, Any]] = []
    frames: list[tuple[str, int, ase.Atoms]] = []
    for path in args.files:
        read, problems = _read_frames(path)
        errors.extend({"file": path, "frame": frame, "error": reason} for frame, reason in problems)
        frames.extend((path, k, atoms) for k, atoms in read)
    num_inputs = len(frames) + len(errors)  # every problem so far is an input left unread

    results = predictor.predict_each([a for _, _, a in frames], allow_unseen_elements=args.allow_unseen_elements)
    scores_ga = predictor.spec.node_scores is not None
    rows, scored = [], []
    for (path, frame, atoms), result in zip(frames, results):
        if isinstance(result, predict.StructureError):
            errors.append({"file": path, "frame": frame, "error": str(result)})
            continue
        if not math.isfinite(result.value):
            errors.append({"file": path, "frame": frame, "error": f"the prediction is not finite ({result.value})"})
            continue
        for reason in result.warnings:
            warnings.append({"file": path, "frame": frame, "warning": reason})
        rows.append({
            "file": path, "frame": frame, "formula": atoms.get_chemical_formula(), "n_atoms": len(atoms),
            "prediction": result.value,
            "top_atoms": ([{"index": i, "symbol": s, "ga_score": g}
                           for i, s, g in predict.top_atoms(atoms, result.ga_scores)] if scores_ga else []),
            "ga_scores": result.ga_scores.tolist() if scores_ga else None,
            "warnings": list(result.warnings),
        })
        out = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        out.info.update({"source_file": path, "source_frame": frame, predictor.target: result.value})
        if scores_ga:
            out.arrays["ga_score"] = result.ga_scores
        scored.append(out)
        if args.png and scores_ga:
            Path(args.png).mkdir(parents=True, exist_ok=True)
            title = f"{rows[-1]['formula']}: {predictor.target} = {result.value:.4g} {predictor.units}".rstrip()
            render.render_ga(atoms, result.ga_scores, Path(args.png) / _png_name(path, frame), title)

    predictor.close()
    print(_format_table(rows, predictor.units))
    if not scores_ga:
        print("note: this network scores no atoms: no GA column, ga_score array or pictures", file=sys.stderr)
    for w in warnings:
        print(f"warning: {w['file']} frame {w['frame']}: {w['warning']}", file=sys.stderr)
    for e in errors:
        where = e["file"] if e["frame"] is None else f"{e['file']} frame {e['frame']}"
        print(f"error: {where}: {e['error']}", file=sys.stderr)
    if args.output and scored:
        atomic.write_atomically(args.output, lambda tmp: ase.io.write(tmp, scored, format="extxyz"))
    if args.json:
        table = {"target": predictor.target, "units": predictor.units, "structures": rows, "errors": errors,
                 "warnings": warnings}
        atomic.write_atomically(args.json, lambda tmp: tmp.write_text(json.dumps(table, indent=1)))
    if errors:
        print(f"{len(errors)} of {num_inputs} input(s) failed", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0
