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

Beyond atoms and edges a store may hold named *extra sets* (`ExtraSet`: e.g. ALIGNN's bond-angle
triplets, a motif graph's motifs and motif edges), also CSR over the structures; `batching.pad_batch`
pads each to its own bucket size. On disk they are files ``extra.<set>.ptr.npy`` and
``extra.<set>.<field>.npy`` under the same manifest (which records each set's index fields), so a
store without extra sets is written exactly as before and older stores load unchanged.
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
BUILTIN_SETS = ("nodes", "edges")  # what an extra set's index field may refer to, besides other extra sets


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


@dataclasses.dataclass(frozen=True, eq=False)
class ExtraSet:
    """A named set of rows beyond atoms and edges, CSR over the S structures of a store (T rows).

    Structure s owns rows ``ptr[s]:ptr[s+1]`` of every field. An *index field* holds indices
    local to its structure (0-based, like `GraphStore.senders`) into the rows of another set,
    ``refers[field]``: "nodes", "edges" or the name of an extra set of the same store;
    `batching.pad_batch` offsets them to batch-global indices. Every other field is a feature,
    batched as stored. ALIGNN's triplets, for example, are ``fields={"senders": k1, "receivers":
    k2, "cosines": cos θ}`` with ``refers={"senders": "edges", "receivers": "edges"}``.

    Attributes:
      ptr: int64 [S+1], row offsets.
      fields: name -> [T, ...] array (at least one); index fields int32 [T].
      refers: index field -> the set it indexes.
    """

    ptr: np.ndarray
    fields: Mapping[str, np.ndarray]
    refers: Mapping[str, str]

    def __post_init__(self) -> None:
        if self.ptr.ndim != 1 or self.ptr.shape[0] < 1:
            raise ValueError(f"ptr must be 1-D with S+1 >= 1 entries, got shape {self.ptr.shape}")
        if not self.fields:
            raise ValueError("an extra set needs at least one field")
        for name, values in self.fields.items():
            if not name.isidentifier() or name == "ptr":
                raise ValueError(f"field name {name!r} must be a Python identifier other than 'ptr'")
            if values.ndim < 1 or values.shape[0] != self.ptr[-1]:
                raise ValueError(f"field {name!r} has shape {values.shape}, ptr ends at {self.ptr[-1]}")
        for name in self.refers:
            if name not in self.fields:
                raise ValueError(f"index field {name!r} is not among the fields {sorted(self.fields)}")
            if self.fields[name].shape[1:] or not np.issubdtype(self.fields[name].dtype, np.integer):
                raise ValueError(f"index field {name!r} must be a 1-D integer array, got "
                                 f"{self.fields[name].shape} {self.fields[name].dtype}")

    @functools.cached_property
    def counts(self) -> np.ndarray:
        """int64 [S], rows per structure."""
        return np.diff(self.ptr)

    def take(self, indices: np.ndarray) -> ExtraSet:
        """The rows of structures `indices` (positions), in that order, as a new set."""
        counts = self.counts[indices]
        rows = concat_ranges(self.ptr[indices], counts)
        return ExtraSet(_ptr(counts), {k: v[rows] for k, v in self.fields.items()}, dict(self.refers))

    def same_kind(self, other: ExtraSet) -> bool:
        """Same fields (names, dtypes, trailing shapes) and the same index fields."""
        return (dict(self.refers) == dict(other.refers) and self.fields.keys() == other.fields.keys()
                and all(v.dtype == other.fields[k].dtype and v.shape[1:] == other.fields[k].shape[1:]
                        for k, v in self.fields.items()))


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
      extras: name -> `ExtraSet`, optional sets beyond atoms and edges (`with_extra`). A name is a
        Python identifier other than "nodes" and "edges".
      metadata: JSON values describing the whole store, saved in (and loaded from) its manifest,
        e.g. ``{"periodic": True}``; not carried by `subset` or `concat`.
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
    extras: Mapping[str, ExtraSet] = dataclasses.field(default_factory=dict)
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

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
        for name, extra in self.extras.items():
            if not name.isidentifier() or name in BUILTIN_SETS:
                raise ValueError(f"extra set name {name!r} must be a Python identifier other than {BUILTIN_SETS}")
            if extra.ptr.shape != (s + 1,):
                raise ValueError(f"extra set {name!r}: ptr has shape {extra.ptr.shape}, expected ({s + 1},)")
            for field, target in extra.refers.items():
                if target not in BUILTIN_SETS and target not in self.extras:
                    raise ValueError(f"extra set {name!r}: index field {field!r} refers to {target!r}, which "
                                     f"is neither one of {BUILTIN_SETS} nor an extra set of this store")

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
        extras = stores[0].extras
        for k, st in enumerate(stores):
            if set(st.targets) != names:
                raise ValueError(f"store {k} has targets {sorted(st.targets)}, store 0 has {sorted(names)}")
            if (st.ring_aromatic is not None) != ring:
                raise ValueError(f"store {k} differs from store 0 in having ring_aromatic")
            if st.extras.keys() != extras.keys() or not all(st.extras[n].same_kind(x) for n, x in extras.items()):
                raise ValueError(f"store {k} differs from store 0 in its extra sets or their fields")
        return cls(
            atomic_numbers=np.concatenate([st.atomic_numbers for st in stores]),
            node_ptr=_ptr(np.concatenate([st.n_node for st in stores])),
            edge_ptr=_ptr(np.concatenate([st.n_edge for st in stores])),
            **{f: np.concatenate([getattr(st, f) for st in stores]) for f in _EDGE_FIELDS},
            index=np.concatenate([st.index for st in stores]),
            targets={k: np.concatenate([st.targets[k] for st in stores]) for k in names},
            ring_aromatic=np.concatenate([st.ring_aromatic for st in stores]) if ring else None,
            extras={n: ExtraSet(_ptr(np.concatenate([st.extras[n].counts for st in stores])),
                                {f: np.concatenate([st.extras[n].fields[f] for st in stores]) for f in x.fields},
                                dict(x.refers))
                    for n, x in extras.items()},
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
            extras={name: extra.take(indices) for name, extra in self.extras.items()},
        )

    def counts(self, name: str) -> np.ndarray:
        """int64 [S], rows per structure of set `name` ("nodes", "edges" or an extra set)."""
        if name == "nodes":
            return self.n_node
        if name == "edges":
            return self.n_edge
        return self.extras[name].counts

    def with_extra(self, name: str, parts: Sequence[Mapping[str, np.ndarray]],
                   refers: Mapping[str, str]) -> GraphStore:
        """This store with extra set `name` (added or replaced), packed from one part per structure.

        Args:
          name: the set's name (a Python identifier other than "nodes" and "edges").
          parts: S dicts with the same keys, field -> [T_s, ...] array (the same T_s for all fields
            of structure s); index fields hold indices local to the structure.
          refers: index field -> "nodes", "edges", another extra set of this store, or `name`.

        Returns:
          A new store sharing every other array; index fields are cast to int32, features keep
          their dtype (give float32 for model inputs).

        Raises:
          ValueError: naming the structure and field whose rows disagree in number or whose index
            lies outside the set it refers to.
        """
        if len(parts) != self.num_structures or not parts:
            raise ValueError(f"extra set {name!r}: {len(parts)} parts for {self.num_structures} structures "
                             f"(at least one is needed)")
        keys = parts[0].keys()
        counts = np.zeros(len(parts), np.int64)
        for s, part in enumerate(parts):
            if part.keys() != keys:
                raise ValueError(f"extra set {name!r}: structure {s} has fields {sorted(part)}, "
                                 f"structure 0 has {sorted(keys)}")
            lengths = {len(np.asarray(v)) for v in part.values()}
            if len(lengths) > 1:
                raise ValueError(f"extra set {name!r}: structure {s} has fields of different lengths {lengths}")
            counts[s] = lengths.pop() if lengths else 0
        fields = {}
        for key in keys:
            values = np.concatenate([np.asarray(part[key]) for part in parts])
            integer = np.issubdtype(values.dtype, np.integer)
            fields[key] = values.astype(np.int32) if key in refers and integer else values
        store = dataclasses.replace(self, extras={**self.extras, name: ExtraSet(_ptr(counts), fields, dict(refers))})
        owner = np.repeat(np.arange(len(parts)), counts)  # structure of each row
        for key, target in refers.items():
            limit = store.counts(target)
            bad = np.flatnonzero((fields[key] < 0) | (fields[key] >= limit[owner]))
            if bad.size:
                s = int(owner[bad[0]])
                raise ValueError(f"extra set {name!r}: structure {s}, row {bad[0] - int(counts[:s].sum())} "
                                 f"has {key} {fields[key][bad[0]]} outside [0, {limit[s]}) of {target!r}")
        return store

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

    def _files(self) -> dict[str, tuple[np.ndarray, str, bool]]:
        """Every array by file name -> (array, the set whose rows it holds: "structures", "nodes",
        "edges" or an extra set, whether it is that set's row pointer [S+1])."""
        files = {"atomic_numbers": (self.atomic_numbers, "nodes", False), "node_ptr": (self.node_ptr, "nodes", True),
                 "edge_ptr": (self.edge_ptr, "edges", True),
                 **{f: (getattr(self, f), "edges", False) for f in _EDGE_FIELDS},
                 "index": (self.index, "structures", False)}
        if self.ring_aromatic is not None:
            files["ring_aromatic"] = (self.ring_aromatic, "nodes", False)
        files.update({f"target.{k}": (v, "structures", False) for k, v in self.targets.items()})
        for name, extra in self.extras.items():
            files[f"extra.{name}.ptr"] = (extra.ptr, name, True)
            files.update({f"extra.{name}.{k}": (v, name, False) for k, v in extra.fields.items()})
        return files

    def _rows(self) -> dict[str, int]:
        """Rows of every set: "structures", "nodes", "edges" and each extra set."""
        return {"structures": self.num_structures, "nodes": int(self.node_ptr[-1]), "edges": int(self.edge_ptr[-1]),
                **{name: int(extra.ptr[-1]) for name, extra in self.extras.items()}}

    def save(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
        """Writes the store to directory `path` atomically (replacing an existing one).

        Args:
          path: target directory.
          metadata: JSON-serialisable values recorded in the manifest beside the store's own
            ``metadata`` (e.g. featuriser settings), checked again by `load(path, expect=...)`.
        """
        rows = self._rows()
        with StoreWriter(path, self, num_structures=self.num_structures, num_atoms=rows["nodes"],
                         num_edges=rows["edges"], num_extra_rows={n: rows[n] for n in self.extras}) as writer:
            writer.append(self)
            writer.close({**self.metadata, **(metadata or {})})

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
            extras = {}
            for name, info in manifest.get("extras", {}).items():
                prefix = f"extra.{name}."
                ptr = arrays.pop(prefix + "ptr")
                fields = {k[len(prefix):]: arrays.pop(k) for k in list(arrays) if k.startswith(prefix)}
                extras[name] = ExtraSet(ptr, fields, info["refers"])
            return cls(**arrays, targets=targets, extras=extras, metadata=manifest["metadata"])
        except (KeyError, TypeError, ValueError) as err:
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
      like: a store with the fields, dtypes, target names and extra sets to write.
      num_structures, num_atoms, num_edges: totals of the whole store.
      num_extra_rows: extra set name -> its total rows, for every extra set of ``like``.
    """

    def __init__(self, path: str | os.PathLike, like: GraphStore, *, num_structures: int, num_atoms: int,
                 num_edges: int, num_extra_rows: Mapping[str, int] | None = None):
        num_extra_rows = dict(num_extra_rows or {})
        if num_extra_rows.keys() != like.extras.keys():
            raise ValueError(f"{path}: num_extra_rows has sets {sorted(num_extra_rows)}, the store "
                             f"{sorted(like.extras)}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        # rows of every set; the first three are reported as (structures, atoms, edges)
        self.totals = {"structures": num_structures, "nodes": num_atoms, "edges": num_edges, **num_extra_rows}
        self.done = dict.fromkeys(self.totals, 0)  # rows written so far
        self.refers = {name: dict(extra.refers) for name, extra in like.extras.items()}
        self.layout = {name: (level, is_ptr) for name, (_, level, is_ptr) in like._files().items()}
        self.files: dict[str, np.ndarray] = {}
        for name, (array, level, is_ptr) in like._files().items():
            shape = (num_structures + 1 if is_ptr else self.totals[level], *array.shape[1:])
            file = self.tmp / f"{name}.npy"
            if int(np.prod(shape)) == 0:  # an empty region cannot be mapped
                np.save(file, np.zeros(shape, array.dtype), allow_pickle=False)
                continue
            self.files[name] = np.lib.format.open_memmap(file, mode="w+", dtype=array.dtype, shape=shape)
            if is_ptr:
                self.files[name][0] = 0

    def _counts(self, rows: Mapping[str, int]) -> str:
        """``rows`` as "(S, A, E, T...) (structures, atoms, edges, <extra sets>...)"."""
        return f"{tuple(rows.values())} ({', '.join(('structures', 'atoms', 'edges', *list(rows)[3:]))})"

    def append(self, part: GraphStore, index: np.ndarray | None = None) -> None:
        """Appends every structure of ``part`` (with data-set indices ``index``, default its own).

        Raises:
          ValueError: if ``part`` goes beyond the totals, or lacks a target, field or extra set.
        """
        arrays = {name: array for name, (array, _, _) in part._files().items()}
        if arrays.keys() != self.layout.keys() or {n: dict(x.refers) for n, x in part.extras.items()} != self.refers:
            raise ValueError(f"{self.path}: part has fields {sorted(arrays)}, the store {sorted(self.layout)}")
        if index is not None:
            arrays["index"] = np.asarray(index)
        rows = part._rows()
        if any(self.done[k] + rows[k] > self.totals[k] for k in self.totals):
            raise ValueError(f"{self.path}: appending {rows['structures']} structures goes beyond the store's "
                             f"totals {self._counts(self.totals)}")
        s, n_s = self.done["structures"], rows["structures"]
        for name, out in self.files.items():
            level, is_ptr = self.layout[name]
            start = self.done[level]
            if is_ptr:
                out[s + 1:s + 1 + n_s] = start + arrays[name][1:]
            else:
                out[start:start + rows[level]] = arrays[name]
        for k in self.totals:
            self.done[k] += rows[k]

    def close(self, metadata: Mapping[str, Any] | None = None) -> None:
        """Finishes the store: manifest with checksums, then the rename into place.

        Raises:
          ValueError: if fewer structures, atoms, edges or extra rows were appended than announced.
        """
        if self.done != self.totals:
            raise ValueError(f"{self.path}: wrote {self._counts(self.done)} of {tuple(self.totals.values())}")
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
        manifest = {"format_version": STORE_FORMAT_VERSION, "num_structures": self.totals["structures"],
                    "files": files, "metadata": dict(metadata or {})}
        if self.refers:  # absent without extra sets: such a store's manifest is as before them
            manifest["extras"] = {name: {"refers": refers} for name, refers in self.refers.items()}
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
