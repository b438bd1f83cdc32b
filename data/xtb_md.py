"""Resumable, deterministic GFN2-xTB Langevin molecular dynamics (shared by the generators).

One trajectory is one chunk. While it runs, frames are appended to ``<name>.xyz.part`` and the
complete MD state is written atomically to ``<name>.state.npz`` after every saved frame:
positions [N, 3] Å, momenta [N, 3] amu·Å/(ASE time), the Langevin random generator's state,
the energy and forces of the current geometry and the xTB wavefunction the next SCF starts from.
A restarted run truncates the part file to the last frame the state file knows about and carries
on from there, reproducing the uninterrupted run bit for bit (single thread,
``OMP_NUM_THREADS=1``). A finished trajectory is gzipped to ``<name>.xyz.gz`` and its part and
state files are removed, so the presence of the ``.gz`` file marks a chunk as done. Several
workers may share an output folder: each chunk is claimed with a lock file, and the manifest is
updated under a lock.

Method: GFN2-xTB from the ``tblite`` package (Bannwarth, Ehlert, Grimme, JCTC 15, 1652 (2019)),
through its ASE calculator, default settings (accuracy 1.0, electronic temperature 300 K,
Broyden mixing, at most 250 SCF iterations). Each SCF starts from the previous step's
wavefunction, as ``tblite.ase.TBLite`` does by default.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import CalculationFailed, all_changes
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from ase.optimize import BFGS
from tblite.ase import TBLite
from tblite.interface import Result

# Labels written for one frame: the xyz comment line (a few whitespace-separated numbers).
CommentFn = Callable[[Atoms, TBLite], str]


@dataclasses.dataclass(frozen=True)
class MDSettings:
    """Langevin MD settings of one trajectory.

    Attributes:
      temperature_K: thermostat temperature, K.
      seed: seeds the initial Maxwell–Boltzmann velocities and the Langevin noise.
      timestep_fs: integration step, fs.
      friction_per_fs: Langevin friction, 1/fs.
      equilibration_steps: steps run before the first saved frame (not saved).
      steps_per_frame: MD steps between saved frames.
      num_frames: frames saved per trajectory.
    """

    temperature_K: float
    seed: int
    timestep_fs: float = 1.0
    friction_per_fs: float = 0.02
    equilibration_steps: int = 40
    steps_per_frame: int = 5
    num_frames: int = 90


class _RetryingTBLite(TBLite):
    """TBLite that retries a failed SCF once from a fresh start (superposition of atomic
    densities) with stronger damping (0.2 instead of 0.4) and up to 1000 iterations. Only the
    path to self-consistency changes, not the converged result. Deterministic: the retry
    happens exactly where the first attempt fails, in an uninterrupted or a resumed run alike."""

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        try:
            super().calculate(atoms, properties, system_changes)
        except CalculationFailed:
            self._xtb = None
            self._res = None
            defaults = {"mixer_damping": self.parameters.mixer_damping,
                        "max_iterations": self.parameters.max_iterations}
            self.parameters.update(mixer_damping=0.2, max_iterations=1000)
            try:
                super().calculate(atoms, properties, all_changes)
            finally:
                self.parameters.update(defaults)
                self._xtb = None  # rebuilt with the default settings at the next call


def xtb_calculator() -> TBLite:
    """GFN2-xTB calculator with the settings every generator uses (see module docstring)."""
    return _RetryingTBLite(method="GFN2-xTB", accuracy=1.0, electronic_temperature=300.0,
                           verbosity=0)


def frontier_orbitals(calc: TBLite) -> tuple[float, float]:
    """HOMO and LUMO energies (eV) of the calculator's last SCF.

    The occupied count is the number of electrons / 2 (closed shell, the only case the
    generators run); with the 300 K Fermi smearing the occupations of these orbitals are
    2 and 0 to within 1e-10 for the gapped systems generated here.

    Raises:
      ValueError: if no SCF has been run or the result is spin polarised.
    """
    if calc._res is None:  # tblite keeps its last Result here; there is no public accessor
        raise ValueError("no xTB result: run a calculation before asking for orbitals")
    eps = np.asarray(calc._res.get("orbital-energies"))  # [norb], Hartree
    occ = np.asarray(calc._res.get("orbital-occupations"))  # [norb], electrons
    if eps.ndim != 1:
        raise ValueError(f"expected restricted orbitals, got energies of shape {eps.shape}")
    num_occupied = int(round(occ.sum() / 2.0))
    return float(eps[num_occupied - 1] * units.Hartree), float(eps[num_occupied] * units.Hartree)


def relax(atoms: Atoms, fmax: float = 0.01, max_steps: int = 1000) -> Atoms:
    """Returns a copy of ``atoms`` relaxed with BFGS on GFN2-xTB until max |F| < fmax (eV/Å).

    Raises:
      RuntimeError: if BFGS does not converge within ``max_steps``.
    """
    atoms = atoms.copy()
    atoms.calc = xtb_calculator()
    if not BFGS(atoms, logfile=None).run(fmax=fmax, steps=max_steps):
        raise RuntimeError(f"BFGS did not reach fmax={fmax} eV/Å in {max_steps} steps")
    return atoms


def format_frame(atoms: Atoms, comment: str) -> str:
    """One xyz frame: atom count, comment line, ``symbol x y z`` lines (Å, 8 decimals)."""
    lines = [str(len(atoms)), comment]
    lines += [
        f"{s:<2s} {x:15.8f} {y:15.8f} {z:15.8f}"
        for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions)
    ]
    return "\n".join(lines) + "\n"


def _atomic_savez(path: Path, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Writes ``obj`` as indented JSON to ``path`` via a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def exclusive(path: Path, wait: bool = True) -> Iterator[bool]:
    """Holds an advisory lock on ``path`` (created if needed) for the ``with`` block.

    Yields True when the lock is held; with ``wait=False`` yields False at once if another
    process holds it. The lock dies with its process, so a killed worker never blocks others.
    """
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_manifest(path: Path, update: Callable[[dict], None]) -> None:
    """Re-reads the JSON manifest at ``path``, applies ``update`` to it and writes it back
    atomically, under a lock, so that several workers can record their chunks."""
    with exclusive(path.with_suffix(".lock")):
        manifest = json.loads(path.read_text()) if path.exists() else {"chunks": {}}
        update(manifest)
        write_json_atomic(path, manifest)


def _wavefunction_bytes(calc: TBLite) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "wfn.npz")
        calc._res.save(path)
        return np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)


def _save_state(path: Path, atoms: Atoms, rng: np.random.Generator, step: int, frames: int,
                offset: int, kinetic_T: list[float], wall_s: float) -> None:
    calc = atoms.calc
    _atomic_savez(
        path,
        positions=atoms.positions,
        momenta=atoms.get_momenta(),
        energy=np.float64(calc.results["energy"]),
        forces=calc.results["forces"],
        wavefunction=_wavefunction_bytes(calc),
        rng_state=np.frombuffer(json.dumps(rng.bit_generator.state).encode(), dtype=np.uint8),
        step=np.int64(step),
        frames=np.int64(frames),
        offset=np.int64(offset),
        kinetic_T=np.asarray(kinetic_T, dtype=np.float64),
        wall_s=np.float64(wall_s),
    )


def _restore_state(path: Path, atoms: Atoms,
                   rng: np.random.Generator) -> tuple[int, int, int, list[float], float]:
    """Puts the saved state into ``atoms`` (with a fresh calculator) and ``rng``.

    The saved energy and forces are installed as the calculator's results for the saved
    geometry and the saved wavefunction as its SCF restart, so the next step is computed
    exactly as in an uninterrupted run.
    """
    with np.load(path) as s:
        atoms.positions = s["positions"]
        atoms.set_momenta(s["momenta"])
        rng.bit_generator.state = json.loads(s["rng_state"].tobytes().decode())
        calc = xtb_calculator()
        atoms.calc = calc
        calc.atoms = atoms.copy()
        calc.results = {"energy": float(s["energy"]), "free_energy": float(s["energy"]),
                        "forces": s["forces"].copy()}
        with tempfile.TemporaryDirectory() as d:
            wfn = os.path.join(d, "wfn.npz")
            Path(wfn).write_bytes(s["wavefunction"].tobytes())
            calc._res = Result()
            calc._res.load(wfn)
        return (int(s["step"]), int(s["frames"]), int(s["offset"]), list(s["kinetic_T"]),
                float(s["wall_s"]) if "wall_s" in s else 0.0)


def run_trajectory(start: Atoms, settings: MDSettings, out_dir: Path, name: str,
                   comment_fn: CommentFn) -> dict:
    """Runs (or resumes, or skips if done) one Langevin trajectory and writes its chunk.

    Args:
      start: starting geometry (relaxed); not modified.
      settings: MD settings.
      out_dir: directory of the chunk files.
      name: chunk name; the result is ``out_dir / f"{name}.xyz.gz"``.
      comment_fn: labels of a frame, called right after the frame's SCF.

    Returns:
      Summary of the chunk: name, frames, mean kinetic temperature of the saved frames (K) and
      the wall time (s) summed over the runs that made it; None if another process is running
      this chunk (several workers can share one output directory).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(out_dir / f"{name}.lock", wait=False) as mine:
        return _run_locked(start, settings, out_dir, name, comment_fn) if mine else None


