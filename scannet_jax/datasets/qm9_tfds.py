"""Featurised QM9 on disk: the tensorflow-datasets builder (array_record files; TensorFlow not
needed) and `load_qm9`, the QM9 entry of the data set registry.

`Qm9Graphs` is a `GeneratorBasedBuilder` whose records are featurised molecules: atomic
numbers, the directed Voronoi edges (local senders/receivers, d, Ω, ρ), optional ring/aromatic
flags, all targets, the molecule's position in the dataset order (`index`) and its GDB-9 id
(`gdb_index`). tfds writes the records in its own shuffled order, so `index` is what maps a
record back to its molecule.

How it relates to the CSR `GraphStore`: the builder's output lives inside the keyed feature
cache (`featurize.cache_path(...)/tfds`). `build_store` prepares it once (featurising in
parallel) and consolidates all records, read back through `builder.as_data_source()` (random
access; grain can iterate the same source), into a `GraphStore` in dataset order, which
`load_qm9` saves beside it; later loads read only that store. The array_record dataset stays
available for record-level pipelines (`open_data_source`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from scannet_jax.datasets import featurize, qm9
from scannet_jax.graphs import GraphStore

log = logging.getLogger(__name__)

SPLIT = "full"  # one tfds split holding every molecule; train/validation/test come from qm9.split_indices
_READ_CHUNK = 1024


@dataclasses.dataclass(eq=False)
class Qm9GraphsConfig(tfds.core.BuilderConfig):
    """Which featurisation a `Qm9Graphs` dataset holds.

    Attributes:
      settings: `neighbors.FeaturizerSettings`.
      ring: include `ring_aromatic` flags.
      limit: only the first `limit` molecules of the dataset order (None = all 130,831).
      num_workers: featurisation processes (not part of the dataset's identity).
    """

    settings: Any = None
    ring: bool = False
    limit: int | None = None
    num_workers: int | None = None


def make_config(settings: Any, *, ring: bool = False, limit: int | None = None,
                num_workers: int | None = None) -> Qm9GraphsConfig:
    """A config whose name encodes everything the records depend on."""
    name = f"{settings.key()}-ring{int(ring)}" + ("" if limit is None else f"-first{limit}")
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Qm9GraphsConfig(name=name, settings=settings, ring=ring, limit=limit, num_workers=num_workers)


def _tensor(shape: tuple[int | None, ...], dtype: Any) -> tfds.features.Tensor:
    # Raw-bytes encoding keeps float64 exact (tf.Example float lists are float32).
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)


class Qm9Graphs(tfds.core.GeneratorBasedBuilder):
    """Featurised QM9 molecules, one record per molecule, written as array_record."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Voronoi edges, targets, index and gdb_index per molecule."}

    def __init__(self, *, config: Qm9GraphsConfig, data_dir: str | Path, **kwargs: Any) -> None:
        super().__init__(config=config, data_dir=str(data_dir), file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "index": np.int64,
            "gdb_index": np.int64,
            "atomic_numbers": _tensor((None,), np.int32),
            "senders": _tensor((None,), np.int32),
            "receivers": _tensor((None,), np.int32),
            "distances": _tensor((None,), np.float32),
            "solid_angles": _tensor((None,), np.float32),
            "relative_weights": _tensor((None,), np.float32),
            "targets": {name: _tensor((), np.float64) for name in qm9.TARGET_COLUMNS},
        }
        if self.builder_config.ring:
            features["ring_aromatic"] = _tensor((None, 2), np.float32)
        return tfds.core.DatasetInfo(
            builder=self,
            description="QM9 (qm9pack) molecules with Voronoi neighbour edges (scannet_jax).",
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # the data ship with the qm9pack package
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        config = self.builder_config
        molecules = qm9.read_qm9(limit=config.limit)
        structures = [molecules.structure(s) for s in range(len(molecules))]
        featurized = featurize.featurize_structures(structures, config.settings, ring=config.ring,
                                                    num_workers=config.num_workers, desc="featurizing QM9")
        for s, f in enumerate(featurized):
            record = {
                "index": s,
                "gdb_index": int(molecules.gdb_index[s]),
                "atomic_numbers": structures[s].numbers.astype(np.int32),
                "senders": f.senders,
                "receivers": f.receivers,
                "distances": f.distances,
                "solid_angles": f.solid_angles,
                "relative_weights": f.weights,
                "targets": {name: np.float64(v[s]) for name, v in molecules.targets.items()},
            }
            if config.ring:
                record["ring_aromatic"] = f.ring_aromatic
            yield s, record


def open_data_source(data_dir: str | Path, settings: Any, *, ring: bool = False, limit: int | None = None,
                     num_workers: int | None = None):
    """Prepares the dataset if needed and returns its random-access data source (split "full")."""
    builder = Qm9Graphs(config=make_config(settings, ring=ring, limit=limit, num_workers=num_workers),
                        data_dir=data_dir)
    builder.download_and_prepare()
    return builder.as_data_source(split=SPLIT)


def store_from_source(source: Any, *, ring: bool, expected: int) -> GraphStore:
    """Consolidates the records of a data source into a `GraphStore` in dataset order.

    Raises:
      ValueError: if the records' `index` values are not exactly 0..expected-1.
    """
    if len(source) != expected:
        raise ValueError(f"tfds source has {len(source)} records, expected {expected}")
    records: list[Any] = [None] * expected
    for start in range(0, expected, _READ_CHUNK):
        for record in source.__getitems__(range(start, min(start + _READ_CHUNK, expected))):
            s = int(record["index"])
            if not 0 <= s < expected or records[s] is not None:
                raise ValueError(f"tfds record with index {s}: out of range or duplicated")
            records[s] = record
    edges = [featurize.Featurized(receivers=r["receivers"], senders=r["senders"], distances=r["distances"],
                                  solid_angles=r["solid_angles"], weights=r["relative_weights"],
                                  ring_aromatic=r.get("ring_aromatic")) for r in records]
    return GraphStore.from_structures(
        [r["atomic_numbers"] for r in records], edges,
        targets={name: [r["targets"][name] for r in records] for name in qm9.TARGET_COLUMNS},
        ring_aromatic=[e.ring_aromatic for e in edges] if ring else None)


def build_store(data_dir: Path, settings: Any, *, ring: bool = False, limit: int | None = None,
                num_workers: int | None = None) -> GraphStore:
    """Prepares the tfds dataset in `data_dir` (if needed) and consolidates it into a store.

    A prepared dataset that cannot be read back completely (e.g. a truncated shard) is deleted
    and prepared again, with a warning.
    """
    expected = qm9.NUM_MOLECULES if limit is None else min(limit, qm9.NUM_MOLECULES)

    def consolidate() -> GraphStore:
        source = open_data_source(data_dir, settings, ring=ring, limit=limit, num_workers=num_workers)
        return store_from_source(source, ring=ring, expected=expected)

    try:
        return consolidate()
    except featurize.FeaturizationError:
        raise
    except (ValueError, OSError, RuntimeError) as err:
        log.warning("tfds dataset in %s is unreadable and will be prepared again: %s", data_dir, err)
        shutil.rmtree(data_dir, ignore_errors=True)
    return consolidate()


def load_qm9(
    settings: Any,
    *,
    cache_dir: str | os.PathLike | None = None,
    ring: bool = False,
    num_workers: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> tuple[GraphStore, dict[str, np.ndarray]]:
    """Featurised QM9 as a `GraphStore` plus the reference split, cached on disk.

    The first call reads the CSVs, featurises every molecule in parallel into a
    tensorflow-datasets array_record dataset (`Qm9Graphs`) inside the keyed cache
    directory and consolidates it into a CSR `GraphStore` saved beside it; later calls load that
    store (verified by its manifest) in seconds. A damaged or mismatched cache is rebuilt with a
    warning.

    Args:
      settings: `neighbors.FeaturizerSettings`.
      cache_dir: cache root; default `featurize.default_cache_dir()`.
      ring: add per-atom [in ring, aromatic] flags (`featurize.ring_aromatic_flags`).
      num_workers: featurisation processes (default os.cpu_count()).
      limit: use only the first `limit` molecules of the dataset order (tests, smoke runs).
      seed: split seed.

    Returns:
      (store, splits): `store` holds the molecules in dataset order (`store.index` = position
      in the dataset order, targets as in `TARGET_COLUMNS`); `splits` as in `split_indices`.
    """
    name = "qm9" if limit is None else f"qm9-first{limit}"
    path = featurize.cache_path(cache_dir, name, settings, ring)
    store = featurize.cached_store(
        path / "graphs",
        lambda: build_store(path / "tfds", settings, ring=ring, limit=limit, num_workers=num_workers),
        metadata=featurize.cache_metadata(name, settings, ring),
        invalidate=path,
    )
    return store, qm9.split_indices(store.n_node, seed)
