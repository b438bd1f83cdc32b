"""MD and structure-file data sets as a featurised `GraphStore` plus group-aware splits.

`load_structure_files` turns what the `xyz` readers return into the same ``(store, splits)``
that `qm9.load` returns, featurised and cached on disk the same way (`featurize.featurized_store`). Frames of
one MD trajectory are strongly correlated, so the splits never cut a group apart: every
structure belongs to a group (its file = trajectory, or its temperature) and whole groups go to
train, validation or test. Random-frame splits would put near-copies of test frames into the
training set.

`load_fullerene` and `load_pt_graphene` read the GFN2-xTB data sets shipped in ``data/`` (see
``data/README.md``); any other file or ASE database goes through `load_structure_files` with a
reader from `read_function`.
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scannet_jax.datasets import featurize, xyz
from scannet_jax.graphs import GraphStore

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # of the structures: train, validation, test
GROUPINGS = ("trajectory", "temperature", "structure")
# Chunk names of the generated data sets: <system>_T<kelvin>K_r<replica>.xyz.gz
_TEMPERATURE = re.compile(r"_T(\d+)K(?:_|\.)")


def default_data_dir() -> Path:
    """``data/`` of the source checkout holding this package (where the generated sets live)."""
    return Path(__file__).resolve().parents[2] / "data"


def group_labels(sources: Sequence[tuple[str, int]], by: str) -> list[str]:
    """One group label per structure.

    Args:
      sources: (file, frame) per structure, as in `xyz.StructureData.sources`.
      by: ``"trajectory"`` (the file), ``"temperature"`` (the ``_T<kelvin>K`` part of the
        file name, as in the generated chunk names) or ``"structure"`` (every structure its own
        group: a plain random split, only for uncorrelated structures such as a crystal set).

    Raises:
      ValueError: for an unknown grouping, or a file name without a temperature.
    """
    if by == "trajectory":
        return [str(path) for path, _ in sources]
    if by == "structure":
        return [f"{path}#{frame}" for path, frame in sources]
    if by == "temperature":
        labels = []
        for path, _ in sources:
            match = _TEMPERATURE.search(Path(path).name)
            if match is None:
                raise ValueError(f"{path}: no temperature (_T<kelvin>K) in the file name; "
                                 f"split by trajectory instead")
            labels.append(f"{int(match.group(1))}K")
        return labels
    raise ValueError(f"unknown grouping {by!r}; known: {GROUPINGS}")


def split_by_group(groups: Sequence[str], seed: int,
                   fractions: Sequence[float] = SPLIT_FRACTIONS) -> dict[str, np.ndarray]:
    """Assigns whole groups to train / validation / test.

    The distinct groups (sorted) are shuffled with ``np.random.RandomState(seed)`` and taken in
    that order: into train until it holds at least ``fractions[0]`` of the structures, then into
    validation until train + validation hold ``fractions[0] + fractions[1]``, the rest into test.
    Validation and test get at least one group each.

    Returns:
      split name -> int64 structure indices, ascending.

    Raises:
      ValueError: with fewer than three groups.
    """
    names, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if len(names) < 3:
        raise ValueError(f"{len(names)} group(s) ({', '.join(names)}): need at least 3 to split "
                         f"into train, validation and test without cutting a group")
    order = np.random.RandomState(seed).permutation(len(names))
    cumulative = np.cumsum(counts[order]) / counts.sum()
    n_train = int(np.searchsorted(cumulative, fractions[0] - 1e-12) + 1)
    n_train = min(n_train, len(names) - 2)
    n_val = int(np.searchsorted(cumulative, fractions[0] + fractions[1] - 1e-12) + 1) - n_train
    n_val = min(max(n_val, 1), len(names) - n_train - 1)
    parts = np.split(order, [n_train, n_train + n_val])
    return {name: np.flatnonzero(np.isin(inverse, part)) for name, part in zip(SPLITS, parts)}


def _files_digest(paths: Sequence[Path]) -> str:
    """Short content hash of the files, so that a changed or extended file set is re-featurised."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


