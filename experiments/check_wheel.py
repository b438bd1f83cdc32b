"""The package as a user installs it: a wheel in a fresh virtual environment, used outside the checkout.

    python experiments/check_wheel.py [--keep]

Builds ``pip wheel --no-deps .``, makes a fresh venv in a temporary directory, installs the
wheel (its dependencies from the package index), and from a directory outside the checkout:
lists the pre-built models, predicts a rock-salt NaCl CIF with ``scannplus-mp-e_form`` and draws
its GA picture, predicts the HOMO-LUMO gap of benzene (an xyz file) with ``scannplus-qm9-gap``, and
trains ``scannet-jax train --config=qm9:homo,tiny`` (QM9 from the installed
``qm9pack``; features cached under ``~/.cache/scannet_jax``, or ``$SCANNET_JAX_CACHE``). Each
step's command, exit status, seconds and last output lines go to
``experiments/results/check_wheel.json``; the script exits non-zero if a step fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results" / "check_wheel.json"


def step(name: str, command: list[str], cwd: Path, log: list[dict]) -> subprocess.CompletedProcess:
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    tail = (run.stdout + run.stderr).strip().splitlines()[-8:]
    print("\n".join(tail), f"\n   -> exit {run.returncode} in {seconds:.0f} s", flush=True)
    log.append({"step": name, "command": " ".join(command), "returncode": run.returncode,
                "seconds": round(seconds, 1), "output_tail": tail})
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary venv and workdirs")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scannet_jax_wheel_"))
    log: list[dict] = []
    try:
        wheels, venv, user = root / "wheels", root / "venv", root / "user"
        user.mkdir()
        runs = [
            ("build wheel", [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)], root),
            ("make venv", [sys.executable, "-m", "venv", str(venv)], root),
        ]
        for name, command, cwd in runs:
            if step(name, command, cwd, log).returncode:
                return 1
        wheel = next(wheels.glob("scannet_jax-*.whl"))
        bin_dir = venv / "bin"
        if step("install wheel", [str(bin_dir / "pip"), "install", "-q", str(wheel)], root, log).returncode:
            return 1
        from ase.build import bulk, molecule

        bulk("NaCl", "rocksalt", a=5.64).write(user / "nacl.cif")
        molecule("C6H6").write(user / "benzene.xyz")
        cli = str(bin_dir / "scannet-jax")
        checks = [
            ("list models", [cli, "predict", "--list-models"]),
            ("predict with a pre-built model",
             [cli, "predict", "--model=scannplus-mp-e_form", "nacl.cif", "--png=pictures", "--json=nacl.json"]),
            ("predict a molecule with a pre-built QM9 model",
             [cli, "predict", "--model=scannplus-qm9-gap", "benzene.xyz", "--json=benzene.json"]),
            ("train tiny", [cli, "train", "--config=qm9:homo,tiny", "--workdir=runs/tiny"]),
        ]
        failed = sum(bool(step(name, command, user, log).returncode) for name, command in checks)
        table = json.loads((user / "nacl.json").read_text()) if (user / "nacl.json").is_file() else {}
        benzene = json.loads((user / "benzene.json").read_text()) if (user / "benzene.json").is_file() else {}
        outputs = {
            "wheel": wheel.name, "wheel_mib": round(wheel.stat().st_size / 2**20, 2),
            "nacl_prediction": [r["prediction"] for r in table.get("structures", [])],
            "benzene_gap_prediction": [r["prediction"] for r in benzene.get("structures", [])],
            "pictures": sorted(p.name for p in (user / "pictures").glob("*.png")),
            "tiny_results": (json.loads((user / "runs/tiny/results.json").read_text())["mae"]
                             if (user / "runs/tiny/results.json").is_file() else None),
        }
        RESULTS.write_text(json.dumps({"steps": log, "outputs": outputs}, indent=1) + "\n")
        print(json.dumps(outputs, indent=1))
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
