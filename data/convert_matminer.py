"""Converts the Materials Project datasets of the matminer 0.3.9 source archive to extended XYZ.

The source distribution ``matminer-0.3.9.tar.gz`` (PyPI, 2018) carries four Materials Project
datasets as CSV under ``matminer-0.3.9/matminer/datasets/`` (zoo-reference §5). This script reads
them straight from the archive, without pymatgen and without installing matminer:

* ``flla`` (``flla_2015.csv``): the ``structure`` column is the Python literal of a pymatgen
  ``Structure.as_dict()`` (single quotes), parsed with ``ast.literal_eval``; target
  ``formation_energy_per_atom`` (eV/atom). Faber et al., Int. J. Quantum Chem. 115, 1094 (2015).
* ``dielectric`` (``dielectric_constant.csv``): CIF strings (``structure``), read with ASE and
  checked against the ``poscar`` column; target ``band_gap`` (PBE, eV). Petousis et al., Sci.
  Data 4, 160134 (2016). Its data rows carry one more field (a leading unnamed index) than the
  header; such a header gets a leading ``row`` column.
* ``elastic`` (``elastic_tensor.csv``; ``K_VRH``, ``G_VRH`` in GPa) and ``piezoelectric``
  (``piezoelectric_tensor.csv``; ``eij_max`` in C/m²): CIF strings as for ``dielectric``.

Every structure must be ordered (every site fully occupied by one element), have a non-degenerate
lattice (volume > ``MIN_VOLUME``), no two atoms closer than ``MIN_DISTANCE`` (periodic images
included), and finite targets; a structure that fails is dropped and listed with its reason.
A repeated ``material_id`` keeps its first row.

Output, per set, in ``--out`` (default ``data/mp``):

* ``<set>.extxyz.gz``: one frame per structure in CSV order; ``Lattice`` (Å, rows), ``pbc="T T
  T"``, ``material_id`` and the targets in each frame's info. gzip without a timestamp, so the
  same archive always gives the same bytes.
* ``<set>_split.json``: the seeded 80/10/10 split as lists of ``material_id`` (the ids sorted by
  their number, then permuted by ``numpy.random.default_rng(seed)``), the seed, the sha256 of the
  source CSV and of the written file, the targets with units, and the dropped structures.

Usage (the shipped files)::

    pip download --no-deps --no-binary :all: matminer==0.3.9 -d /tmp/matminer
    python data/convert_matminer.py /tmp/matminer/matminer-0.3.9.tar.gz

and for the other two CSVs, e.g. bulk moduli (see docs/mp_data.md)::

    python data/convert_matminer.py /tmp/matminer/matminer-0.3.9.tar.gz --set elastic \\
        --target K_VRH --out runs/mp_elastic
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import hashlib
import io
import json
import re
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ase
import ase.io
import numpy as np
from ase.data import atomic_numbers
from ase.io.cif import parse_cif
from ase.neighborlist import neighbor_list

ARCHIVE_NAME = "matminer-0.3.9.tar.gz"
# sha256 of the PyPI source distribution (pip checks it against the index on download).
ARCHIVE_SHA256 = "3faf9e83464f3d48f68a759bf476ad24da4c8c3e950c8f340cb917d3bb906400"
MEMBER_DIR = "matminer-0.3.9/matminer/datasets"
MIN_VOLUME = 1e-3     # Å³; a smaller cell volume is a degenerate (zero-volume) lattice
MIN_DISTANCE = 0.5    # Å; closer atoms (periodic images included) overlap
OCCUPANCY_TOLERANCE = 1e-6
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_SEED = 0


@dataclass(frozen=True)
class SourceSet:
    """One CSV of the archive.

    Attributes:
      csv_name: file name inside ``MEMBER_DIR``.
      sha256: sha256 of that CSV.
      structure_format: ``"dict"`` (pymatgen dict literal) or ``"cif"`` (with a ``poscar`` check).
      targets: default target columns.
      units: unit of each numeric column that can be a target.
    """

    csv_name: str
    sha256: str
    structure_format: str
    targets: tuple[str, ...]
    units: dict[str, str]


SETS = {
    "flla": SourceSet(
        "flla_2015.csv", "35b8dbc0b92f4dc7e219fd6606c3a27bee18a9618f376cfee1ff731e306210bb", "dict",
        ("formation_energy_per_atom", "e_above_hull"),
        {"formation_energy_per_atom": "eV/atom", "e_above_hull": "eV/atom", "formation_energy": "eV"}),
    "dielectric": SourceSet(
        "dielectric_constant.csv", "ecbd410d33c95d5b05822cff6c7c0ba809a024b4ede3855ec5efc48d5e29ea77",
        "cif", ("band_gap", "n", "poly_electronic", "poly_total"),
        {"band_gap": "eV", "n": "1", "poly_electronic": "1", "poly_total": "1"}),
    "elastic": SourceSet(
        "elastic_tensor.csv", "f7a18c91fe5dcd51012e5b7e3a37f73aaee9087a036d61bdf9d6464b6fca51a6", "cif",
        ("K_VRH", "G_VRH"),
        {"K_VRH": "GPa", "G_VRH": "GPa", "K_Voigt": "GPa", "K_Reuss": "GPa", "G_Voigt": "GPa",
         "G_Reuss": "GPa", "poisson_ratio": "1", "elastic_anisotropy": "1"}),
    "piezoelectric": SourceSet(
        "piezoelectric_tensor.csv", "4be45c8df76a9600f789255ddcb05a92fc3807e0b96fd01e85713a58c34a2ae1",
        "cif", ("eij_max",), {"eij_max": "C/m^2"}),
}
DEFAULT_SETS = ("flla", "dielectric")


class StructureError(ValueError):
    """A structure that cannot be converted; the message names file, row, material_id and site."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_sha256(data: bytes, expected: str, what: str) -> None:
    got = sha256_of(data)
    if got != expected:
        raise ValueError(f"{what}: sha256 {got} does not match the expected {expected}; not the "
                         f"matminer 0.3.9 source archive (or a corrupted download)")


