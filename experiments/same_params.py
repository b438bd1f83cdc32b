"""Whether two commits train to the same parameters, bit for bit.

    python experiments/same_params.py --base=fc26cf9 --new=HEAD

Each commit is checked out in a temporary git worktree and runs the same fixed-seed job
(``main.py --config=<config>``, default the QM9 ``tiny`` run) with its own feature cache. The
CRC-32 of every array that each run's last periodic checkpoint and its ``best/`` checkpoint
recorded at save time (``checkpoints.tree_digests``: parameters, optimiser state, scaler) are
compared. Prints the verdict and writes ``experiments/results/same_params.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("base", None, "the reference commit", required=True)
flags.DEFINE_string("new", "HEAD", "the commit compared with it")
flags.DEFINE_string("config", "configs/qm9.py:homo,tiny", "the job both commits run")
flags.DEFINE_string("out", str(REPO / "experiments/results/same_params.json"), "results JSON")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def _newest_meta(folder: Path) -> tuple[int, dict]:
    """(step, meta) of the newest checkpoint under ``folder`` (Orbax layout: <step>/meta/metadata)."""
    step = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    return step, json.loads((folder / str(step) / "meta" / "metadata").read_text())


def run_commit(commit: str, scratch: Path) -> dict:
    """Trains ``FLAGS.config`` at ``commit``; returns its digests and test MAE."""
    tree = scratch / f"tree_{commit}"
    _git("worktree", "add", "--detach", str(tree), commit)
    try:
        workdir, cache = scratch / f"run_{commit}", scratch / f"cache_{commit}"
        start = time.time()
        subprocess.run([sys.executable, "main.py", f"--config={FLAGS.config}", f"--workdir={workdir}",
                        f"--config.data.data_dir={cache}"], cwd=tree, check=True,
                       env={**os.environ, "PYTHONPATH": str(tree)},
                       stdout=subprocess.DEVNULL)
        last_step, last = _newest_meta(workdir / "checkpoints")
        best_epoch, best = _newest_meta(workdir / "best")
        results = json.loads((workdir / "results.json").read_text())
        return {"commit": _git("rev-parse", "--short", commit), "seconds": time.time() - start,
                "last_step": last_step, "last_digests": last["digests"], "best_epoch": best_epoch,
                "best_digests": best["digests"], "test_mae": results["test_mae"]}
    finally:
        _git("worktree", "remove", "--force", str(tree))


def main(argv: list[str]) -> None:
    del argv
    with tempfile.TemporaryDirectory() as scratch:
        runs = {name: run_commit(commit, Path(scratch)) for name, commit in (("base", FLAGS.base), ("new", FLAGS.new))}
    verdict = {}
    for kind in ("last_digests", "best_digests"):
        base, new = runs["base"][kind], runs["new"][kind]
        verdict[kind] = {"arrays": len(base), "differ": sorted(k for k in base.keys() | new.keys()
                                                                if base.get(k) != new.get(k))}
    identical = not any(v["differ"] for v in verdict.values())
    out = {"command": "python experiments/same_params.py " + " ".join(sys.argv[1:]), "config": FLAGS.config,
           "identical": identical, "verdict": verdict,
           "runs": {k: {f: v for f, v in r.items() if not f.endswith("digests")} for k, r in runs.items()}}
    Path(FLAGS.out).write_text(json.dumps(out, indent=1))
    for name, r in runs.items():
        print(f"{name} {r['commit']}: step {r['last_step']}, best epoch {r['best_epoch']}, "
              f"test MAE {r['test_mae']!r}, {r['seconds']:.0f} s")
    for kind, v in verdict.items():
        print(f"{kind}: {v['arrays']} arrays, {len(v['differ'])} differ {v['differ'][:5]}")
    print("bit-identical" if identical else "NOT identical")


if __name__ == "__main__":
    app.run(main)
