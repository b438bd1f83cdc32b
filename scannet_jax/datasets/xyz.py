"""Readers for the MD and crystal files of the original SCANN datasets (reference §5).

Three kinds of input, each read into the same `StructureData` (structures + float64 targets +
where each structure came from):

* ``read_property_xyz``: multi-frame xyz whose comment line holds whitespace-separated numbers
  with given names. fullerene-MD: ``homo lumo total_energy`` (``read_fullerene``);
  Pt/graphene-MD: ``total_energy ref_energy`` (``read_pt_graphene``, which adds the target
  ``energy = total_energy - ref_energy``). Molecules: no cell, no periodicity.
* ``read_extxyz``: extended xyz (``Lattice="…" Properties=… key=value …``), e.g. the SmFe12
  crystals; periodic where a lattice is given.
* ``read_ase``: anything ``ase.io.read`` understands, or an ASE database (``*.db``), with targets
  taken from ``atoms.info`` / the row's key-value pairs (or the attached calculator's results).
  Its frames come from `iread_frames`, which the ``predict`` command reads with too: a CIF is
  read one data block at a time, and a block with a partially occupied site is refused.

The two xyz dialects are parsed here (not through ``ase.io``) so that reading is fast and every
defect is reported precisely: a ``ValueError`` naming the file, the frame (0-based) and the
line (1-based). Files ending in ``.gz`` are decompressed transparently.
"""

from __future__ import annotations

import functools
import gzip
import io
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ase
import ase.db
import ase.io
import ase.io.cif
import numpy as np
from ase.data import atomic_numbers
from ase.io.formats import filetype, open_with_compression

from scannet_jax.structures import Structure, molecule

FULLERENE_PROPERTIES = ("homo", "lumo", "total_energy")  # eV
PT_GRAPHENE_PROPERTIES = ("total_energy", "ref_energy")  # eV
# A CIF site whose _atom_site_occupancy is below 1 - OCCUPANCY_TOLERANCE is partially occupied
# (files often write a full site as 0.9999).
OCCUPANCY_TOLERANCE = 1e-3

PathLike = str | Path


@dataclass(frozen=True)
class StructureData:
    """S structures, their targets and where each was read from.

    Attributes:
      structures: the S structures in file order.
      targets: name -> float64 [S].
      sources: (file, frame) per structure; frame is 0-based within its file (for a
        database: the 0-based position of the row in the selection).
    """

    structures: list[Structure]
    targets: dict[str, np.ndarray]
    sources: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.structures)


class ParseError(ValueError):
    """A defect in an input file; the message names file, frame (0-based) and line (1-based)."""


class FrameError(ParseError):
    """A frame of a file read through ASE that cannot be used (`iread_frames`).

    Attributes:
      path: the file.
      frame: 0-based frame (for a CIF: data block with a structure), or None for the whole file.
      reason: what is wrong, without the file and frame.
    """

    def __init__(self, path: PathLike, frame: int | None, reason: str):
        where = f"{path}" if frame is None else f"{path}: frame {frame} (0-based)"
        super().__init__(f"{where}: {reason}")
        self.path, self.frame, self.reason = str(path), frame, reason


def _error(path: PathLike, frame: int, line: int | None, message: str) -> ParseError:
    where = f"{path}: frame {frame} (0-based)"
    if line is not None:
        where += f", line {line} (1-based)"
    return ParseError(f"{where}: {message}")


def _read_lines(path: PathLike) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as err:
        raise ParseError(f"{path}: not a text file (byte 0x{err.object[err.start]:02x} at offset {err.start} "
                         f"is not UTF-8)") from None


def _element_number(token: str) -> int | None:
    """Z of an element symbol (case-insensitive) or of a number 1..118, else None.

    ASE's dummy symbol ``X`` (Z = 0) is rejected: Z = 0 marks padding downstream.
    """
    z = int(token) if token.isdigit() else atomic_numbers.get(token[:1].upper() + token[1:].lower())
    return z if z is not None and 1 <= z <= 118 else None