def read_member(archive: str | Path, source: SourceSet, *, archive_sha256: str = ARCHIVE_SHA256,
                member_sha256: str | None = None) -> str:
    """Returns the text of one dataset CSV after checking the archive's and the CSV's sha256.

    Raises:
      ValueError: if a checksum differs or the CSV is not in the archive.
    """
    archive = Path(archive)
    raw = archive.read_bytes()
    _check_sha256(raw, archive_sha256, str(archive))
    member = f"{MEMBER_DIR}/{source.csv_name}"
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        try:
            data = tar.extractfile(member).read()
        except KeyError:
            raise ValueError(f"{archive}: no member {member}") from None
    _check_sha256(data, source.sha256 if member_sha256 is None else member_sha256,
                  f"{archive}:{member}")
    return data.decode("utf-8")


def csv_rows(text: str) -> list[tuple[int, dict[str, str]]]:
    """Parses a matminer CSV: ``#`` comment lines skipped; returns (first 1-based line, row dict).

    A header one field shorter than the data rows (the unnamed leading index of
    ``dielectric_constant.csv`` and ``piezoelectric_tensor.csv``) gets a leading ``row`` column.
    """
    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(text))
    header, rows, start = None, [], 1
    for record in reader:
        line, start = start, reader.line_num + 1  # a quoted field may span several lines
        if header is None:
            if record and record[0].startswith("#"):
                continue
            header = record
            continue
        if len(record) == len(header) + 1:
            header = ["row"] + header
        if len(record) != len(header):
            raise ValueError(f"line {line}: {len(record)} fields, header has {len(header)}")
        rows.append((line, dict(zip(header, record))))
    return rows


def _element(symbol: str, where: str, site: str) -> int:
    z = atomic_numbers.get(symbol)
    if z is None or z == 0:
        raise StructureError(f"{where}: site {site}: unknown element {symbol!r}")
    return z


