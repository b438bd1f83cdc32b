"""Structure motifs of metal oxides and the motif graph of AMDNet (zoo-reference.md §2.3–2.5).

A motif is the coordination polyhedron of a cation. For one oxide this module finds, as AMDNet's
released generator does:

* the motif centres: every site that is not oxygen ("only oxygen is considered as anion", §2.3);
* each centre's coordination environment, from pymatgen's ChemEnv (`LocalGeometryFinder` with
  ``maximum_distance_factor=1.41``, ``only_cations=True``, ``excluded_atoms=["O"]``, then
  `SimplestChemenvStrategy(distance_cutoff=1.4, angle_cutoff=0.3, additional_condition=3)` through
  `LightStructureEnvironments`): the ``ce_symbol`` of minimum continuous symmetry measure, e.g.
  ``"O:6"`` (octahedron). Like the released code, the label is reported but is not a node feature;
* each motif's node vector: the CrystalNN "ops" site fingerprint of its centre, 61 numbers
  (`crystalnn_ops_fingerprint`, §2.4);
* the motif edges: two motifs are joined when their centres are bonded (pymatgen `CrystalNN`,
  the released `CrystalNN().get_bonded_structure`) to a common O atom; one edge per periodic
  image of the neighbour, typed by the number of shared O atoms (1 corner, 2 edge, ≥3 face) and
  carrying the distance between the two centres. A motif with no neighbour gets one self-loop of
  distance 0 (§2.5).

Deliberate departures from the released generator (`get_motif.py` → `MotifReader.collect_neighbors`):

* **The dropped-edges bug is fixed.** The released code names an edge's source ``element +
  site index`` (``"Mn0"``) but its target the bare element (``"Mn"``), then keeps only edges whose
  target is one of the source names, so every edge is dropped and every motif graph is self-loops
  only. Here both ends are site indices, so the edges survive.
* The released code assumes the cations are the first sites of the structure and takes the anion
  from the last site; here the centres are the non-O sites wherever they are.
* Shared neighbours are counted among O atoms only (the polyhedra share anions); the released
  code counts any shared bonded site, which in an oxide is almost always an O atom.
* A non-oxide, or a structure ChemEnv cannot analyse, raises `MotifError` naming the structure
  (the released code prints nothing and skips it inside a bare ``except``).

`motif_graph` analyses one ASE `Atoms`; `motif_graphs` many, in a process pool with a progress
bar. Needs pymatgen (the ``motifs`` extra). NumPy only; the model side is `scannet_jax.megnet`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import multiprocessing
import os
import time
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import ase
import numpy as np
import tqdm

logger = logging.getLogger(__name__)

ANION = "O"
# Sharing types of a motif edge (`MotifGraph.sharing`).
SELF_LOOP, CORNER, EDGE, FACE = 0, 1, 2, 3
SHARING_NAMES = ("self-loop", "corner", "edge", "face")

# ChemEnv settings of the released feature.py (§2.3).
MAXIMUM_DISTANCE_FACTOR = 1.41
DISTANCE_CUTOFF = 1.4
ANGLE_CUTOFF = 0.3
ADDITIONAL_CONDITION = 3

# CrystalNNFingerprint "ops" preset (§2.4): for each coordination number, the weight of that CN
# ("wt") followed by the target motifs whose order parameters are weighted by it. The order
# parameter type and its parameters come from pymatgen's `CN_OPT_PARAMS` (a motif it does not list,
# e.g. "q4", is the order-parameter type itself).
MAX_CN = 24
CN_TARGET_MOTIFS: dict[int, tuple[str, ...]] = {
    1: ("sgl_bd",),
    2: ("L-shaped", "water-like", "bent 120 degrees", "bent 150 degrees", "linear"),
    3: ("trigonal planar", "trigonal non-coplanar", "T-shaped"),
    4: ("square co-planar", "tetrahedral", "rectangular see-saw-like", "see-saw-like",
        "trigonal pyramidal"),
    5: ("pentagonal planar", "square pyramidal", "trigonal bipyramidal"),
    6: ("hexagonal planar", "octahedral", "pentagonal pyramidal"),
    7: ("hexagonal pyramidal", "pentagonal bipyramidal"),
    8: ("body-centered cubic", "hexagonal bipyramidal"),
    9: ("q2", "q4", "q6"),
    10: ("q2", "q4", "q6"),
    11: ("q2", "q4", "q6"),
    12: ("cuboctahedral", "q2", "q4", "q6"),
}
FINGERPRINT_LABELS: tuple[str, ...] = tuple(
    label for cn in range(1, MAX_CN + 1)
    for label in (f"wt CN_{cn}", *(f"{m} CN_{cn}" for m in CN_TARGET_MOTIFS.get(cn, ()))))
FINGERPRINT_DIM = len(FINGERPRINT_LABELS)  # 61

# ChemEnv's coordination-geometry symbols, in the order of pymatgen's `AllCoordinationGeometries`
# (the 65 of the released `MOST_OCCURING_ENVS`, then DD:20, UNKNOWN and UNCLEAR); a motif's
# environment id (`environment_ids`) is its position here.
ENVIRONMENTS: tuple[str, ...] = (
    "S:1", "L:2", "A:2", "TL:3", "TY:3", "TS:3", "T:4", "S:4", "SY:4", "SS:4", "PP:5", "S:5", "T:5",
    "O:6", "T:6", "PP:6", "PB:7", "ST:7", "ET:7", "FO:7", "C:8", "SA:8", "SBT:8", "TBT:8", "DD:8",
    "DDPN:8", "HB:8", "BO_1:8", "BO_2:8", "BO_3:8", "TC:9", "TT_1:9", "TT_2:9", "TT_3:9", "HD:9",
    "TI:9", "SMA:9", "SS:9", "TO_1:9", "TO_2:9", "TO_3:9", "PP:10", "PA:10", "SBSA:10", "MI:10",
    "S:10", "H:10", "BS_1:10", "BS_2:10", "TBSA:10", "PCPA:11", "H:11", "SH:11", "CO:11", "DI:11",
    "I:12", "PBP:12", "TT:12", "C:12", "AC:12", "SC:12", "S:12", "HP:12", "HA:12", "SH:13", "DD:20",
    "UNKNOWN", "UNCLEAR")


class MotifError(ValueError):
    """A structure whose motifs cannot be found (not an oxide, no cation, ChemEnv failure)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason

    def __reduce__(self):  # picklable across the process pool
        return type(self), (self.name, self.reason)


