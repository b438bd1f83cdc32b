"""One structure as plain arrays: what every reader returns and every graph builder takes.

`Structure` is the single hand-off between the data side (QM9, the MD and crystal readers,
``ase.Atoms`` given to the predictor) and the graph builders (`graph_builders`). It is a NamedTuple
of NumPy arrays, so it pickles cheaply to featurisation worker processes.
"""

from __future__ import annotations

from typing import NamedTuple

import ase
import numpy as np


class Structure(NamedTuple):
    """One molecule or crystal of N atoms.

    Attributes:
      numbers: int [N], atomic numbers Z.
      positions: float64 [N, 3], Cartesian coordinates in Å.
      cell: float64 [3, 3], lattice vectors as rows in Å; all zeros for a molecule.
      pbc: bool [3], periodic directions; all False for a molecule.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray = np.zeros((3, 3))
    pbc: np.ndarray = np.zeros(3, dtype=bool)

    @property
    def periodic(self) -> bool:
        """True for a crystal (any periodic direction)."""
        return bool(np.any(self.pbc))

    @property
    def num_atoms(self) -> int:
        return int(np.shape(self.numbers)[0])

    def as_molecule(self) -> Structure:
        """The same atoms without cell or periodicity."""
        return molecule(self.numbers, self.positions)


def molecule(numbers: np.ndarray, positions: np.ndarray) -> Structure:
    """A non-periodic `Structure` (zero cell, no periodic direction)."""
    return Structure(np.asarray(numbers), np.asarray(positions, np.float64), np.zeros((3, 3)),
                     np.zeros(3, dtype=bool))


def from_atoms(atoms: ase.Atoms) -> Structure:
    """``ase.Atoms`` as a `Structure` (the cell is kept only where some direction is periodic)."""
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.any():
        return molecule(atoms.numbers, atoms.positions)
    return Structure(np.asarray(atoms.numbers), np.asarray(atoms.positions, np.float64),
                     np.asarray(atoms.cell.array, np.float64), pbc)


def to_atoms(structure: Structure) -> ase.Atoms:
    """A `Structure` as ``ase.Atoms``."""
    if not structure.periodic:
        return ase.Atoms(numbers=structure.numbers, positions=structure.positions)
    return ase.Atoms(numbers=structure.numbers, positions=structure.positions, cell=structure.cell,
                     pbc=structure.pbc)