def _check_occupancy(species: Sequence[tuple[str, float]], where: str, site: str) -> str:
    """The element of a fully occupied, ordered site; raises for partial or mixed occupancy."""
    if len(species) != 1 or abs(species[0][1] - 1.0) > OCCUPANCY_TOLERANCE:
        occupation = ", ".join(f"{el} {occ:g}" for el, occ in species)
        raise StructureError(f"{where}: site {site} is partially occupied ({occupation}); only "
                             f"ordered structures (every site one element, occupancy 1) are "
                             f"supported")
    return species[0][0]


def atoms_from_pymatgen_dict(text: str, where: str) -> ase.Atoms:
    """An ordered periodic structure from the literal of a pymatgen ``Structure.as_dict()``.

    Args:
      text: the dict literal (``{'lattice': {'matrix': …}, 'sites': [{'abc': …, 'species':
        [{'element': …, 'occu': …}], 'label': …}, …]}``).
      where: file and row, for messages.

    Raises:
      StructureError: a malformed literal or a partially occupied site (named by index and label).
    """
    try:
        d = ast.literal_eval(text)
        matrix = np.array(d["lattice"]["matrix"], dtype=np.float64)
        sites = d["sites"]
    except (ValueError, SyntaxError, KeyError, TypeError) as e:
        raise StructureError(f"{where}: not a pymatgen Structure dict literal ({e})") from None
    numbers, frac = [], []
    for i, s in enumerate(sites):
        name = f"{i} ({s.get('label', '?')})"
        species = [(sp["element"], float(sp["occu"])) for sp in s["species"]]
        numbers.append(_element(_check_occupancy(species, where, name), where, name))
        frac.append(s["abc"])
    positions = np.array(frac, np.float64).reshape(-1, 3) @ matrix  # valid for a degenerate cell too
    return ase.Atoms(numbers=numbers, positions=positions, cell=matrix, pbc=True)


def _occupancy(value: object) -> float:
    return 1.0 if value in (None, ".", "?") else float(value)


def atoms_from_cif(text: str, where: str) -> ase.Atoms:
    """An ordered periodic structure from a one-block CIF string, through ASE's CIF parser.

    Raises:
      StructureError: no or several data blocks, or a site whose occupancy is not 1 (named by its
        ``_atom_site_label``).
    """
    try:
        blocks = list(parse_cif(io.StringIO(text)))
    except Exception as e:  # ASE raises several types for malformed CIF text
        raise StructureError(f"{where}: unreadable CIF ({type(e).__name__}: {e})") from None
    if len(blocks) != 1:
        raise StructureError(f"{where}: CIF has {len(blocks)} data blocks, expected 1")
    block = blocks[0]
    labels = block.get("_atom_site_label")
    symbols = block.get("_atom_site_type_symbol") or labels
    if not symbols:
        raise StructureError(f"{where}: CIF has no _atom_site loop")
    labels = labels or [f"{s}{i}" for i, s in enumerate(symbols)]
    occupancies = block.get("_atom_site_occupancy") or [None] * len(symbols)
    for label, symbol, occ in zip(labels, symbols, occupancies):
        _element(_check_occupancy([(re.sub(r"[^A-Za-z].*", "", str(symbol)), _occupancy(occ))],
                                  where, str(label)), where, str(label))
    try:
        atoms = block.get_atoms()
    except Exception as e:
        raise StructureError(f"{where}: ASE cannot build the CIF structure "
                             f"({type(e).__name__}: {e})") from None
    return ase.Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell[:], pbc=True)


def _check_against_poscar(atoms: ase.Atoms, poscar: str, where: str) -> None:
    """The CIF and POSCAR columns must describe the same crystal (composition, volume, lengths)."""
    try:
        ref = ase.io.read(io.StringIO(poscar), format="vasp")
    except Exception as e:
        raise StructureError(f"{where}: unreadable POSCAR ({type(e).__name__}: {e})") from None
    if sorted(atoms.numbers) != sorted(ref.numbers):
        raise StructureError(f"{where}: CIF gives {atoms.get_chemical_formula()}, POSCAR "
                             f"{ref.get_chemical_formula()}")
    if not np.allclose(sorted(atoms.cell.lengths()), sorted(ref.cell.lengths()), rtol=1e-4, atol=1e-4) or \
            abs(abs(atoms.cell.volume) - abs(ref.cell.volume)) > 1e-3 * abs(ref.cell.volume):
        raise StructureError(f"{where}: CIF and POSCAR cells differ ({atoms.cell.cellpar()} vs "
                             f"{ref.cell.cellpar()})")