class MotifGraph(NamedTuple):
    """The motif graph of one oxide; edges sorted by receiver, then distance, then sender."""

    features: np.ndarray  # [M, 61] float64, CrystalNN "ops" fingerprint of each centre
    centers: np.ndarray  # [M] int64, index of each motif's centre atom in the structure
    environments: np.ndarray  # [M] str, ChemEnv symbol of minimum csm, e.g. "O:6"
    receivers: np.ndarray  # [E_m] int64, motif i (the one aggregated onto)
    senders: np.ndarray  # [E_m] int64, neighbouring motif j
    distances: np.ndarray  # [E_m] float64, Å, |r_j + shift @ cell - r_i| between the centres
    sharing: np.ndarray  # [E_m] int8, SELF_LOOP, CORNER, EDGE or FACE
    shifts: np.ndarray  # [E_m, 3] int64, the neighbour is centre j's image at shifts @ cell


def motif_graph(atoms: ase.Atoms, *, name: str | None = None) -> MotifGraph:
    """Motifs of one periodic oxide and the graph joining those that share O atoms.

    Args:
      atoms: a crystal (pbc all True) containing O.
      name: how errors name the structure; default ``atoms.info["name"]`` or the formula.

    Returns:
      The `MotifGraph`, one motif per non-O site, in site order.

    Raises:
      MotifError: not periodic, no O atom, no cation, or ChemEnv / CrystalNN fails on it.
    """
    name = name or str(atoms.info.get("name", atoms.get_chemical_formula()))
    symbols = np.asarray(atoms.get_chemical_symbols())
    if not np.all(atoms.pbc):
        raise MotifError(name, "motifs need a periodic crystal (pbc all True)")
    if not np.any(symbols == ANION):
        raise MotifError(name, f"not an oxide (no O atom in {atoms.get_chemical_formula()})")
    centers = np.flatnonzero(symbols != ANION)
    if len(centers) == 0:
        raise MotifError(name, "no cation: every atom is O")
    from pymatgen.io.ase import AseAtomsAdaptor

    structure = AseAtomsAdaptor.get_structure(atoms)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            environments = _chemenv_symbols(structure, centers)
            nn_data = _crystalnn_data(structure)
    except Exception as error:  # ChemEnv and CrystalNN raise many kinds; keep the cause.
        raise MotifError(name, f"motif analysis failed ({type(error).__name__}: {error})") from error
    missing = [int(c) for c, env in zip(centers, environments) if env is None]
    if missing:
        raise MotifError(name, f"ChemEnv found no coordination environment for sites {missing}")
    features = np.stack([crystalnn_ops_fingerprint(structure, int(c), nn_data[c]) for c in centers])
    bonds = _cation_anion_bonds(nn_data, symbols)
    receivers, senders, shifts, sharing = _shared_anion_edges(bonds, centers, len(atoms))
    positions = structure.cart_coords
    lattice = structure.lattice.matrix
    distances = np.linalg.norm(positions[centers[senders]] + shifts @ lattice
                               - positions[centers[receivers]], axis=1)
    order = np.lexsort((senders, distances, receivers))
    return MotifGraph(features=features, centers=centers.astype(np.int64),
                      environments=np.asarray(environments, dtype=str),
                      receivers=receivers[order], senders=senders[order],
                      distances=distances[order], sharing=sharing[order], shifts=shifts[order])