def _run_locked(start: Atoms, settings: MDSettings, out_dir: Path, name: str,
                comment_fn: CommentFn) -> dict:
    final = out_dir / f"{name}.xyz.gz"
    if final.exists():
        return {"name": name, "frames": settings.num_frames, "done": True}
    part = out_dir / f"{name}.xyz.part"
    state = out_dir / f"{name}.state.npz"
    t0 = time.time()

    atoms = start.copy()
    atoms.set_constraint(FixCom())
    rng = np.random.default_rng(settings.seed)
    dyn_kwargs = dict(timestep=settings.timestep_fs * units.fs,
                      temperature_K=settings.temperature_K,
                      friction=settings.friction_per_fs / units.fs, fixcm=False)
    if state.exists():
        step, frames, offset, kinetic_T, wall_before = _restore_state(state, atoms, rng)
        with open(part, "r+b") as f:
            f.truncate(offset)
    else:
        atoms.calc = xtb_calculator()
        thermalize_momenta(atoms, settings.temperature_K, rng=rng)
        Stationary(atoms)
        ZeroRotation(atoms)
        step, frames, offset, kinetic_T, wall_before = 0, 0, 0, [], 0.0
        part.write_bytes(b"")
    dyn = Langevin(atoms, rng=rng, **dyn_kwargs)

    while frames < settings.num_frames:
        target = settings.equilibration_steps + (frames + 1) * settings.steps_per_frame
        dyn.run(target - step)
        step = target
        text = format_frame(atoms, comment_fn(atoms, atoms.calc)).encode()
        with open(part, "ab") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        frames += 1
        offset += len(text)
        kinetic_T.append(float(atoms.get_temperature()))
        _save_state(state, atoms, rng, step, frames, offset, kinetic_T,
                    wall_before + time.time() - t0)

    tmp = final.with_suffix(".gz.tmp")
    with open(part, "rb") as src, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename=f"{name}.xyz", mode="wb", fileobj=raw, mtime=0) as dst:
            shutil.copyfileobj(src, dst)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, final)
    part.unlink()
    state.unlink()
    return {"name": name, "frames": frames, "mean_kinetic_T_K": float(np.mean(kinetic_T)),
            "wall_s": wall_before + time.time() - t0, "done": True}



def record_chunk(manifest_path: Path, chunk: str, summary: dict) -> None:
    """Stamps a finished chunk's summary, merges it into the manifest and prints it as JSON."""
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    update_manifest(manifest_path, lambda manifest: manifest["chunks"].update({chunk: summary}))
    print(json.dumps(summary), flush=True)

def parse_md_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, *, frames: int
) -> argparse.Namespace:
    """Adds the MD options both generators share, parses ``argv`` and warns about threading.

    Args:
      parser: a parser holding the generator's own options (``--out``, systems, temperatures).
      argv: command-line arguments (None: ``sys.argv``).
      frames: default number of saved frames per trajectory.
    """
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--frames", type=int, default=frames, help="saved frames per trajectory")
    parser.add_argument("--steps-per-frame", type=int, default=5)
    parser.add_argument("--equilibration-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=2023)
    args = parser.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("warning: OMP_NUM_THREADS is not 1; results are reproducible bit for bit only "
              "with a single thread", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    return args
