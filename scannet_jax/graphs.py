"""Single graphs and the CSR graph store (NumPy only).

A `GraphStore` holds every structure of a data set concatenated CSR style: structure s owns
atoms `node_ptr[s]:node_ptr[s+1]` and edges `edge_ptr[s]:edge_ptr[s+1]`; `senders` and
`receivers` are local (0-based within the structure). Receiver = centre atom i (attention
query), sender = neighbour j (key), as in `neighbors.Neighbors`. Field names and dtypes follow
docs/architecture.md.

On disk a store is a directory of `.npy` files plus `manifest.json` (format version, shapes,
byte sizes and CRC-32 checksums, caller metadata). The manifest is written last and the
directory is moved into place with one rename, so a directory with a valid manifest is complete;
`load` re-checks sizes and checksums and raises `CorruptStoreError` on any mismatch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import uuid
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jraph
import numpy as np

# Bump whenever the on-disk layout or the meaning of a field changes; caches key on it.
STORE_FORMAT_VERSION = 1

_MANIFEST = "manifest.json"
_EDGE_FIELDS = ("senders", "receivers", "distances", "solid_angles", "relative_weights")


class NeighborsLike(Protocol):
    """What `graphs` needs from `neighbors.Neighbors` (one row per directed edge)."""

    receivers: np.ndarray  # [E] int, centre atom i
    senders: np.ndarray  # [E] int, neighbour atom j
    distances: np.ndarray  # [E] float, Å
    solid_angles: np.ndarray  # [E] float, sr
    weights: np.ndarray  # [E] float, relative weight ρ


class CorruptStoreError(ValueError):
    """A saved store is incomplete, damaged or of another format version."""


def _file_crc32(path: Path, offset: int, chunk: int = 1 << 24) -> int:
    """CRC-32 of the bytes of ``path`` from ``offset`` to its end, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _check_structure(
    numbers: np.ndarray, neighbors: NeighborsLike, ring_aromatic: np.ndarray | None, where: str
) -> None:
    """Raises ValueError naming `where` (and the atom/edge) if one structure is inconsistent."""
    if numbers.ndim != 1 or numbers.size == 0:
        raise ValueError(f"{where}: atomic numbers must be a non-empty 1-D array, got shape {numbers.shape}")
    bad = np.flatnonzero(numbers <= 0)
    if bad.size:
        raise ValueError(f"{where}: atom {bad[0]} has atomic number {numbers[bad[0]]}; Z = 0 marks padding")
    num_atoms = numbers.shape[0]
    num_edges = len(neighbors.receivers)
    for name in ("senders", "distances", "solid_angles", "weights"):
        if len(getattr(neighbors, name)) != num_edges:
            raise ValueError(f"{where}: neighbors.{name} has {len(getattr(neighbors, name))} rows, "
                             f"receivers has {num_edges}")
    for name in ("receivers", "senders"):
        idx = np.asarray(getattr(neighbors, name))
        bad = np.flatnonzero((idx < 0) | (idx >= num_atoms))
        if bad.size:
            raise ValueError(f"{where}: edge {bad[0]} has {name[:-1]} {idx[bad[0]]} outside [0, {num_atoms})")
    for name in ("distances", "solid_angles", "weights"):
        bad = np.flatnonzero(~np.isfinite(np.asarray(getattr(neighbors, name))))
        if bad.size:
            raise ValueError(f"{where}: edge {bad[0]} has non-finite {name[:-1]}")
    if ring_aromatic is not None and np.shape(ring_aromatic) != (num_atoms, 2):
        raise ValueError(f"{where}: ring_aromatic has shape {np.shape(ring_aromatic)}, expected ({num_atoms}, 2)")