def environment_ids(symbols: Sequence[str]) -> np.ndarray:
    """Positions in `ENVIRONMENTS` of ChemEnv symbols [M] (e.g. ``"O:6"`` -> 13), int64 [M].

    ChemEnv writes an environment it cannot name with its coordination number (e.g.
    ``"UNKNOWN:18"`` for 18 neighbours, beyond its catalogue of geometries); that is the id of
    ``"UNKNOWN"`` (and ``"UNCLEAR:<n>"`` of ``"UNCLEAR"``).

    Raises:
      ValueError: for any other symbol not in `ENVIRONMENTS`.
    """
    index = {symbol: k for k, symbol in enumerate(ENVIRONMENTS)}
    names = [str(s).split(":")[0] if str(s).split(":")[0] in ("UNKNOWN", "UNCLEAR") else str(s) for s in symbols]
    unknown = sorted(set(names) - index.keys())
    if unknown:
        raise ValueError(f"ChemEnv symbols {unknown} are not in motifs.ENVIRONMENTS")
    return np.array([index[name] for name in names], np.int64)


def motif_graphs(structures: Sequence[ase.Atoms], *, names: Sequence[str] | None = None,
                 num_workers: int | None = None, progress: bool = True
                 ) -> list[MotifGraph | MotifError]:
    """`motif_graph` of many structures in a process pool, in input order.

    A structure whose motifs cannot be found gives its `MotifError` in its slot instead of a
    graph, so one bad structure never stops the rest; the caller counts and skips them.

    Args:
      structures: the crystals.
      names: per-structure names for the errors; default as in `motif_graph`.
      num_workers: processes; default ``os.cpu_count()``; 1 runs in this process. Workers are
        spawned (safe when the caller runs JAX threads), so a calling script needs the usual
        ``if __name__ == "__main__":`` guard.
      progress: show a tqdm progress bar (structures/s on its right).

    Returns:
      One `MotifGraph` or `MotifError` per structure. The throughput is logged at INFO level.
    """
    names = list(names) if names is not None else [None] * len(structures)
    if len(names) != len(structures):
        raise ValueError(f"{len(names)} names for {len(structures)} structures")
    num_workers = num_workers or os.cpu_count() or 1
    start = time.perf_counter()
    bar = tqdm.tqdm(total=len(structures), unit="structure", disable=not progress,
                    desc="motifs")
    if num_workers == 1 or len(structures) <= 1:
        results = []
        for atoms, name in zip(structures, names):
            results.append(_motif_graph_or_error(atoms, name))
            bar.update()
    else:
        results = [None] * len(structures)
        # Spawned, not forked: forking a process that runs JAX threads can deadlock.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            futures = {pool.submit(_motif_graph_or_error, atoms, name): i
                       for i, (atoms, name) in enumerate(zip(structures, names))}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    elapsed = time.perf_counter() - start
    failed = sum(isinstance(r, MotifError) for r in results)
    logger.info("motifs of %d structures (%d failed) in %.1f s: %.2f structures/s on %d workers",
                len(results), failed, elapsed, len(results) / max(elapsed, 1e-9), num_workers)
    return results


