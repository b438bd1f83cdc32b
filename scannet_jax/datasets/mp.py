"""Materials Project crystals converted from the matminer 0.3.9 archive (``data/mp/``).

`data/convert_matminer.py` writes, per set, ``<set>.extxyz.gz`` (one periodic frame per crystal,
``material_id`` and the targets in the frame's info) and ``<set>_split.json`` (the seeded
80/10/10 split as material_ids, and the sha256 of the extxyz file); see data/README.md and
docs/mp_data.md. `read` returns the structures with their stored split as index arrays, so every
model trains and is tested on the same crystals; `load` featurises them into the cached
`GraphStore` (`featurize.featurized_store`).

| name | set | target (info key) | units | crystals |
|---|---|---|---|---|
| ``e_form`` | ``flla`` | ``formation_energy_per_atom`` | eV/atom | 3,938 |
| ``gap`` | ``dielectric`` | ``band_gap`` (PBE) | eV | 1,056 |
| ``elastic`` | ``elastic`` | ``K_VRH`` | GPa | 1,181 (convert it yourself) |
| ``piezoelectric`` | ``piezoelectric`` | ``eij_max`` | C/m² | 941 (convert it yourself) |

``flla`` and ``dielectric`` are also accepted as names (same files as ``e_form`` and ``gap``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import ase
import ase.io
import numpy as np

from scannet_jax.datasets import featurize
from scannet_jax.graphs import GraphStore
from scannet_jax.structures import from_atoms

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# Featurisation errors whose crystals are skipped (and counted) instead of stopping the load: an
# oxide whose motifs ChemEnv cannot find (AMDNet's motif graph) is left out of every model's split.
SKIPPED_ERRORS = ("MotifError",)
OXYGEN = 8
MIN_VOLUME = 1e-3  # Å³, as in data/convert_matminer.py


class MpSet(NamedTuple):
    """A converted set: its file stem in the data folder, main target and the target's unit."""

    stem: str
    target: str
    units: str


DATASETS = {
    "e_form": MpSet("flla", "formation_energy_per_atom", "eV/atom"),
    "gap": MpSet("dielectric", "band_gap", "eV"),
    "flla": MpSet("flla", "formation_energy_per_atom", "eV/atom"),
    "dielectric": MpSet("dielectric", "band_gap", "eV"),
    "elastic": MpSet("elastic", "K_VRH", "GPa"),
    "piezoelectric": MpSet("piezoelectric", "eij_max", "C/m^2"),
}


def default_data_dir() -> Path:
    """``data/mp`` of the source checkout holding this package."""
    return Path(__file__).resolve().parents[2] / "data" / "mp"


def _files(name: str, path: str | Path | None) -> tuple[Path, Path]:
    stem = DATASETS[name].stem
    path = default_data_dir() if path is None else Path(path)
    data = path / f"{stem}.extxyz.gz" if path.is_dir() else path
    split = data.with_name(data.name.split(".")[0] + "_split.json")
    return data, split


def _check_frame(atoms: ase.Atoms, target: str, data: Path, frame: int) -> None:
    where = f"{data} frame {frame} (0-based)"
    if len(atoms) == 0:
        raise ValueError(f"{where}: no atoms")
    if not atoms.pbc.all():
        raise ValueError(f"{where}: pbc={atoms.pbc.tolist()}, expected a periodic crystal "
                         f"(Lattice=… and pbc=\"T T T\")")
    volume = abs(float(np.linalg.det(atoms.cell[:])))
    if volume < MIN_VOLUME:
        raise ValueError(f"{where}: zero-volume lattice (|det| = {volume:.3g} Å³)")
    if not isinstance(atoms.info.get("material_id"), str):
        raise ValueError(f"{where}: no material_id in the frame's info")
    value = atoms.info.get(target)
    if not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"{where} ({atoms.info['material_id']}): target {target!r} is "
                         f"{value!r}, expected a finite number")