def check_structure(atoms: ase.Atoms, where: str) -> None:
    """Refuses a degenerate lattice, an empty cell and overlapping atoms (images included).

    Raises:
      StructureError: naming ``where`` and the defect (for overlaps: the two atoms, the distance).
    """
    if len(atoms) == 0:
        raise StructureError(f"{where}: no atoms")
    volume = abs(float(np.linalg.det(atoms.cell[:])))
    if volume < MIN_VOLUME:
        raise StructureError(f"{where}: zero-volume lattice (|det| = {volume:.3g} Å³ < "
                             f"{MIN_VOLUME} Å³; lattice {atoms.cell[:].tolist()})")
    i, j, d = neighbor_list("ijd", atoms, MIN_DISTANCE, self_interaction=False)
    if len(d):
        k = int(np.argmin(d))
        raise StructureError(f"{where}: atoms {i[k]} ({atoms[i[k]].symbol}) and {j[k]} "
                             f"({atoms[j[k]].symbol}) overlap: {d[k]:.3f} Å < {MIN_DISTANCE} Å "
                             f"(periodic images included)")


def _id_key(material_id: str) -> tuple[str, int, str]:
    m = re.fullmatch(r"([a-z]+)-(\d+)", material_id)
    return (m.group(1), int(m.group(2)), "") if m else ("~", 0, material_id)


def split_ids(material_ids: Sequence[str], seed: int) -> dict[str, list[str]]:
    """Seeded 80/10/10 split of ids, independent of their order (ids sorted by number first).

    Sizes: train ``round(0.8 n)``, validation ``round(0.1 n)``, test the rest.
    """
    ordered = sorted(material_ids, key=_id_key)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_train = int(round(SPLIT_FRACTIONS[0] * len(ordered)))
    n_val = int(round(SPLIT_FRACTIONS[1] * len(ordered)))
    bounds = (0, n_train, n_train + n_val, len(ordered))
    return {name: [ordered[k] for k in perm[bounds[s]:bounds[s + 1]]]
            for s, name in enumerate(SPLIT_NAMES)}


def _targets(row: dict[str, str], names: Sequence[str], where: str) -> dict[str, float]:
    values = {}
    for name in names:
        try:
            values[name] = float(row[name])
        except ValueError:
            raise StructureError(f"{where}: target {name} = {row[name]!r} is not a number") from None
        if not np.isfinite(values[name]):
            raise StructureError(f"{where}: target {name} = {row[name]!r} is not finite")
    return values


def convert_rows(rows: list[tuple[int, dict[str, str]]], source: SourceSet, targets: Sequence[str]
                 ) -> tuple[list[ase.Atoms], list[dict[str, str]], list[str]]:
    """Structures of the rows that pass every check.

    Returns:
      (atoms with ``material_id`` and the targets in ``info``, dropped ``{material_id, line,
      reason}``, repeated material_ids).
    """
    missing = [t for t in targets if rows and t not in rows[0][1]]
    if missing:
        raise ValueError(f"{source.csv_name}: no column(s) {missing}; columns: {sorted(rows[0][1])}")
    structures, dropped, duplicates, seen = [], [], [], set()
    for line, row in rows:
        material_id = row["material_id"]
        where = f"{source.csv_name} line {line} ({material_id})"
        if material_id in seen:
            duplicates.append(material_id)
            continue
        seen.add(material_id)
        try:
            if source.structure_format == "dict":
                atoms = atoms_from_pymatgen_dict(row["structure"], where)
            else:
                atoms = atoms_from_cif(row["structure"], where)
                _check_against_poscar(atoms, row["poscar"], where)
            if "nsites" in row and len(atoms) != int(float(row["nsites"])):
                raise StructureError(f"{where}: {len(atoms)} atoms but nsites = {row['nsites']}")
            check_structure(atoms, where)
            atoms.info.update({"material_id": material_id, **_targets(row, targets, where)})
        except StructureError as e:
            dropped.append({"material_id": material_id, "line": line, "reason": str(e)})
            continue
        structures.append(atoms)
    return structures, dropped, duplicates