def crystalnn_ops_fingerprint(structure, index: int, nn_data=None) -> np.ndarray:
    """CrystalNN "ops" site fingerprint of one site (§2.4; matminer's `CrystalNNFingerprint`
    ``from_preset("ops")``, which robocrys' `get_site_fingerprints` uses).

    For each coordination number k = 1..24 it lists w_k, CrystalNN's weight of CN k, then for each
    target motif of CN k (`CN_TARGET_MOTIFS`) w_k times that motif's local structure order
    parameter over the k neighbours of the CN-k shell (0 where w_k = 0 or the parameter is
    undefined).

    Args:
      structure: pymatgen `Structure`.
      index: site index.
      nn_data: ``CrystalNN().get_nn_data(structure, index)`` if already computed.

    Returns:
      [61] float64, in the order of `FINGERPRINT_LABELS`.
    """
    if nn_data is None:
        from pymatgen.analysis.local_env import CrystalNN

        nn_data = CrystalNN().get_nn_data(structure, index)
    values = []
    for cn in range(1, MAX_CN + 1):
        weight = nn_data.cn_weights.get(cn, 0.0)
        values.append(weight)
        motifs = CN_TARGET_MOTIFS.get(cn, ())
        if not motifs:
            continue
        if weight == 0:
            values.extend([0.0] * len(motifs))
            continue
        sites = [structure[index]] + [entry["site"] for entry in nn_data.cn_nninfo[cn]]
        for motif in motifs:
            value = _order_parameter(cn, motif).get_order_parameters(
                sites, 0, indices_neighs=list(range(1, len(sites))))[0]
            values.append(weight * (value or 0.0))
    return np.asarray(values, np.float64)


@functools.lru_cache(maxsize=None)
def _order_parameter(cn: int, motif: str):
    """pymatgen `LocalStructOrderParams` of one target motif, built once per process."""
    from pymatgen.analysis.local_env import CN_OPT_PARAMS, LocalStructOrderParams

    spec = CN_OPT_PARAMS.get(cn, {}).get(motif, [motif])
    return LocalStructOrderParams([spec[0]], parameters=[spec[1] if len(spec) > 1 else None])


def _motif_graph_or_error(atoms: ase.Atoms, name: str | None) -> MotifGraph | MotifError:
    try:
        return motif_graph(atoms, name=name)
    except MotifError as error:
        return error


def _chemenv_symbols(structure, centers: np.ndarray) -> list[str | None]:
    """ChemEnv symbol of minimum csm of each centre (None where ChemEnv finds none)."""
    from pymatgen.analysis.chemenv.coordination_environments.chemenv_strategies import (
        SimplestChemenvStrategy)
    from pymatgen.analysis.chemenv.coordination_environments.coordination_geometry_finder import (
        LocalGeometryFinder)
    from pymatgen.analysis.chemenv.coordination_environments.structure_environments import (
        LightStructureEnvironments)

    finder = LocalGeometryFinder()
    finder.setup_structure(structure=structure)
    environments = finder.compute_structure_environments(
        maximum_distance_factor=MAXIMUM_DISTANCE_FACTOR, only_cations=True,
        excluded_atoms=[ANION])
    strategy = SimplestChemenvStrategy(distance_cutoff=DISTANCE_CUTOFF, angle_cutoff=ANGLE_CUTOFF,
                                       additional_condition=ADDITIONAL_CONDITION)
    light = LightStructureEnvironments.from_structure_environments(
        strategy=strategy, structure_environments=environments)
    symbols = []
    for center in centers:
        site_environments = light.coordination_environments[center]
        symbols.append(min(site_environments, key=lambda e: e["csm"])["ce_symbol"]
                       if site_environments else None)
    return symbols