def read(name: str, path: str | Path | None = None) -> tuple[list[ase.Atoms], dict[str, np.ndarray]]:
    """Reads a converted Materials Project set and its stored split.

    Args:
      name: a key of `DATASETS` (``"e_form"``, ``"gap"``, ``"elastic"``, …).
      path: the data folder (default ``data/mp`` of the checkout) or the ``.extxyz.gz`` file
        itself; the split is ``<stem>_split.json`` beside the file.

    Returns:
      (structures, splits): S periodic ``ase.Atoms`` in file order, each with
      ``info["material_id"]`` and the converted targets (e.g.
      ``info["formation_energy_per_atom"]`` in eV/atom); splits ``{"train", "validation",
      "test"}`` -> int64 indices into the structures (disjoint, together all S).

    Raises:
      ValueError: for an unknown name; a missing file; a file whose sha256 differs from the one
        the split records; a frame (named by file and 0-based frame) that is not periodic, has a
        zero-volume lattice, lacks ``material_id`` or has a missing or non-finite target; a split
        that names unknown or repeated material_ids or misses some.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown Materials Project set {name!r}; known: {sorted(DATASETS)}")
    data, split_file = _files(name, path)
    for f in (data, split_file):
        if not f.is_file():
            raise ValueError(f"{f}: no such file; convert the set with data/convert_matminer.py "
                             f"(see docs/mp_data.md)")
    record = json.loads(split_file.read_text())
    raw = data.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if record.get("file_sha256") != digest:
        raise ValueError(f"{data}: sha256 {digest} differs from {record.get('file_sha256')} recorded "
                         f"in {split_file}; the data and its split do not belong together")
    try:  # decompressed first: ASE seeks back and forth, which is quadratic in a gzip stream
        text = (gzip.decompress(raw) if data.name.endswith(".gz") else raw).decode("utf-8")
        structures = ase.io.read(io.StringIO(text), index=":", format="extxyz")
    except Exception as e:  # ASE raises several types for malformed extxyz
        raise ValueError(f"{data}: not readable as extended XYZ ({type(e).__name__}: {e})") from None
    target = DATASETS[name].target
    index = {}
    for frame, atoms in enumerate(structures):
        _check_frame(atoms, target, data, frame)
        material_id = atoms.info["material_id"]
        if material_id in index:
            raise ValueError(f"{data} frame {frame} (0-based): material_id {material_id} repeats "
                             f"frame {index[material_id]}")
        index[material_id] = frame
    splits, assigned = {}, 0
    for split in SPLITS:
        unknown = [m for m in record.get(split, []) if m not in index]
        if unknown:
            raise ValueError(f"{split_file}: {split} names material_ids absent from {data}: "
                             f"{unknown[:5]}")
        splits[split] = np.array([index[m] for m in record[split]], dtype=np.int64)
        assigned += len(splits[split])
    covered = np.unique(np.concatenate([splits[s] for s in SPLITS]))
    if assigned != len(structures) or len(covered) != len(structures):
        raise ValueError(f"{split_file}: the splits hold {assigned} entries ({len(covered)} distinct) "
                         f"for {len(structures)} structures in {data}")
    return structures, splits


def is_oxide(atoms: ase.Atoms) -> bool:
    """Whether a crystal holds oxygen and at least one other element (AMDNet's oxides, §2.3)."""
    elements = set(atoms.numbers.tolist())
    return OXYGEN in elements and len(elements) > 1


def oxides(atoms: list[ase.Atoms], splits: dict[str, np.ndarray]) -> tuple[list[ase.Atoms], dict[str, np.ndarray]]:
    """The oxides among ``atoms`` (file order) and each split's oxides, re-indexed to them."""
    keep = np.array([k for k, a in enumerate(atoms) if is_oxide(a)], np.int64)
    return [atoms[k] for k in keep], rows_of_kept(splits, keep, len(atoms))


def load(
    name: str,
    settings: Any,
    *,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    ring: bool = False,
    num_workers: int | None = None,
    oxides_only: bool = False,
) -> tuple[GraphStore, dict[str, np.ndarray]]:
    """A converted set (`read`) featurised into the cached `GraphStore`, with its stored split.

    The cache name holds a digest of every crystal's numbers, positions and cell and of the
    target values, so a re-converted set is featurised again.

    Args:
      name: a key of `DATASETS`.
      settings: the graph builder's settings (`neighbors.FeaturizerSettings`).
      data_dir: as ``path`` of `read`.
      cache_dir: cache root (None = `featurize.default_cache_dir()`).
      ring: add per-atom [in ring, aromatic] flags.
      num_workers: featurisation processes (None = all cores).
      oxides_only: keep only the oxides (`is_oxide`), in file order, and each stored split's
        oxides (so every model on the oxides is trained and tested on the same crystals).

    Returns:
      (store, splits): the crystals in file order (target ``DATASETS[name].target`` in its
      units) and the stored split, as `read` returns it.

    Raises:
      ValueError: what `read` raises.
      featurize.FeaturizationError: naming the crystal whose graph could not be built (a
        crystal failing with a `SKIPPED_ERRORS` kind is logged and left out of the store and
        its split instead).
    """
    atoms, splits = read(name, data_dir)
    if oxides_only:
        atoms, splits = oxides(atoms, splits)
        log.info("mp %s: %d oxides (train/validation/test %s)", name, len(atoms),
                 "/".join(str(len(splits[k])) for k in SPLITS))
    target = DATASETS[name].target
    crystals = [from_atoms(a) for a in atoms]
    values = np.array([a.info[target] for a in atoms], np.float64)
    digest = hashlib.sha256()
    for c in crystals:
        for array in (c.numbers, c.positions, c.cell):
            digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(values.tobytes())
    store = featurize.featurized_store(
        f"mp_{name}-{digest.hexdigest()[:12]}", lambda: (crystals, {target: values}), settings, ring=ring,
        cache_dir=cache_dir, num_workers=num_workers,
        describe=lambda k: f"{name} crystal {k} ({atoms[k].info['material_id']})", skip=SKIPPED_ERRORS)
    if len(store) < len(atoms):
        kept = rows_of_kept(splits, store.index, len(atoms))
        log.warning("mp %s: %d crystals skipped (train/validation/test %s)", name, len(atoms) - len(store),
                    "/".join(str(len(splits[k]) - len(kept[k])) for k in SPLITS))
        splits = kept
    return store, splits


def rows_of_kept(splits: dict[str, np.ndarray], index: np.ndarray, num_structures: int) -> dict[str, np.ndarray]:
    """Each split's structures (positions 0..S-1) as rows of a store that kept the structures
    ``index`` [R] (in order), the others left out."""
    rows = np.full(num_structures, -1, np.int64)
    rows[np.asarray(index, np.int64)] = np.arange(len(index))
    return {k: rows[v][rows[v] >= 0] for k, v in splits.items()}
