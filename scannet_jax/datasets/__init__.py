"""The data set registry: every data set goes through `load` and comes back as one
featurised `GraphStore` plus its splits.

``DATASETS`` maps a name (``config.data.dataset``) to a loader; every loader takes the same
typed arguments (the graph builder's settings, a `Source` with the data set's own options, the
cache root, the ring switch, the worker count and the split seed) and goes through one on-disk
path: `featurize.featurized_store` featurises the structures with `featurize.Featurizer` straight
into a `GraphStore` cached on disk, keyed by the data set (and its content), the settings, the
ring switch and the store format version. A new data set plugs in with one `register` call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from scannet_jax.graphs import GraphStore

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Source:
    """A data set's own options; each loader reads the fields that concern it.

    Attributes:
      limit: ``qm9``: only the first ``limit`` molecules (None = all).
      source_dir: ``fullerene``, ``pt_graphene``: the folder of the chunk files ("" = ``data/<name>``);
        ``mp_*``: the folder of the converted Materials Project files ("" = ``data/mp``).
      paths: ``files``: comma-separated glob patterns.
      file_format: ``files``: ``property_xyz``, ``extxyz`` or ``ase``.
      columns: ``files``: target names (for ``property_xyz`` every comment-line value, in order).
      group_by: MD and file sets: what a split may not cut (``trajectory``, ``temperature``,
        ``structure``).
      molecules: MD and file sets: treat every structure as a molecule (drop cell and periodicity).
      oxides_only: ``mp_*``: keep only the oxides (`mp.is_oxide`), each split restricted to them
        (AMDNet's motifs exist only for oxides; the other networks compared with it set it too).
    """

    limit: int | None = None
    source_dir: str = ""
    paths: str = ""
    file_format: str = ""
    columns: tuple[str, ...] = ()
    group_by: str = "trajectory"
    molecules: bool = False
    oxides_only: bool = False


Loader = Callable[..., tuple[GraphStore, dict[str, np.ndarray]]]
DATASETS: dict[str, Loader] = {}
# name -> True (crystals), False (molecules) or None (each file decides unless Source.molecules)
PERIODIC: dict[str, bool | None] = {}


def register(name: str, loader: Loader, periodic: bool | None) -> None:
    """Adds a data set under ``name``; ``loader(featurizer, source, *, cache_dir, ring,
    num_workers, seed) -> (store, splits)``; ``periodic`` says what its structures are."""
    if name in DATASETS:
        raise ValueError(f"data set {name!r} is already registered")
    DATASETS[name] = loader
    PERIODIC[name] = periodic


def periodicity(name: str, source: Source) -> bool | None:
    """True when every structure of the data set is featurised as a crystal, False when every
    one is a molecule, None when it is not known (files keeping their own periodicity)."""
    if source.molecules and PERIODIC[name] is None:
        return False
    return PERIODIC[name]


def load(
    name: str,
    *,
    featurizer: Any,
    source: Source = Source(),
    cache_dir: str | os.PathLike | None = None,
    ring: bool = False,
    num_workers: int | None = None,
    seed: int = 0,
) -> tuple[GraphStore, dict[str, np.ndarray]]:
    """The featurised data set ``name`` and its splits.

    Args:
      name: a key of ``DATASETS``.
      featurizer: the graph builder's settings (`neighbors.FeaturizerSettings`).
      source: the data set's own options.
      cache_dir: feature cache root (None = `featurize.default_cache_dir()`).
      ring: add per-atom [in ring, aromatic] flags.
      num_workers: featurisation processes (None = all cores).
      seed: split seed.

    Returns:
      (store, splits): every structure of the data set, and split name -> int64 positions in
      ``store`` (disjoint).

    Raises:
      ValueError: for an unknown name (listing the known ones), or what the loader raises.
    """
    if name not in DATASETS:
        raise ValueError(f"config.data.dataset={name!r}: unknown data set; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](featurizer, source, cache_dir=cache_dir, ring=ring, num_workers=num_workers, seed=seed)


def _qm9(featurizer: Any, source: Source, **common: Any) -> tuple[GraphStore, dict[str, np.ndarray]]:
    from scannet_jax.datasets import qm9

    return qm9.load(featurizer, limit=source.limit, **common)


def _md(name: str) -> Loader:
    def loader(featurizer: Any, source: Source, **common: Any) -> tuple[GraphStore, dict[str, np.ndarray]]:
        from scannet_jax.datasets import md

        return md.load(name, featurizer, paths=source.paths, file_format=source.file_format,
                       columns=source.columns, group_by=source.group_by, molecules=source.molecules,
                       data_dir=source.source_dir or None, **common)

    return loader


def _mp(name: str) -> Loader:
    """A Materials Project set of ``data/mp`` (`mp.load`) with its stored split (``seed`` unused:
    every model trains and is tested on the same crystals)."""

    def loader(featurizer: Any, source: Source, *, seed: int,
               **common: Any) -> tuple[GraphStore, dict[str, np.ndarray]]:
        del seed
        from scannet_jax.datasets import mp

        return mp.load(name, featurizer, data_dir=source.source_dir or None, oxides_only=source.oxides_only,
                       **common)

    return loader


register("qm9", _qm9, periodic=False)
register("fullerene", _md("fullerene"), periodic=False)  # MD frames are molecules
register("pt_graphene", _md("pt_graphene"), periodic=False)
register("files", _md("files"), periodic=None)
for _name in ("e_form", "gap"):
    register(f"mp_{_name}", _mp(_name), periodic=True)