def load_structure_files(
    name: str,
    paths: Sequence[str | Path],
    reader: Callable[[str | Path], xyz.StructureData],
    settings: Any,
    *,
    group_by: str = "trajectory",
    molecules: bool = False,
    cache_dir: str | Path | None = None,
    ring: bool = False,
    num_workers: int | None = None,
    seed: int = 0,
) -> tuple[GraphStore, dict[str, np.ndarray]]:
    """Featurised structures of ``paths`` as a `GraphStore` plus group-aware splits, cached.

    Args:
      name: data set name (cache directory prefix).
      paths: the files, read in the given order with ``reader``.
      reader: e.g. `xyz.read_fullerene`, or one from `read_function`.
      settings: `neighbors.FeaturizerSettings`.
      group_by: ``"trajectory"``, ``"temperature"`` or ``"structure"`` (see `group_labels`).
      molecules: treat every structure as a molecule (drop its cell and periodicity), as the
        original does for Pt/graphene; otherwise the reader's cell/pbc are kept.
      cache_dir: cache root; default `featurize.default_cache_dir()`.
      ring: add per-atom [in ring, aromatic] flags.
      num_workers: featurisation processes (default os.cpu_count()).
      seed: split seed.

    Returns:
      (store, splits): the structures in file order (``store.index`` = position in that order;
      targets as the reader names them, float64) and split name -> structure indices.

    Raises:
      ValueError: no paths, a reader error (naming file, frame and line) or too few groups.
      featurize.FeaturizationError: naming the file and frame whose neighbours failed.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError(f"data set {name!r}: no files given")
    data = xyz.read_files(paths, reader)
    splits = split_by_group(group_labels(data.sources, group_by), seed)
    keyed = f"{name}-{_files_digest(paths)}{'-mol' if molecules else ''}"
    store = featurize.featurized_store(
        keyed, lambda: ([s.as_molecule() if molecules else s for s in data.structures], data.targets),
        settings, ring=ring, cache_dir=cache_dir, num_workers=num_workers,
        describe=lambda k: f"{data.sources[k][0]}: frame {data.sources[k][1]} (0-based)")
    return store, splits


def generated_files(dataset: str, data_dir: str | Path | None = None) -> list[Path]:
    """The finished chunk files of a generated data set (``fullerene`` or ``pt_graphene``).

    Raises:
      ValueError: for an unknown data set or a folder without chunk files.
    """
    if dataset not in ("fullerene", "pt_graphene"):
        raise ValueError(f"unknown generated data set {dataset!r}; known: fullerene, pt_graphene")
    folder = Path(data_dir) if data_dir else default_data_dir() / dataset
    files = sorted(folder.glob("*.xyz.gz"))
    if not files:
        raise ValueError(f"{folder}: no *.xyz.gz chunk files (see data/README.md)")
    return files


def load_fullerene(settings: Any, *, data_dir: str | Path | None = None,
                   **kwargs: Any) -> tuple[GraphStore, dict[str, np.ndarray]]:
    """fullerene-MD (targets homo, lumo, total_energy in eV); kwargs as `load_structure_files`."""
    return load_structure_files("fullerene", generated_files("fullerene", data_dir),
                                xyz.read_fullerene, settings, **kwargs)


def load_pt_graphene(settings: Any, *, data_dir: str | Path | None = None,
                     **kwargs: Any) -> tuple[GraphStore, dict[str, np.ndarray]]:
    """Pt/graphene-MD (targets total_energy, ref_energy, energy in eV); kwargs as
    `load_structure_files`."""
    return load_structure_files("pt_graphene", generated_files("pt_graphene", data_dir),
                                xyz.read_pt_graphene, settings, **kwargs)


def read_function(file_format: str, targets: Sequence[str]) -> Callable[[str | Path], xyz.StructureData]:
    """A reader for `load_structure_files`.

    Args:
      file_format: ``"property_xyz"`` (comment line = the values named by ``targets``, in
        order), ``"extxyz"`` (targets are comment-line keys) or ``"ase"`` (any ASE-readable file
        or ``.db`` database; targets from ``atoms.info`` / key-value pairs).
      targets: target names.

    Raises:
      ValueError: for an unknown format.
    """
    if file_format == "property_xyz":
        return lambda path: xyz.read_property_xyz(path, targets)
    if file_format == "extxyz":
        return lambda path: xyz.read_extxyz(path, targets)
    if file_format == "ase":
        return lambda path: xyz.read_ase(path, targets)
    raise ValueError(f"unknown file format {file_format!r}; known: property_xyz, extxyz, ase")


def expand_paths(patterns: str) -> list[Path]:
    """Files matching comma-separated glob patterns (``~`` expanded), sorted per pattern.

    Raises:
      ValueError: naming a pattern that matches nothing.
    """
    paths = []
    for pattern in filter(None, (p.strip() for p in patterns.split(","))):
        pattern = str(Path(pattern).expanduser())
        matches = sorted(Path(m) for m in glob.glob(pattern))
        if not matches:
            raise ValueError(f"no file matches {pattern!r}")
        paths.extend(matches)
    return paths


def load(
    dataset: str,
    settings: Any,
    *,
    paths: str = "",
    file_format: str = "",
    columns: Sequence[str] = (),
    group_by: str = "trajectory",
    molecules: bool = False,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    ring: bool = False,
    num_workers: int | None = None,
    seed: int = 0,
) -> tuple[GraphStore, dict[str, np.ndarray]]:
    """One entry point for ``fullerene``, ``pt_graphene`` and ``files`` data sets.

    Args:
      dataset: ``"fullerene"``, ``"pt_graphene"`` (the generated sets in ``data_dir``, default
        ``data/<dataset>``) or ``"files"`` (``paths`` read as ``file_format``).
      settings: `neighbors.FeaturizerSettings`.
      paths: ``files`` only: comma-separated glob patterns (see `expand_paths`).
      file_format: ``files`` only: see `read_function`.
      columns: ``files`` only: target names (for ``property_xyz`` all comment-line values, in
        order; otherwise the keys to read).
      group_by, molecules, cache_dir, ring, num_workers, seed: see `load_structure_files`.

    Returns:
      (store, splits) as `load_structure_files`.

    Raises:
      ValueError: unknown data set, or what the readers and the split raise.
    """
    common = dict(group_by=group_by, molecules=molecules, cache_dir=cache_dir, ring=ring,
                  num_workers=num_workers, seed=seed)
    if dataset == "fullerene":
        return load_fullerene(settings, data_dir=data_dir, **common)
    if dataset == "pt_graphene":
        return load_pt_graphene(settings, data_dir=data_dir, **common)
    if dataset == "files":
        if not columns:
            raise ValueError("data set 'files' needs the target names (columns)")
        return load_structure_files("files", expand_paths(paths),
                                    read_function(file_format, list(columns)), settings, **common)
    raise ValueError(f"unknown MD/file data set {dataset!r}; known: fullerene, pt_graphene, files")