def _parse_atoms(lines: list[str], first: int, count: int, species_col: int, pos_col: int,
                 num_cols: int | None, path: PathLike, frame: int) -> tuple[np.ndarray, np.ndarray]:
    """Parses ``count`` atom lines starting at 0-based line ``first``.

    Args:
      species_col, pos_col: columns of the element and of x (y, z follow).
      num_cols: required number of columns, or None for "at least up to z".

    Returns:
      numbers int64 [count], positions float64 [count, 3] (Å).
    """
    rows = [line.split() for line in lines[first:first + count]]
    if len(rows) < count:
        raise _error(path, frame, len(lines),
                     f"the header announces {count} atoms but the file ends after "
                     f"{len(rows)} atom lines")
    min_cols = max(species_col, pos_col + 2) + 1
    numbers = np.empty(count, dtype=np.int64)
    positions = np.empty((count, 3), dtype=np.float64)
    for k, row in enumerate(rows):
        if (num_cols is not None and len(row) != num_cols) or len(row) < min_cols:
            expected = num_cols if num_cols is not None else f"at least {min_cols}"
            hint = (" (does the frame have fewer atoms than its header says?)"
                    if len(row) < min_cols else "")
            raise _error(path, frame, first + k + 1,
                         f"expected {expected} columns on an atom line, got {len(row)}: "
                         f"{lines[first + k]!r}{hint}")
        z = _element_number(row[species_col])
        if z is None:
            raise _error(path, frame, first + k + 1,
                         f"unknown element symbol {row[species_col]!r}")
        numbers[k] = z
        try:
            positions[k] = [float(x) for x in row[pos_col:pos_col + 3]]
        except ValueError:
            raise _error(path, frame, first + k + 1,
                         f"non-numeric coordinate in {lines[first + k]!r}") from None
    if not np.all(np.isfinite(positions)):
        bad = int(np.flatnonzero(~np.isfinite(positions).all(axis=1))[0])
        raise _error(path, frame, first + bad + 1, f"non-finite coordinate in {lines[first + bad]!r}")
    return numbers, positions


def _frames(lines: list[str], path: PathLike) -> Iterable[tuple[int, int, int]]:
    """Yields (frame, 0-based index of the header line, atom count) of each frame."""
    i, frame = 0, 0
    while i < len(lines):
        header = lines[i].strip()
        if not header:
            if any(line.strip() for line in lines[i:]):
                raise _error(path, frame, i + 1, "blank line where an atom count was expected")
            return
        try:
            count = int(header)
        except ValueError:
            hint = (f" (frame {frame - 1} may have more atom lines than its header says)"
                    if frame > 0 else "")
            raise _error(path, frame, i + 1,
                         f"expected an atom count, got {lines[i]!r}{hint}") from None
        if count < 0:
            raise _error(path, frame, i + 1, f"negative atom count {count}")
        if i + 1 >= len(lines):
            raise _error(path, frame, i + 1, "the file ends after the atom count (no comment line)")
        yield frame, i, count
        i += 2 + count
        frame += 1




def _stack_targets(rows: list[list[float]], names: Sequence[str]) -> dict[str, np.ndarray]:
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(names))
    return {name: values[:, k].copy() for k, name in enumerate(names)}


def read_property_xyz(path: PathLike, names: Sequence[str]) -> StructureData:
    """Reads a multi-frame xyz file whose comment lines hold one number per name.

    Each frame: an atom count, a comment line of exactly ``len(names)`` whitespace-separated
    numbers, then one ``symbol x y z`` line per atom (Å; further columns are ignored, so the
    original's xyz output with a GA-score column reads too). Structures are molecules.

    Args:
      path: the file (``.gz`` is decompressed).
      names: names of the comment-line values, in order, e.g. ``FULLERENE_PROPERTIES``.

    Returns:
      The frames with ``targets[name]`` float64 [S] for every name.

    Raises:
      ParseError (a ValueError): on a missing, extra or non-numeric comment value, a frame
        shorter than its header, a non-numeric coordinate or an unknown element.
    """
    lines = _read_lines(path)
    structures, rows, sources = [], [], []
    for frame, i, count in _frames(lines, path):
        values = lines[i + 1].split()
        if len(values) != len(names):
            missing = f"; missing {', '.join(names[len(values):])}" if len(values) < len(names) else ""
            raise _error(path, frame, i + 2,
                         f"expected {len(names)} comment values ({' '.join(names)}), got "
                         f"{len(values)}: {lines[i + 1]!r}{missing}")
        try:
            rows.append([float(v) for v in values])
        except ValueError:
            raise _error(path, frame, i + 2,
                         f"non-numeric comment value in {lines[i + 1]!r} "
                         f"(expected {' '.join(names)})") from None
        numbers, positions = _parse_atoms(lines, i + 2, count, 0, 1, None, path, frame)
        structures.append(molecule(numbers, positions))
        sources.append((str(path), frame))
    return StructureData(structures, _stack_targets(rows, names), sources)