def write_extxyz_gz(structures: Sequence[ase.Atoms], path: Path) -> bytes:
    """Writes gzip-compressed extended XYZ without a timestamp; returns the compressed bytes."""
    text = io.StringIO()
    ase.io.write(text, list(structures), format="extxyz")
    data = gzip.compress(text.getvalue().encode("utf-8"), compresslevel=9, mtime=0)
    path.write_bytes(data)
    return data


def convert(archive: str | Path, set_name: str, out_dir: str | Path, *,
            targets: Sequence[str] | None = None, seed: int = DEFAULT_SEED,
            archive_sha256: str = ARCHIVE_SHA256, member_sha256: str | None = None) -> dict:
    """Converts one set; writes ``<set>.extxyz.gz`` and ``<set>_split.json`` into ``out_dir``.

    Args:
      archive: ``matminer-0.3.9.tar.gz``.
      set_name: a key of ``SETS``.
      out_dir: output folder (created).
      targets: numeric columns to keep; default ``SETS[set_name].targets``.
      seed: seed of the split permutation.
      archive_sha256, member_sha256: expected checksums (defaults: the real archive's).

    Returns:
      The split record written to ``<set>_split.json``.

    Raises:
      ValueError: on a checksum mismatch, an unknown set or a missing target column.
    """
    if set_name not in SETS:
        raise ValueError(f"unknown set {set_name!r}; known: {sorted(SETS)}")
    source = SETS[set_name]
    targets = tuple(targets or source.targets)
    text = read_member(archive, source, archive_sha256=archive_sha256, member_sha256=member_sha256)
    rows = csv_rows(text)
    structures, dropped, duplicates = convert_rows(rows, source, targets)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = write_extxyz_gz(structures, out_dir / f"{set_name}.extxyz.gz")
    ids = [a.info["material_id"] for a in structures]
    split = split_ids(ids, seed)
    record = {
        "set": set_name,
        "source": f"{ARCHIVE_NAME}:{MEMBER_DIR}/{source.csv_name}",
        "source_sha256": sha256_of(text.encode("utf-8")),
        "file": f"{set_name}.extxyz.gz",
        "file_sha256": sha256_of(data),
        "targets": {t: source.units.get(t, "") for t in targets},
        "rows": len(rows),
        "structures": len(structures),
        "duplicate_material_ids": duplicates,
        "dropped": dropped,
        "seed": seed,
        "split_method": "material_ids sorted by number, permuted by numpy.random.default_rng(seed); "
                        "80/10/10 (train round(0.8 n), validation round(0.1 n), test the rest)",
        "counts": {name: len(split[name]) for name in SPLIT_NAMES},
        **split,
    }
    (out_dir / f"{set_name}_split.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", help=f"path of {ARCHIVE_NAME}")
    parser.add_argument("--set", dest="sets", action="append", choices=sorted(SETS),
                        help=f"set to convert (repeatable; default: {' '.join(DEFAULT_SETS)})")
    parser.add_argument("--target", dest="targets", action="append",
                        help="numeric column to keep (repeatable; default: the set's defaults)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "mp"))
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    sets = args.sets or list(DEFAULT_SETS)
    if args.targets and len(sets) != 1:
        parser.error("--target needs exactly one --set")
    for set_name in sets:
        record = convert(args.archive, set_name, args.out, targets=args.targets, seed=args.seed)
        print(f"{set_name}: {record['rows']} rows -> {record['structures']} structures "
              f"({len(record['duplicate_material_ids'])} repeated material_ids, "
              f"{len(record['dropped'])} dropped); split {record['counts']} (seed {record['seed']}) "
              f"-> {Path(args.out) / record['file']}")
        for d in record["dropped"]:
            print(f"  dropped: {d['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
