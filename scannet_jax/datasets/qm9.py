"""QM9 from the `qm9pack` package: the CSV reader, the reference split and `load`, which
featurises the molecules into the cached `GraphStore` like every other data set
(`featurize.featurized_store`).

The three CSV parts installed with `qm9pack` hold the 130,831 characterised QM9 molecules
(B3LYP/6-31G(2df,p); the 3,054 uncharacterised ones are already removed), coordinates in Å.
They are read with the standard `csv` module (not `qm9pack.get_data`, which needs pandas).
"Dataset order" below means the CSV order (part 1, 2, 3), which is ascending in the GDB-9
`Index` column.
"""

from __future__ import annotations

import csv
import importlib.resources
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scannet_jax.datasets import featurize
from scannet_jax.graphs import Domain, GraphStore
from scannet_jax.structures import Structure, molecule

HARTREE_TO_EV = 27.211386
NUM_MOLECULES = 130_831
# Where a model trained on all of QM9 applies: H C N O F molecules of at most 29 atoms.
DOMAIN = Domain(frozenset({1, 6, 7, 8, 9}), periodic=False, max_atoms=29)
# The reference split sizes (scann-reference.md §3); the test set is the remaining 10,831.
NUM_TRAIN, NUM_VALIDATION = 110_000, 10_000
SPLITS = ("train", "validation", "test")

# target name -> (CSV column, factor to the unit we store)
TARGET_COLUMNS: dict[str, tuple[str, float]] = {
    "homo": ("HOMO_au", HARTREE_TO_EV),  # eV
    "lumo": ("LUMO_au", HARTREE_TO_EV),  # eV
    "gap": ("HOMO_LUMO_gap_au", HARTREE_TO_EV),  # eV
    "alpha": ("Polarizability_bohr3", 1.0),  # bohr³
    "cv": ("Heatcapacity_Cv_cal_mol_K", 1.0),  # cal/(mol K)
    "mu": ("Dipole_debye", 1.0),  # D
    "zpve": ("ZPVE_au", HARTREE_TO_EV),  # eV
    "u0": ("InternalEnergy_0K_au", HARTREE_TO_EV),  # eV
    "r2": ("R2_bohr2", 1.0),  # bohr²
}
_SYMBOL_TO_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Qm9Molecules:
    """QM9 molecules in dataset order, CSR style (S molecules, A atoms).

    Attributes:
      gdb_index: int64 [S], the GDB-9 `Index` column (1-based, unique).
      numbers: int32 [A], atomic numbers.
      atom_ptr: int64 [S+1], atom offsets.
      positions: float64 [A, 3], Cartesian coordinates in Å.
      targets: name -> float64 [S] in the units of `TARGET_COLUMNS`.
    """

    gdb_index: np.ndarray
    numbers: np.ndarray
    atom_ptr: np.ndarray
    positions: np.ndarray
    targets: dict[str, np.ndarray]

    def __len__(self) -> int:
        return self.gdb_index.shape[0]

    @property
    def n_atoms(self) -> np.ndarray:
        """int64 [S], atoms per molecule."""
        return np.diff(self.atom_ptr)

    def structure(self, s: int) -> Structure:
        """Molecule `s` as a non-periodic `Structure`."""
        a, b = self.atom_ptr[s], self.atom_ptr[s + 1]
        return molecule(self.numbers[a:b], self.positions[a:b])

    def structures(self) -> Iterator[Structure]:
        return (self.structure(s) for s in range(len(self)))


def _csv_paths() -> list[Path]:
    root = importlib.resources.files("qm9pack") / "data"
    return [Path(str(root / f"qm9_part{k}.csv")) for k in (1, 2, 3)]


def _parse_elements(text: str, where: str) -> list[int]:
    try:
        return [_SYMBOL_TO_Z[s.strip(" '\"")] for s in text.strip("[]").split(",")]
    except KeyError as err:
        raise ValueError(f"{where}: unknown element {err.args[0]!r} in Elements {text[:60]!r}") from err