def read_fullerene(path: PathLike) -> StructureData:
    """fullerene-MD file: targets ``homo``, ``lumo``, ``total_energy`` (eV)."""
    return read_property_xyz(path, FULLERENE_PROPERTIES)


def read_pt_graphene(path: PathLike) -> StructureData:
    """Pt/graphene-MD file: targets ``total_energy``, ``ref_energy`` and
    ``energy = total_energy - ref_energy`` (eV; the energy relative to the separated parts)."""
    data = read_property_xyz(path, PT_GRAPHENE_PROPERTIES)
    data.targets["energy"] = data.targets["total_energy"] - data.targets["ref_energy"]
    return data


# key=value pairs of an extended-xyz comment line; values may be quoted or {braced}.
_KEY_VALUE = re.compile(r'\s*([^\s="]+)\s*(?:=\s*("[^"]*"|\{[^}]*\}|[^\s"]+))?\s*')


def _parse_key_values(comment: str, path: PathLike, frame: int, line: int) -> dict[str, str]:
    info: dict[str, str] = {}
    pos = 0
    while pos < len(comment):
        m = _KEY_VALUE.match(comment, pos)
        if m is None or m.end() == pos:
            raise _error(path, frame, line,
                         f"malformed extended-xyz comment line near {comment[pos:pos + 30]!r} "
                         f"(unbalanced quote?)")
        key, value = m.group(1), m.group(2)
        info[key] = "T" if value is None else value.strip('"{}')
        pos = m.end()
    return info


def _parse_properties(spec: str, path: PathLike, frame: int, line: int) -> tuple[int, int, int]:
    """Columns of species and positions and the total column count from ``Properties=…``."""
    fields = spec.split(":")
    if len(fields) % 3:
        raise _error(path, frame, line, f"Properties={spec!r} is not name:type:count triples")
    columns, col = {}, 0
    for name, kind, count in zip(fields[0::3], fields[1::3], fields[2::3]):
        if not count.isdigit():
            raise _error(path, frame, line, f"Properties={spec!r}: column count {count!r} of "
                                            f"{name!r} is not a number")
        columns[name.lower()] = (col, kind, int(count))
        col += int(count)
    species = columns.get("species") or columns.get("z")
    if species is None or "pos" not in columns:
        raise _error(path, frame, line, f"Properties={spec!r} lacks species (or Z) and pos")
    if columns["pos"][2] != 3:
        raise _error(path, frame, line, f"Properties={spec!r}: pos must have 3 columns")
    return species[0], columns["pos"][0], col


def _parse_lattice(info: dict[str, str], path: PathLike, frame: int, line: int) -> np.ndarray:
    values = info["Lattice"].split()
    if len(values) != 9:
        raise _error(path, frame, line,
                     f'Lattice="{info["Lattice"]}" has {len(values)} values, expected 9 '
                     f"(three lattice vectors)")
    try:
        return np.array([float(v) for v in values]).reshape(3, 3)
    except ValueError:
        raise _error(path, frame, line,
                     f'non-numeric value in Lattice="{info["Lattice"]}"') from None


def _parse_pbc(info: dict[str, str], periodic: bool, path: PathLike, frame: int,
               line: int) -> np.ndarray:
    if "pbc" not in info:
        return np.full(3, periodic)
    flags = info["pbc"].split()
    truth = {"t": True, "true": True, "1": True, "f": False, "false": False, "0": False}
    if len(flags) != 3 or any(f.lower() not in truth for f in flags):
        raise _error(path, frame, line, f'pbc="{info["pbc"]}" is not three T/F flags')
    return np.array([truth[f.lower()] for f in flags])