def _ptr(counts: np.ndarray) -> np.ndarray:
    ptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[k], starts[k] + counts[k]) over k, without a Python loop.

    Args:
      starts: [K] int, first element of each range.
      counts: [K] int >= 0, length of each range.

    Returns:
      int64 [sum(counts)].
    """
    total = int(counts.sum())
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(total, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Domain:
    """What a model was trained on, hence where it may be applied (``domain.json`` of a workdir).

    Attributes:
      elements: atomic numbers present in the training split; None = unknown (not checked).
      periodic: True for crystals, False for molecules, None = unknown or mixed (not checked).
      max_atoms: atoms of the largest structure of the data set (sizes prediction buckets).
    """

    elements: frozenset[int] | None = None
    periodic: bool | None = None
    max_atoms: int = 64

    @classmethod
    def of(cls, train: GraphStore, everything: GraphStore, periodic: bool | None) -> Domain:
        """The domain of a run: elements of its training split, sizes of all its splits."""
        return cls(frozenset(int(z) for z in np.unique(train.atomic_numbers)), periodic,
                   int(everything.n_node.max(initial=1)))

    def to_json(self) -> dict[str, Any]:
        return {"elements": None if self.elements is None else sorted(self.elements),
                "periodic": self.periodic, "max_atoms": self.max_atoms}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Domain:
        elements = value.get("elements")
        return cls(None if elements is None else frozenset(int(z) for z in elements), value.get("periodic"),
                   int(value.get("max_atoms", 64)))


@dataclasses.dataclass(frozen=True, eq=False)
class GraphStore:
    """All structures of a data set, concatenated CSR style (S structures, A atoms, E edges).

    Attributes:
      atomic_numbers: int32 [A], Z > 0.
      node_ptr: int64 [S+1], atom offsets.
      edge_ptr: int64 [S+1], edge offsets.
      senders: int32 [E], neighbour atom j, local to its structure.
      receivers: int32 [E], centre atom i, local to its structure.
      distances: float32 [E], Å.
      solid_angles: float32 [E], Ω in sr.
      relative_weights: float32 [E], ρ.
      index: int64 [S], index of each structure in its data set (kept by `subset`).
      targets: name -> float64 [S] raw target values (NaN allowed).
      ring_aromatic: optional float32 [A, 2], [in ring, aromatic].
    """

    atomic_numbers: np.ndarray
    node_ptr: np.ndarray
    edge_ptr: np.ndarray
    senders: np.ndarray
    receivers: np.ndarray
    distances: np.ndarray
    solid_angles: np.ndarray
    relative_weights: np.ndarray
    index: np.ndarray
    targets: Mapping[str, np.ndarray]
    ring_aromatic: np.ndarray | None = None

    def __post_init__(self) -> None:
        s = self.index.shape[0]
        if self.node_ptr.shape != (s + 1,) or self.edge_ptr.shape != (s + 1,):
            raise ValueError(f"node_ptr {self.node_ptr.shape} / edge_ptr {self.edge_ptr.shape} "
                             f"do not match {s} structures")
        if self.node_ptr[-1] != self.atomic_numbers.shape[0]:
            raise ValueError(f"node_ptr ends at {self.node_ptr[-1]}, but there are "
                             f"{self.atomic_numbers.shape[0]} atoms")
        for name in _EDGE_FIELDS:
            if getattr(self, name).shape != (self.edge_ptr[-1],):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected ({self.edge_ptr[-1]},)")
        for name, values in self.targets.items():
            if values.shape != (s,):
                raise ValueError(f"target {name!r} has shape {values.shape}, expected ({s},)")
        if self.ring_aromatic is not None and self.ring_aromatic.shape != (self.atomic_numbers.shape[0], 2):
            raise ValueError(f"ring_aromatic has shape {self.ring_aromatic.shape}")

    @classmethod
    def from_structures(
        cls,
        numbers: Sequence[np.ndarray],
        neighbors: Sequence[NeighborsLike],
        *,
        targets: Mapping[str, Sequence[float]] | None = None,
        index: Sequence[int] | None = None,
        ring_aromatic: Sequence[np.ndarray] | None = None,
    ) -> GraphStore:
        """Packs per-structure arrays into one store.

        Args:
          numbers: S arrays of atomic numbers, [N_s] each.
          neighbors: S `Neighbors`, one per structure.
          targets: name -> S raw values.
          index: S data-set indices; defaults to 0..S-1.
          ring_aromatic: S arrays [N_s, 2], or None.

        Raises:
          ValueError: naming the structure (position in the input) that is inconsistent.
        """
        if len(numbers) != len(neighbors):
            raise ValueError(f"{len(numbers)} structures but {len(neighbors)} neighbour lists")
        if ring_aromatic is not None and len(ring_aromatic) != len(numbers):
            raise ValueError(f"{len(numbers)} structures but {len(ring_aromatic)} ring_aromatic arrays")
        numbers = [np.asarray(z) for z in numbers]
        for s, (z, nb) in enumerate(zip(numbers, neighbors)):
            _check_structure(z, nb, None if ring_aromatic is None else ring_aromatic[s], f"structure {s}")
        n_node = np.array([z.shape[0] for z in numbers], np.int64)
        n_edge = np.array([len(nb.receivers) for nb in neighbors], np.int64)

        def cat(arrays: list[np.ndarray], dtype: Any, tail: tuple[int, ...] = ()) -> np.ndarray:
            return np.concatenate(arrays).astype(dtype) if arrays else np.zeros((0, *tail), dtype)

        return cls(
            atomic_numbers=cat(numbers, np.int32),
            node_ptr=_ptr(n_node),
            edge_ptr=_ptr(n_edge),
            senders=cat([nb.senders for nb in neighbors], np.int32),
            receivers=cat([nb.receivers for nb in neighbors], np.int32),
            distances=cat([nb.distances for nb in neighbors], np.float32),
            solid_angles=cat([nb.solid_angles for nb in neighbors], np.float32),
            relative_weights=cat([nb.weights for nb in neighbors], np.float32),
            index=np.arange(len(numbers), dtype=np.int64) if index is None else np.asarray(index, np.int64),
            targets={k: np.asarray(v, np.float64) for k, v in (targets or {}).items()},
            ring_aromatic=None if ring_aromatic is None else cat(list(ring_aromatic), np.float32, (2,)),
        )

    @classmethod
    def concat(cls, stores: Sequence[GraphStore]) -> GraphStore:
        """Concatenates stores in order (same target names and ring switch required)."""
        if not stores:
            raise ValueError("concat needs at least one store")
        names = set(stores[0].targets)
        ring = stores[0].ring_aromatic is not None
        for k, st in enumerate(stores):
            if set(st.targets) != names:
                raise ValueError(f"store {k} has targets {sorted(st.targets)}, store 0 has {sorted(names)}")
            if (st.ring_aromatic is not None) != ring:
                raise ValueError(f"store {k} differs from store 0 in having ring_aromatic")
        return cls(
            atomic_numbers=np.concatenate([st.atomic_numbers for st in stores]),
            node_ptr=_ptr(np.concatenate([st.n_node for st in stores])),
            edge_ptr=_ptr(np.concatenate([st.n_edge for st in stores])),
            **{f: np.concatenate([getattr(st, f) for st in stores]) for f in _EDGE_FIELDS},
            index=np.concatenate([st.index for st in stores]),
            targets={k: np.concatenate([st.targets[k] for st in stores]) for k in names},
            ring_aromatic=np.concatenate([st.ring_aromatic for st in stores]) if ring else None,
        )

    @property
    def num_structures(self) -> int:
        return self.index.shape[0]

    @functools.cached_property
    def n_node(self) -> np.ndarray:
        """int64 [S], atoms per structure."""
        return np.diff(self.node_ptr)

    @functools.cached_property
    def n_edge(self) -> np.ndarray:
        """int64 [S], edges per structure."""
        return np.diff(self.edge_ptr)

    def __len__(self) -> int:
        return self.num_structures

    def subset(self, indices: Sequence[int] | np.ndarray) -> GraphStore:
        """Returns a new store holding structures `indices` (positions in this store), in that order."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_structures):
            raise IndexError(f"subset indices must lie in [0, {self.num_structures})")
        n_node, n_edge = self.n_node[indices], self.n_edge[indices]
        nodes = concat_ranges(self.node_ptr[indices], n_node)
        edges = concat_ranges(self.edge_ptr[indices], n_edge)
        return GraphStore(
            atomic_numbers=self.atomic_numbers[nodes],
            node_ptr=_ptr(n_node),
            edge_ptr=_ptr(n_edge),
            **{f: getattr(self, f)[edges] for f in _EDGE_FIELDS},
            index=self.index[indices],
            targets={k: v[indices] for k, v in self.targets.items()},
            ring_aromatic=None if self.ring_aromatic is None else self.ring_aromatic[nodes],
        )

    def graph(self, s: int, target_name: str | None = None) -> jraph.GraphsTuple:
        """Structure `s` as an unpadded single GraphsTuple (globals target NaN if no target_name)."""
        a, b = self.node_ptr[s], self.node_ptr[s + 1]
        e, f = self.edge_ptr[s], self.edge_ptr[s + 1]
        nodes = {"atomic_numbers": self.atomic_numbers[a:b]}
        if self.ring_aromatic is not None:
            nodes["ring_aromatic"] = self.ring_aromatic[a:b]
        target = np.nan if target_name is None else self.targets[target_name][s]
        return jraph.GraphsTuple(
            nodes=nodes,
            edges={"distances": self.distances[e:f], "solid_angles": self.solid_angles[e:f],
                   "relative_weights": self.relative_weights[e:f]},
            senders=self.senders[e:f],
            receivers=self.receivers[e:f],
            n_node=np.array([b - a], np.int32),
            n_edge=np.array([f - e], np.int32),
            globals={"target": np.array([target], np.float32), "index": np.array([self.index[s]], np.int32)},
        )

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("targets", "ring_aromatic")}
        if self.ring_aromatic is not None:
            arrays["ring_aromatic"] = self.ring_aromatic
        arrays.update({f"target.{k}": v for k, v in self.targets.items()})
        return arrays

    def save(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
        """Writes the store to directory `path` atomically (replacing an existing one).

        Args:
          path: target directory.
          metadata: JSON-serialisable values recorded in the manifest (e.g. featuriser settings),
            checked again by `load(path, expect=...)`.
        """
        with StoreWriter(path, self, num_structures=self.num_structures, num_atoms=int(self.node_ptr[-1]),
                         num_edges=int(self.edge_ptr[-1])) as writer:
            writer.append(self)
            writer.close(metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> GraphStore:
        """Opens a store written by `save`, verifying it completely.

        The arrays are read-only ndarray views of memory maps, so a store larger than memory can
        be trained on: batches read the rows they gather, and the kernel drops pages under memory
        pressure. The
        checksums are computed by streaming each file, not through the mapping, so verifying
        does not make the whole store resident.

        Args:
          path: directory written by `save`.
          expect: metadata entries that must equal the saved ones.

        Raises:
          CorruptStoreError: naming the file when the manifest is missing or unreadable, the format
            version or metadata differ, or a file's size, shape, dtype or checksum is wrong.
        """
        path = Path(path)
        try:
            with open(path / _MANIFEST) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as err:
            raise CorruptStoreError(f"{path / _MANIFEST}: missing or unreadable ({err})") from err
        if manifest.get("format_version") != STORE_FORMAT_VERSION:
            raise CorruptStoreError(f"{path}: store format version {manifest.get('format_version')}, "
                                    f"this code reads {STORE_FORMAT_VERSION}")
        for key, value in (expect or {}).items():
            saved = manifest["metadata"].get(key)
            if saved != value:
                raise CorruptStoreError(f"{path}: metadata {key!r} is {saved!r}, expected {value!r}")
        arrays = {}
        for name, info in manifest["files"].items():
            file = path / f"{name}.npy"
            try:
                size = file.stat().st_size
            except OSError as err:
                raise CorruptStoreError(f"{file}: missing ({err})") from err
            if size != info["bytes"]:
                raise CorruptStoreError(f"{file}: {size} bytes, manifest says {info['bytes']}")
            empty = int(np.prod(info["shape"])) == 0  # an empty file region cannot be mapped
            try:
                array = np.load(file, allow_pickle=False, mmap_mode=None if empty else "r")
            except (OSError, ValueError) as err:
                raise CorruptStoreError(f"{file}: unreadable ({err})") from err
            if list(array.shape) != info["shape"] or array.dtype.str != info["dtype"]:
                raise CorruptStoreError(f"{file}: shape/dtype {array.shape} {array.dtype.str}, "
                                        f"manifest says {info['shape']} {info['dtype']}")
            if _file_crc32(file, size - array.nbytes) != info["crc32"]:
                raise CorruptStoreError(f"{file}: checksum mismatch")
            # A plain ndarray view of the mapping: np.memmap's Python-level __getitem__ and
            # __array_wrap__ cost microseconds per gather and make every derived array a memmap.
            arrays[name] = np.asarray(array)
        targets = {k.split(".", 1)[1]: arrays.pop(k) for k in list(arrays) if k.startswith("target.")}
        try:
            return cls(**arrays, targets=targets)
        except (TypeError, ValueError) as err:
            raise CorruptStoreError(f"{path}: inconsistent arrays ({err})") from err


class StoreWriter:
    """Writes a `GraphStore` to disk part by part, so that a store larger than memory can be
    made (e.g. a data set featurised in chunks, or replicated); `GraphStore.save` uses it too.

    Every array is a memory-mapped ``.npy`` file of its final size inside a temporary directory;
    `close` checks that every structure arrived, records sizes and CRC-32 checksums in the
    manifest (written last) and moves the directory into place with one rename. Leaving the
    ``with`` block without `close` (an error) deletes the temporary directory.

    Args:
      path: the store's directory.
      like: a store with the fields, dtypes and target names to write.
      num_structures, num_atoms, num_edges: totals of the whole store.
    """

    def __init__(self, path: str | os.PathLike, like: GraphStore, *, num_structures: int, num_atoms: int,
                 num_edges: int):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        rows = {"atomic_numbers": num_atoms, "node_ptr": num_structures + 1, "edge_ptr": num_structures + 1,
                "index": num_structures, "ring_aromatic": num_atoms,
                **{name: num_edges for name in _EDGE_FIELDS}, **{f"target.{k}": num_structures for k in like.targets}}
        self.totals = (num_structures, num_atoms, num_edges)
        self.done = [0, 0, 0]  # structures, atoms, edges written so far
        self.files: dict[str, np.ndarray] = {}
        self.names = set(like._arrays())
        for name, array in like._arrays().items():
            shape = (rows[name], *array.shape[1:])
            file = self.tmp / f"{name}.npy"
            if int(np.prod(shape)) == 0:  # an empty region cannot be mapped
                np.save(file, np.zeros(shape, array.dtype), allow_pickle=False)
                continue
            self.files[name] = np.lib.format.open_memmap(file, mode="w+", dtype=array.dtype, shape=shape)
        for ptr in ("node_ptr", "edge_ptr"):
            self.files[ptr][0] = 0

    def append(self, part: GraphStore, index: np.ndarray | None = None) -> None:
        """Appends every structure of ``part`` (with data-set indices ``index``, default its own).

        Raises:
          ValueError: if ``part`` goes beyond the totals, or lacks a target or field.
        """
        s, a, e = self.done
        n_s, n_a, n_e = part.num_structures, int(part.node_ptr[-1]), int(part.edge_ptr[-1])
        if s + n_s > self.totals[0] or a + n_a > self.totals[1] or e + n_e > self.totals[2]:
            raise ValueError(f"{self.path}: appending {n_s} structures goes beyond the store's totals {self.totals}")
        arrays = part._arrays()
        arrays["index"] = part.index if index is None else np.asarray(index)
        if set(arrays) != self.names:
            raise ValueError(f"{self.path}: part has fields {sorted(arrays)}, the store {sorted(self.names)}")
        spans = {"atomic_numbers": (a, n_a), "ring_aromatic": (a, n_a), "index": (s, n_s),
                 **{name: (e, n_e) for name in _EDGE_FIELDS}}
        for name, out in self.files.items():
            if name in ("node_ptr", "edge_ptr"):
                base = a if name == "node_ptr" else e
                out[s + 1:s + 1 + n_s] = base + arrays[name][1:]
            else:
                start, count = spans.get(name, (s, n_s))
                out[start:start + count] = arrays[name]
        self.done = [s + n_s, a + n_a, e + n_e]

    def close(self, metadata: Mapping[str, Any] | None = None) -> None:
        """Finishes the store: manifest with checksums, then the rename into place.

        Raises:
          ValueError: if fewer structures, atoms or edges were appended than announced.
        """
        if tuple(self.done) != self.totals:
            raise ValueError(f"{self.path}: wrote {tuple(self.done)} (structures, atoms, edges) of {self.totals}")
        for array in self.files.values():
            array.flush()
        self.files.clear()
        files = {}
        for file in sorted(self.tmp.glob("*.npy")):
            with open(file, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
            size = file.stat().st_size
            nbytes = int(np.prod(shape)) * dtype.itemsize
            files[file.stem] = {"bytes": size, "crc32": _file_crc32(file, size - nbytes), "shape": list(shape),
                                "dtype": dtype.str}
        manifest = {"format_version": STORE_FORMAT_VERSION, "num_structures": self.totals[0], "files": files,
                    "metadata": dict(metadata or {})}
        # Written last: a directory whose manifest parses is complete.
        with open(self.tmp / _MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.files.clear()
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