def _crystalnn_data(structure) -> list:
    """``CrystalNN().get_nn_data`` of every site (fingerprints and bonds both use it)."""
    from pymatgen.analysis.local_env import CrystalNN

    crystal_nn = CrystalNN()
    return [crystal_nn.get_nn_data(structure, i) for i in range(len(structure))]


def _cation_anion_bonds(nn_data: list, symbols: np.ndarray) -> np.ndarray:
    """Cation–O bonds of the CrystalNN bonded structure, [B, 5] int64 rows (cation, O, image).

    A site's bonded neighbours are its CrystalNN shell of largest weight (what `CrystalNN.
    get_nn_info` returns, and `get_bonded_structure` joins over all sites); a bond found from
    either end counts. Row (c, o, s): O atom o at image s is bonded to cation c at image 0.
    """
    rows = []
    for site, data in enumerate(nn_data):
        shell = data.cn_nninfo[max(data.cn_weights, key=data.cn_weights.get)]
        for entry in shell:
            other, image = entry["site_index"], np.asarray(entry["image"], np.int64)
            if symbols[site] != ANION and symbols[other] == ANION:
                rows.append((site, other, *image))
            elif symbols[site] == ANION and symbols[other] != ANION:
                rows.append((other, site, *(-image)))
    if not rows:
        return np.zeros((0, 5), np.int64)
    return np.unique(np.asarray(rows, np.int64), axis=0)


def _shared_anion_edges(bonds: np.ndarray, centers: np.ndarray, num_atoms: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Motif edges from shared O atoms, plus a self-loop on every motif without one.

    Cation c1 (image 0) bonded to O o at image s1 and cation c2 bonded to o at image s2 share that
    O when c2 is translated by t = s1 - s2; the number of O atoms shared by (c1, c2, t) types the
    edge. Vectorised over all pairs of bonds to the same O atom.

    Returns:
      receivers [E] (motif index of c1), senders [E] (motif of c2), shifts [E, 3] (t),
      sharing [E] int8.
    """
    motif_of = np.full(num_atoms, -1, np.int64)
    motif_of[centers] = np.arange(len(centers))
    bonds = bonds[np.argsort(bonds[:, 1], kind="stable")]
    oxygen = bonds[:, 1]
    group_start = np.searchsorted(oxygen, oxygen, side="left")  # [B]
    group_size = np.searchsorted(oxygen, oxygen, side="right") - group_start  # [B]
    first = np.repeat(np.arange(len(bonds)), group_size)
    within = np.arange(len(first)) - np.repeat(np.cumsum(group_size) - group_size, group_size)
    second = group_start[first] + within
    c1, c2 = bonds[first, 0], bonds[second, 0]
    t = bonds[first, 2:] - bonds[second, 2:]
    keep = ~((c1 == c2) & np.all(t == 0, axis=1))
    keys = np.column_stack([motif_of[c1[keep]], motif_of[c2[keep]], t[keep]])
    keys, counts = np.unique(keys.reshape(-1, 5), axis=0, return_counts=True)
    receivers, senders, shifts = keys[:, 0], keys[:, 1], keys[:, 2:]
    sharing = np.minimum(counts, FACE).astype(np.int8)
    lonely = np.setdiff1d(np.arange(len(centers)), receivers)
    receivers = np.concatenate([receivers, lonely])
    senders = np.concatenate([senders, lonely])
    shifts = np.concatenate([shifts, np.zeros((len(lonely), 3), np.int64)])
    sharing = np.concatenate([sharing, np.full(len(lonely), SELF_LOOP, np.int8)])
    return receivers, senders, shifts, sharing