def read_qm9(limit: int | None = None) -> Qm9Molecules:
    """Reads QM9 from the installed `qm9pack` CSV files.

    Coordinates are parsed with one `np.fromstring` call over all molecules (accepts tokens such
    as `0.` and `1.5E-5` that JSON rejects); counts are checked per molecule.

    Args:
      limit: read only the first `limit` molecules of the dataset order (None = all).

    Returns:
      The molecules, in dataset order.

    Raises:
      ValueError: naming the file and GDB index of a malformed row, or if the full set does not
        have 130,831 unique molecules.
    """
    columns = {name: col for name, (col, _) in TARGET_COLUMNS.items()}
    gdb_index: list[int] = []
    numbers: list[int] = []
    n_atoms: list[int] = []
    xyz_text: list[str] = []
    values: dict[str, list[float]] = {name: [] for name in columns}
    csv.field_size_limit(1 << 24)
    for path in _csv_paths():
        if limit is not None and len(gdb_index) >= limit:
            break
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if limit is not None and len(gdb_index) >= limit:
                    break
                where = f"{path.name}, Index {row.get('Index')}"
                try:
                    z = _parse_elements(row["Elements"], where)
                    if int(row["N_atoms"]) != len(z):
                        raise ValueError(f"{where}: N_atoms {row['N_atoms']} but {len(z)} Elements")
                    gdb_index.append(int(row["Index"]))
                    for name, col in columns.items():
                        values[name].append(float(row[col]))
                except (KeyError, TypeError) as err:
                    raise ValueError(f"{where}: missing or malformed column ({err!r})") from err
                numbers.extend(z)
                n_atoms.append(len(z))
                xyz_text.append(row["XYZ_Ang"].replace("[", "").replace("]", ""))
    counts = np.array(n_atoms, np.int64)
    positions = np.fromstring(",".join(xyz_text), sep=",") if xyz_text else np.zeros(0)
    if positions.size != 3 * counts.sum():
        _raise_bad_xyz(xyz_text, counts, gdb_index)
    molecules = Qm9Molecules(
        gdb_index=np.array(gdb_index, np.int64),
        numbers=np.array(numbers, np.int32),
        atom_ptr=np.concatenate([[0], np.cumsum(counts)]),
        positions=positions.reshape(-1, 3),
        targets={name: np.array(v, np.float64) * TARGET_COLUMNS[name][1] for name, v in values.items()},
    )
    if np.unique(molecules.gdb_index).size != len(molecules):
        raise ValueError("qm9pack CSVs: duplicate Index values")
    if limit is None and len(molecules) != NUM_MOLECULES:
        raise ValueError(f"qm9pack CSVs hold {len(molecules)} molecules, expected {NUM_MOLECULES}")
    return molecules


def _raise_bad_xyz(xyz_text: list[str], counts: np.ndarray, gdb_index: list[int]) -> None:
    """Finds and reports the first molecule whose XYZ_Ang does not hold 3 * N_atoms numbers."""
    for text, n, idx in zip(xyz_text, counts, gdb_index):
        try:
            got = len([float(t) for t in text.split(",")])
        except ValueError as err:
            raise ValueError(f"qm9pack CSV, Index {idx}: unparsable XYZ_Ang ({err})") from err
        if got != 3 * n:
            raise ValueError(f"qm9pack CSV, Index {idx}: XYZ_Ang holds {got} numbers, expected {3 * n}")
    raise ValueError("qm9pack CSV: XYZ_Ang coordinate count mismatch")


def split_indices(n_atoms: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The reference train/validation/test split (scann-reference.md §3).

    The original stores the molecules sorted by atom count and then, after
    `np.random.seed(seed)`, takes `np.random.permutation(S)` of that sorted list: the first
    110,000 are train, the next 10,000 validation, the rest (10,831) test. Here the sort is a
    stable argsort of the atom counts (ties keep dataset order; the original's tie order is not
    recorded) and the permutation comes from `np.random.RandomState(seed)`, which draws exactly
    what the seeded global legacy generator would without touching global state. For a subset
    (fewer than the full 130,831) the sizes are 80 % / 10 % / rest.

    Args:
      n_atoms: [S] atoms per molecule, in dataset order.
      seed: split seed (the original used 0).

    Returns:
      {"train", "validation", "test"} -> int64 arrays of positions in dataset order; disjoint,
      together covering 0..S-1.
    """
    n = len(n_atoms)
    by_size = np.argsort(n_atoms, kind="stable")
    order = by_size[np.random.RandomState(seed).permutation(n)]
    if n == NUM_MOLECULES:
        n_train, n_val = NUM_TRAIN, NUM_VALIDATION
    else:
        n_train, n_val = int(0.8 * n), int(0.1 * n)
    return {"train": order[:n_train], "validation": order[n_train:n_train + n_val],
            "test": order[n_train + n_val:]}


def load(
    settings: Any,
    *,
    cache_dir: str | os.PathLike | None = None,
    ring: bool = False,
    num_workers: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> tuple[GraphStore, dict[str, np.ndarray]]:
    """Featurised QM9 as a `GraphStore` plus the reference split, cached on disk.

    The first call reads the CSVs (`read_qm9`) and featurises every molecule in parallel
    straight into the keyed store (`featurize.featurized_store`, cache name ``qm9`` or
    ``qm9-first<limit>``); later calls load that store (verified by its manifest) without
    reading the CSVs. A damaged, half-written or mismatched cache is rebuilt with a warning.

    Args:
      settings: the graph builder's settings (`neighbors.FeaturizerSettings`).
      cache_dir: cache root (None = `featurize.default_cache_dir()`).
      ring: add per-atom [in ring, aromatic] flags (`featurize.ring_aromatic_flags`).
      num_workers: featurisation processes (None = all cores).
      limit: use only the first `limit` molecules of the dataset order (tests, smoke runs).
      seed: split seed.

    Returns:
      (store, splits): `store` holds the molecules in dataset order (`store.index` = position
      in the dataset order, targets as in `TARGET_COLUMNS`); `splits` as in `split_indices`.
    """

    def read() -> tuple[list[Structure], dict[str, np.ndarray]]:
        molecules = read_qm9(limit)
        return list(molecules.structures()), molecules.targets

    name = "qm9" if limit is None else f"qm9-first{limit}"
    store = featurize.featurized_store(name, read, settings, ring=ring, cache_dir=cache_dir,
                                       num_workers=num_workers)
    return store, split_indices(store.n_node, seed)