def read_extxyz(path: PathLike, targets: Sequence[str]) -> StructureData:
    """Reads an extended-xyz file (e.g. SmFe12 crystals).

    The comment line holds ``key=value`` pairs: ``Lattice="ax ay az bx by bz cx cy cz"`` (Å,
    optional; without it the frame is a molecule), ``pbc="T T T"`` (optional; default all True
    with a lattice), ``Properties=species:S:1:pos:R:3…`` (optional; that default) and the
    targets as numeric values.

    Args:
      path: the file (``.gz`` is decompressed).
      targets: keys of the comment line to return as targets, e.g. ``["formation_energy"]``.

    Returns:
      The frames; ``targets[name]`` float64 [S].

    Raises:
      ParseError (a ValueError): on a malformed comment line, a Lattice without exactly nine
        numbers, a missing or non-numeric target, a frame shorter than its header, a
        non-numeric coordinate or an unknown element.
    """
    lines = _read_lines(path)
    structures, rows, sources = [], [], []
    for frame, i, count in _frames(lines, path):
        info = _parse_key_values(lines[i + 1], path, frame, i + 2)
        species_col, pos_col, num_cols = _parse_properties(
            info.get("Properties", "species:S:1:pos:R:3"), path, frame, i + 2)
        row = []
        for name in targets:
            if name not in info:
                raise _error(path, frame, i + 2,
                             f"target {name!r} missing from the comment line (keys: "
                             f"{', '.join(sorted(info))})")
            try:
                row.append(float(info[name]))
            except ValueError:
                raise _error(path, frame, i + 2,
                             f"target {name!r} is not a number: {info[name]!r}") from None
        periodic = "Lattice" in info
        cell = _parse_lattice(info, path, frame, i + 2) if periodic else np.zeros((3, 3))
        pbc = _parse_pbc(info, periodic, path, frame, i + 2)
        if pbc.any() and not periodic:
            raise _error(path, frame, i + 2, f'pbc="{info["pbc"]}" is periodic but there is no '
                                             f'Lattice="…"')
        numbers, positions = _parse_atoms(lines, i + 2, count, species_col, pos_col, num_cols,
                                          path, frame)
        structures.append(Structure(numbers, positions, cell, pbc))
        rows.append(row)
        sources.append((str(path), frame))
    return StructureData(structures, _stack_targets(rows, targets), sources)


def partial_occupancy(block: ase.io.cif.CIFBlock) -> str | None:
    """Why a CIF data block is not an ordered structure, or None if it is.

    A site is partially occupied when its ``_atom_site_occupancy`` is below
    1 - OCCUPANCY_TOLERANCE (a non-numeric value such as ``?`` counts as full). ASE would keep
    the majority species of such a site and drop the rest (``ase.io.cif.read_cif``), so the
    structure read is not the one in the file; a disordered structure has no Voronoi
    neighbours of its own.

    Returns:
      a sentence naming the first such site by its ``_atom_site_label`` (by its 1-based
      position in the site loop where the file has no labels), its species and occupancy.
    """
    occupancies = block.get("_atom_site_occupancy")
    if occupancies is None:
        return None
    labels = block.get("_atom_site_label")
    species = block.get("_atom_site_type_symbol")
    for k, occupancy in enumerate(occupancies):
        if isinstance(occupancy, (int, float)) and occupancy < 1 - OCCUPANCY_TOLERANCE:
            site = labels[k] if labels else f"number {k + 1} of the site loop"
            symbol = f" ({species[k]})" if species else ""
            return (f"site {site}{symbol} has occupancy {occupancy:g}: partial occupancy (a disordered "
                    "structure) is not supported; give an ordered structure, e.g. a supercell with every "
                    "site filled")
    return None


def _iread_cif(path: PathLike) -> Iterator[ase.Atoms | FrameError]:
    """The data blocks of a CIF holding a structure, each read on its own (``ase.io.iread``
    gives up on the whole file at its first bad block), with the block's tags in
    ``atoms.info`` (so that a tag such as ``_dft_energy`` can be a target)."""
    with open_with_compression(str(path), "rb") as stream:  # .gz, .bz2, .xz as ase.io.read
        text = stream.read()
    blocks = ase.io.cif.parse_cif(io.BytesIO(text))
    frame = 0
    while True:
        try:
            block = next(blocks)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - a syntax error ends the file; the blocks before stay
            raise FrameError(path, frame or None, f"cannot read{' this block or later' if frame else ''}: "
                                                  f"{type(err).__name__}: {err}") from err
        if not block.has_structure():
            continue
        reason = partial_occupancy(block)
        if reason is None:
            try:
                yield block.get_atoms(store_tags=True)
            except Exception as err:  # noqa: BLE001 - ASE's reason, for this block only
                yield FrameError(path, frame, f"data block {block.name!r}: {type(err).__name__}: {err}")
        else:
            yield FrameError(path, frame, f"data block {block.name!r}: {reason}")
        frame += 1


def iread_frames(path: PathLike) -> Iterator[ase.Atoms | FrameError]:
    """Every frame ASE reads from ``path``, in order; a frame that cannot be used is a
    `FrameError` in its place (naming file, frame and why) and the frames after it still come.

    A CIF (``ase.io.formats.filetype``) is read one data block at a time through ASE's CIF
    parser; a block with a partially occupied site (`partial_occupancy`) or one ASE cannot build
    is a FrameError naming the block and the site. Other formats go through ``ase.io.iread``
    (a file name containing ``@`` is a file name, not ASE's ``file@index``).

    Raises:
      FrameError: when the reader itself fails: no frame from there on can be read (``frame``
        is the first frame not read, None if it is the first of the file).
    """
    try:
        is_cif = filetype(str(path)) == "cif"
    except Exception:  # noqa: BLE001 - ase.io.iread reports what it cannot read
        is_cif = False
    if is_cif:
        yield from _iread_cif(path)
        return
    frame = 0
    try:
        for atoms in ase.io.iread(str(path), index=":", do_not_split_by_at_sign=True):
            yield atoms
            frame += 1
    except UnicodeDecodeError as err:
        raise FrameError(path, frame or None,
                         f"not a text file ASE can read (byte at offset {err.start} is not UTF-8)") from None
    except Exception as err:  # noqa: BLE001 - any reader failure is reported for this file
        raise FrameError(path, frame or None, f"cannot read{' this frame or later' if frame else ''}: "
                                              f"{type(err).__name__}: {err}") from err


def _atoms_target(atoms: ase.Atoms, name: str) -> object:
    if name in atoms.info:
        return atoms.info[name]
    if atoms.calc is not None and name in atoms.calc.results:
        return atoms.calc.results[name]
    return None


def read_ase(path: PathLike, targets: Sequence[str], *, database: bool | None = None,
             selection: str | None = None) -> StructureData:
    """Reads any ASE-readable file, or an ASE database (``ase.db``).

    Targets are looked up in ``atoms.info``, then in the attached calculator's results (files),
    or in the row's key-value pairs and standard fields such as ``energy`` (databases). The
    structure keeps the file's cell and pbc; the cell is zeroed where pbc is all False.

    Args:
      path: the file.
      targets: names of the scalar targets.
      database: read ``path`` with ``ase.db``; None = when it ends in ``.db``.
      selection: ``ase.db`` query (None = all rows); frames are numbered by position in it.

    Raises:
      ValueError: naming file and frame (0-based) when a target is missing or not a scalar.
    """
    if database is None:
        database = str(path).endswith(".db")
    if database:
        rows = list(ase.db.connect(str(path)).select(selection))
        frames = [row.toatoms() for row in rows]
        lookups = [row.get for row in rows]
        where = "the row's key_value_pairs or fields"
    else:
        frames = list(iread_frames(path))
        bad = next((f for f in frames if isinstance(f, FrameError)), None)
        if bad is not None:
            raise bad
        lookups = [functools.partial(_atoms_target, atoms) for atoms in frames]
        where = "atoms.info or the calculator results"

    structures, values, sources = [], [], []
    for frame, (atoms, lookup) in enumerate(zip(frames, lookups)):
        row = []
        for name in targets:
            value = lookup(name)
            if value is None:
                raise _error(path, frame, None, f"target {name!r} not found in {where}")
            if np.ndim(value) != 0:
                raise _error(path, frame, None, f"target {name!r} is not a scalar: {value!r}")
            try:
                row.append(float(value))
            except (TypeError, ValueError):
                raise _error(path, frame, None, f"target {name!r} is {value!r}, not a number") from None
        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = np.asarray(atoms.cell[:], dtype=np.float64) if pbc.any() else np.zeros((3, 3))
        structures.append(Structure(np.asarray(atoms.numbers, dtype=np.int64),
                                    np.asarray(atoms.positions, dtype=np.float64), cell, pbc))
        values.append(row)
        sources.append((str(path), frame))
    return StructureData(structures, _stack_targets(values, targets), sources)


def concatenate(parts: Sequence[StructureData]) -> StructureData:
    """Joins several `StructureData` (e.g. one per trajectory file) in order.

    Raises:
      ValueError: if the parts do not have the same target names.
    """
    if not parts:
        raise ValueError("nothing to concatenate")
    names = set(parts[0].targets)
    for part in parts[1:]:
        if set(part.targets) != names:
            raise ValueError(f"target names differ: {sorted(names)} vs {sorted(part.targets)} "
                             f"(first file {part.sources[0][0] if part.sources else '?'})")
    return StructureData(
        [s for p in parts for s in p.structures],
        {n: np.concatenate([p.targets[n] for p in parts]) for n in parts[0].targets},
        [s for p in parts for s in p.sources],
    )


def read_files(paths: Iterable[PathLike],
               reader: Callable[[PathLike], StructureData]) -> StructureData:
    """Reads every path with ``reader`` (e.g. `read_fullerene`) and concatenates them."""
    return concatenate([reader(p) for p in paths])
