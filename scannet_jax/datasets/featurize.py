"""Parallel featurisation of structures and the keyed on-disk feature cache.

``GRAPH_BUILDERS`` maps a graph builder's name (``config.data.graph_builder``) to its settings
type and function: ``voronoi`` (`neighbors.neighbors_from_arrays`, modes ``exact`` and
``original``) and ``knn_line_graph`` (ALIGNN's k-nearest bonds, `knn.py`, with their bond-angle
triplets, `line_graph.py`, stored as the extra set ``triplets``) and ``neighbour_list`` (the LSTM
model's 19-nearest-atom lists as edges and its atom orders as the extra set ``atom_orders``,
`neighbor_lists.py`) and ``radius`` (every neighbour within a cutoff, MEGNet's atom graph,
`radius_graph.py`) and ``motif_dual`` (AMDNet's atom graph within 5 Å as edges and the motif graph
of a metal oxide, `motifs.py`, as the extra sets ``motifs`` and ``motif_edges``). `Featurizer`
runs the builder (and optionally the ring/aromatic flags) over many structures in worker
processes; `build_store` packs the results into a
`GraphStore`. `featurized_store` is how every data set reaches disk: it returns the data
set's store from a directory keyed by the data set name, the featuriser settings, the ring switch
and the store format version (`cache_path`), or reads, featurises and saves it there
(`cached_store`), rebuilding with a logged warning when the saved copy is damaged, half-written or
was made differently. The store is the only on-disk copy of the features.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from ase.data import covalent_radii
from tqdm.auto import tqdm

from scannet_jax import graphs, knn, line_graph, motifs, neighbor_lists, neighbors, radius_graph
from scannet_jax.graphs import CorruptStoreError, GraphStore
from scannet_jax.structures import Structure, to_atoms

log = logging.getLogger(__name__)

CACHE_ENV = "SCANNET_JAX_CACHE"
# Open Babel's bond perception rule: bonded if d <= r_cov(i) + r_cov(j) + 0.45 Å.
BOND_TOLERANCE = 0.45  # Å
# A ring counts as planar if no ring atom lies farther than this from its best-fit plane.
PLANARITY_TOLERANCE = 0.1  # Å


class Featurized(NamedTuple):
    """Compact featuriser output of one structure (E edges, N atoms); satisfies `graphs.NeighborsLike`."""

    receivers: np.ndarray  # [E] int32, centre atom i
    senders: np.ndarray  # [E] int32, neighbour atom j
    distances: np.ndarray  # [E] float32, Å
    solid_angles: np.ndarray  # [E] float32, sr
    weights: np.ndarray  # [E] float32, ρ
    ring_aromatic: np.ndarray | None  # [N, 2] float32 or None
    extras: Mapping[str, Mapping[str, np.ndarray]] | None = None  # extra set -> field -> [T, ...]


class FeaturizationError(RuntimeError):
    """Featurising one structure failed; the message names its position in the input.

    Attributes:
      position: the structure's position in the featurised list.
      kind: the exception type the graph builder raised.
      reason: what it said.
    """

    def __init__(self, position: int, kind: str, reason: str, where: str | None = None):
        super().__init__(f"{where or f'structure {position}'}: {kind}: {reason}")
        self.position, self.kind, self.reason = position, kind, reason


def default_cache_dir() -> Path:
    """`$SCANNET_JAX_CACHE` if set; else `.cache/` of the source checkout holding this package
    (git-ignored); else `~/.cache/scannet_jax`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "setup.cfg").exists() and (checkout / "scannet_jax").is_dir():
        return checkout / ".cache"
    return Path.home() / ".cache" / "scannet_jax"


def cache_path(cache_dir: str | os.PathLike | None, dataset: str, settings: Any, ring: bool) -> Path:
    """The keyed cache directory `<cache_dir>/<dataset>/<settings.key()>-ring<0|1>-store<V>`."""
    root = default_cache_dir() if cache_dir is None else Path(cache_dir)
    return root / dataset / f"{settings.key()}-ring{int(ring)}-store{graphs.STORE_FORMAT_VERSION}"


def cache_metadata(dataset: str, settings: Any, ring: bool) -> dict[str, Any]:
    """What a cached store must have been made with (checked against its manifest)."""
    return {"dataset": dataset, "featurizer": settings.key(), "ring": bool(ring)}


def cached_store(
    path: Path, build: Callable[[], GraphStore], *, metadata: Mapping[str, Any], invalidate: Path | None = None
) -> GraphStore:
    """Loads the store saved at `path`, or builds and saves it.

    A saved store that fails verification (`GraphStore.load`: truncated or missing file,
    checksum, format version, metadata) is never used: a warning is logged, `invalidate`
    (default `path`; e.g. the whole keyed directory) is deleted and
    the store is rebuilt. Processes sharing the cache (several runs, or the processes of one
    multi-host run) take an advisory lock on `<invalidate>.lock` first: one of them builds, the
    others wait and load its result.

    Args:
      path: directory of the saved store.
      build: makes the store when there is no valid copy.
      metadata: saved in, and required of, the manifest.
      invalidate: directory to delete before rebuilding a bad copy.
    """
    lock = Path(f"{invalidate or path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, or its process dies
        if path.exists():
            try:
                return GraphStore.load(path, expect=metadata)
            except CorruptStoreError as err:
                log.warning("Feature cache %s is unusable and will be rebuilt: %s", path, err)
                shutil.rmtree(invalidate or path)
        store = build()
        store.save(path, metadata)
        return store


def _bond_graph(numbers: np.ndarray, positions: np.ndarray) -> list[list[int]]:
    """Adjacency lists of covalent bonds (Open Babel's distance rule, ase covalent radii)."""
    radii = covalent_radii[numbers]
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    bonded = (d <= radii[:, None] + radii[None] + BOND_TOLERANCE) & (d > 0.4)
    return [list(np.flatnonzero(row)) for row in bonded]


def _ring_bonds(adjacency: list[list[int]]) -> set[tuple[int, int]]:
    """Bonds (i < j) lying on a cycle, i.e. all bonds that are not bridges (iterative Tarjan)."""
    n = len(adjacency)
    order, low = [-1] * n, [0] * n
    bridges: set[tuple[int, int]] = set()
    counter = 0
    for root in range(n):
        if order[root] >= 0:
            continue
        order[root] = low[root] = counter
        counter += 1
        stack = [(root, -1, iter(adjacency[root]))]
        while stack:
            v, parent, it = stack[-1]
            for w in it:
                if order[w] < 0:
                    order[w] = low[w] = counter
                    counter += 1
                    stack.append((w, v, iter(adjacency[w])))
                    break
                if w != parent:
                    low[v] = min(low[v], order[w])
            else:
                stack.pop()
                if parent >= 0:
                    low[parent] = min(low[parent], low[v])
                    if low[v] > order[parent]:
                        bridges.add((min(v, parent), max(v, parent)))
    return {(i, j) for i in range(n) for j in adjacency[i] if i < j and (i, j) not in bridges}


def _small_cycles(ring_adjacency: list[list[int]], sizes: tuple[int, ...] = (5, 6)) -> list[list[int]]:
    """All simple cycles of the given lengths, each listed once (starting at its smallest atom)."""
    cycles = []
    longest = max(sizes)
    for start in range(len(ring_adjacency)):
        stack = [[start]]
        while stack:
            path = stack.pop()
            for w in ring_adjacency[path[-1]]:
                if w == start and len(path) in sizes and path[1] < path[-1]:
                    cycles.append(path)
                elif w > start and w not in path and len(path) < longest:
                    stack.append(path + [w])
    return cycles


def ring_aromatic_flags(numbers: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Per-atom [in ring, aromatic] flags from the geometry (NOT Open Babel; see below).

    The original took both flags from Open Babel (scann-reference.md §1.3), which is not
    available here. Instead: bonds are perceived with Open Babel's distance rule
    (d <= r_i + r_j + 0.45 Å, ase covalent radii); an atom is "in ring" when one of its bonds is
    not a bridge of the bond graph (any ring size). An atom is "aromatic" when it lies on a 5- or
    6-membered ring that is planar (every ring atom within 0.1 Å of the best-fit plane) and whose
    atoms are all sp2-like by bond count: C with 3 bonds, N with 2 or 3, O or S with 2 (5-rings
    only). There is no Hückel electron count, so e.g. quinone-like planar rings of sp2 carbons
    are flagged aromatic where Open Babel would not flag them.

    Args:
      numbers: [N] atomic numbers.
      positions: [N, 3] Cartesian coordinates in Å (of a molecule; periodic images ignored).

    Returns:
      float32 [N, 2] of 0/1.
    """
    numbers = np.asarray(numbers)
    positions = np.asarray(positions, np.float64)
    adjacency = _bond_graph(numbers, positions)
    flags = np.zeros((len(numbers), 2), np.float32)
    ring_bonds = _ring_bonds(adjacency)
    ring_adjacency: list[list[int]] = [[] for _ in numbers]
    for i, j in ring_bonds:
        flags[[i, j], 0] = 1
        ring_adjacency[i].append(j)
        ring_adjacency[j].append(i)
    degree = [len(a) for a in adjacency]
    for cycle in _small_cycles(ring_adjacency):
        sp2 = all(
            (numbers[a] == 6 and degree[a] == 3) or (numbers[a] == 7 and degree[a] in (2, 3))
            or (numbers[a] in (8, 16) and degree[a] == 2 and len(cycle) == 5)
            for a in cycle)
        if not sp2:
            continue
        ring = positions[cycle] - positions[cycle].mean(0)
        normal = np.linalg.svd(ring)[2][-1]
        if np.abs(ring @ normal).max() <= PLANARITY_TOLERANCE:
            flags[cycle, 1] = 1
    return flags


class GraphBuilder(NamedTuple):
    """One registered graph builder.

    Attributes:
      settings: its settings type: a frozen dataclass whose fields are the keys of
        ``config.data.featurizer`` and whose ``key()`` names every feature cache it makes.
      build: ``(structure, settings) -> graphs.NeighborsLike`` (edges sorted by receiver); a
        builder with extra sets also returns ``extras``: set name -> field -> rows of the structure.
      extras: the extra sets it makes (`graphs.ExtraSet`), set name -> its ``refers`` (index field ->
        "nodes", "edges" or another set); `build_store` adds them to the store.
    """

    settings: type
    build: Callable[[Structure, Any], graphs.NeighborsLike]
    extras: Mapping[str, Mapping[str, str]] = {}


GRAPH_BUILDERS: dict[str, GraphBuilder] = {}


def register_graph_builder(name: str, builder: GraphBuilder) -> None:
    """Adds a graph builder under ``name`` (``config.data.graph_builder``)."""
    if name in GRAPH_BUILDERS:
        raise ValueError(f"graph builder {name!r} is already registered")
    GRAPH_BUILDERS[name] = builder


def graph_settings(name: str, values: Mapping[str, Any]) -> Any:
    """The settings of graph builder ``name`` from ``config.data.featurizer``'s values.

    Raises:
      ValueError: for an unknown builder (listing the registered ones) or keys its settings lack.
    """
    if name not in GRAPH_BUILDERS:
        raise ValueError(f"config.data.graph_builder={name!r}: unknown; registered: {', '.join(sorted(GRAPH_BUILDERS))}")
    try:
        return GRAPH_BUILDERS[name].settings(**values)
    except TypeError as err:
        raise ValueError(f"config.data.featurizer for graph builder {name!r}: {err}") from err


def _voronoi(structure: Structure, settings: Any) -> graphs.NeighborsLike:
    periodic = structure.periodic
    return neighbors.neighbors_from_arrays(
        structure.numbers, structure.positions, structure.cell if periodic else None,
        tuple(bool(p) for p in structure.pbc), cutoff=settings.cutoff,
        min_solid_angle=settings.min_solid_angle, min_relative_weight=settings.min_relative_weight,
        mode=settings.mode)


def featurize_one(structure: Structure, settings: Any, ring: bool) -> Featurized:
    """Edges of one structure from the graph builder whose settings ``settings`` are (and
    optionally the ring/aromatic flags), in compact dtypes.

    Raises:
      TypeError: if no registered builder takes settings of this type.
    """
    builder = builder_of(settings)
    nb = builder.build(structure, settings)
    return Featurized(
        receivers=np.asarray(nb.receivers, np.int32), senders=np.asarray(nb.senders, np.int32),
        distances=np.asarray(nb.distances, np.float32), solid_angles=np.asarray(nb.solid_angles, np.float32),
        weights=np.asarray(nb.weights, np.float32),
        ring_aromatic=ring_aromatic_flags(structure.numbers, structure.positions) if ring else None,
        extras=getattr(nb, "extras", None) if builder.extras else None)


def builder_of(settings: Any) -> GraphBuilder:
    """The registered graph builder whose settings type ``settings`` is.

    Raises:
      TypeError: if no registered builder takes settings of this type.
    """
    builder = next((b for b in GRAPH_BUILDERS.values() if isinstance(settings, b.settings)), None)
    if builder is None:
        raise TypeError(f"no registered graph builder takes {type(settings).__name__} settings")
    return builder


register_graph_builder("voronoi", GraphBuilder(neighbors.FeaturizerSettings, _voronoi))


@dataclasses.dataclass(frozen=True)
class KnnLineGraphSettings:
    """ALIGNN's graphs (zoo-reference.md §1.2-1.3): k-nearest bonds (`knn.knn_from_arrays`, ties
    kept, cutoff grown until every atom has k) and their bond-angle line graph (`line_graph`)."""

    cutoff: float = 8.0  # Å, initial search radius (the reference's default)
    max_neighbors: int = 12  # k

    def __post_init__(self) -> None:
        if self.cutoff <= 0 or self.max_neighbors < 1:
            raise ValueError(f"KnnLineGraphSettings: need cutoff > 0 and max_neighbors >= 1, got "
                             f"{self.cutoff}, {self.max_neighbors}")

    def key(self) -> str:
        """Stable directory name, e.g. ``knn1-k12-d8-lg1``."""
        return f"knn{KNN_LINE_GRAPH_VERSION}-k{self.max_neighbors}-d{self.cutoff:g}-lg1"


KNN_LINE_GRAPH_VERSION = 1  # bump when the bonds or triplets of a structure change


class KnnLineGraph(NamedTuple):
    """One structure's k-NN bonds (`graphs.NeighborsLike`; no Voronoi weights: Ω and ρ are 0) and
    its triplets as the extra set ``triplets``: ``senders`` k1 = a -> b and ``receivers`` k2 = b -> c,
    local edge indices; ``cosines`` float32 cos θ_abc from the bond vectors."""

    receivers: np.ndarray  # [E] int64
    senders: np.ndarray  # [E] int64
    distances: np.ndarray  # [E] float64, Å, |bond vector|
    solid_angles: np.ndarray  # [E] zeros
    weights: np.ndarray  # [E] zeros
    vectors: np.ndarray  # [E, 3] float64, Å, x_sender (at its image) - x_receiver
    extras: dict[str, dict[str, np.ndarray]]


TRIPLETS_REFER = {"senders": "edges", "receivers": "edges"}


def _knn_line_graph(structure: Structure, settings: KnnLineGraphSettings) -> KnnLineGraph:
    bonds = knn.knn_from_arrays(structure.positions, structure.cell if structure.periodic else None,
                                tuple(bool(p) for p in structure.pbc), cutoff=settings.cutoff,
                                max_neighbors=settings.max_neighbors)
    lg = line_graph.line_graph(bonds.senders, bonds.receivers, bonds.vectors)
    zeros = np.zeros(len(bonds.senders), np.float32)
    triplets = {"senders": lg.senders.astype(np.int32), "receivers": lg.receivers.astype(np.int32),
                "cosines": lg.cosines.astype(np.float32)}
    return KnnLineGraph(bonds.receivers, bonds.senders, bonds.distances, zeros, zeros, bonds.vectors,
                        {"triplets": triplets})


register_graph_builder("knn_line_graph", GraphBuilder(KnnLineGraphSettings, _knn_line_graph,
                                                      {"triplets": TRIPLETS_REFER}))


@dataclasses.dataclass(frozen=True)
class NeighbourListSettings:
    """The LSTM model's inputs (zoo-reference.md §3.2, `neighbor_lists`): per atom its K nearest
    atoms (periodic images included), ties broken by `neighbor_lists`' shell rule, and the
    fractional-coordinate atom order of each distinct setting in ``settings`` (a key of
    `neighbor_lists.SETTINGS`: ``original``, ``swaps`` (§3.3's augmentation) or ``permutations``)."""

    num_neighbours: int = neighbor_lists.NUM_NEIGHBOURS  # K
    tolerance: float = neighbor_lists.TIE_TOLERANCE  # Å, largest distance gap within a shell
    settings: str = "original"

    def __post_init__(self) -> None:
        if self.num_neighbours < 1 or self.tolerance < 0:
            raise ValueError(f"NeighbourListSettings: need num_neighbours >= 1 and tolerance >= 0, got "
                             f"{self.num_neighbours}, {self.tolerance}")
        if self.settings not in neighbor_lists.SETTINGS:
            raise ValueError(f"NeighbourListSettings: settings must be one of {sorted(neighbor_lists.SETTINGS)}, "
                             f"got {self.settings!r}")

    def key(self) -> str:
        """Stable directory name, e.g. ``nl1-k19-t0.001-original``."""
        return f"nl{NEIGHBOUR_LIST_VERSION}-k{self.num_neighbours}-t{self.tolerance:g}-{self.settings}"


NEIGHBOUR_LIST_VERSION = 1  # bump when the lists or orders of a structure change


class NeighbourListGraph(NamedTuple):
    """One structure's neighbour lists as edges (`graphs.NeighborsLike`): receiver = centre atom,
    sender = neighbour, sorted by receiver then rank in the list (rank = offset from the receiver's
    first edge), distances |r_j + shift - r_i|; Ω and ρ are 0. Extra set ``atom_orders``: field
    ``atoms`` (local atom indices, refers to "nodes"), the order of every kept setting one after the
    other, the original first (`neighbor_lists.setting_orders`)."""

    receivers: np.ndarray  # [E] int64
    senders: np.ndarray  # [E] int64
    distances: np.ndarray  # [E] float64, Å
    solid_angles: np.ndarray  # [E] zeros
    weights: np.ndarray  # [E] zeros
    extras: dict[str, dict[str, np.ndarray]]


def _neighbour_list(structure: Structure, settings: NeighbourListSettings) -> NeighbourListGraph:
    lists = neighbor_lists.nearest_neighbour_lists(*structure, num_neighbours=settings.num_neighbours,
                                                   tolerance=settings.tolerance)
    n = len(structure.numbers)
    receivers = np.repeat(np.arange(n), lists.mask.sum(1))  # the mask is a prefix of every row
    orders, _ = neighbor_lists.setting_orders(structure.numbers, structure.positions, structure.cell,
                                              structure.pbc, neighbor_lists.SETTINGS[settings.settings])
    zeros = np.zeros(len(receivers), np.float32)
    return NeighbourListGraph(receivers, lists.indices[lists.mask], lists.distances[lists.mask], zeros, zeros,
                              {neighbor_lists.ATOM_ORDERS: {"atoms": orders.astype(np.int32)}})


register_graph_builder("neighbour_list", GraphBuilder(NeighbourListSettings, _neighbour_list,
                                                      {neighbor_lists.ATOM_ORDERS: {"atoms": "nodes"}}))


@dataclasses.dataclass(frozen=True)
class RadiusSettings:
    """MEGNet's and AMDNet's atom graph (zoo-reference.md §2.5, `radius_graph`): every neighbour
    (periodic images included, the centre itself excluded) within ``cutoff``."""

    cutoff: float = radius_graph.DEFAULT_CUTOFF  # Å

    def __post_init__(self) -> None:
        if not self.cutoff > 0:
            raise ValueError(f"RadiusSettings: need cutoff > 0, got {self.cutoff}")

    def key(self) -> str:
        """Stable directory name, e.g. ``radius1-d5``."""
        return f"radius{RADIUS_VERSION}-d{self.cutoff:g}"


RADIUS_VERSION = 1  # bump when the edges of a structure change


class RadiusGraph(NamedTuple):
    """One structure's edges within the cutoff (`graphs.NeighborsLike`; Ω and ρ are 0), sorted by
    receiver (centre atom), then distance, then sender."""

    receivers: np.ndarray  # [E] int64
    senders: np.ndarray  # [E] int64
    distances: np.ndarray  # [E] float64, Å
    solid_angles: np.ndarray  # [E] zeros
    weights: np.ndarray  # [E] zeros


def _radius(structure: Structure, settings: RadiusSettings) -> RadiusGraph:
    nb = radius_graph.radius_neighbors_from_arrays(structure.positions, structure.cell, structure.pbc,
                                                   cutoff=settings.cutoff)
    zeros = np.zeros(len(nb.receivers), np.float32)
    return RadiusGraph(nb.receivers, nb.senders, nb.distances, zeros, zeros)


register_graph_builder("radius", GraphBuilder(RadiusSettings, _radius))


@dataclasses.dataclass(frozen=True)
class MotifDualSettings:
    """AMDNet's two graphs of a metal oxide (zoo-reference.md §2.3–2.5): the `radius` atom graph
    within ``cutoff`` as the edges, and the motif graph (`motifs.motif_graph`) as two extra sets."""

    cutoff: float = radius_graph.DEFAULT_CUTOFF  # Å, of the atom graph

    def __post_init__(self) -> None:
        if not self.cutoff > 0:
            raise ValueError(f"MotifDualSettings: need cutoff > 0, got {self.cutoff}")

    def key(self) -> str:
        """Stable directory name, e.g. ``motifdual1-d5``."""
        return f"motifdual{MOTIF_DUAL_VERSION}-d{self.cutoff:g}"


MOTIF_DUAL_VERSION = 1  # bump when the atom or motif graph of a structure changes
MOTIF_SETS = {"motifs": {"centers": "nodes"}, "motif_edges": {"senders": "motifs", "receivers": "motifs"}}


class MotifDualGraph(NamedTuple):
    """One oxide's atom graph (as `RadiusGraph`) and its motif graph as the extra sets

    * ``motifs``, one row per cation (non-O site, in site order): ``centers`` its atom (refers to
      "nodes"), ``features`` float32 [M, 61] its CrystalNN "ops" fingerprint
      (`motifs.FINGERPRINT_LABELS`), ``environments`` int32 its ChemEnv symbol of minimum csm as
      an index into `motifs.ENVIRONMENTS`;
    * ``motif_edges``, one row per pair of motifs sharing O atoms (per periodic image of the
      neighbour), sorted by receiver: ``receivers`` motif i, ``senders`` motif j (both refer to
      "motifs"), ``distances`` float32 Å between the two centres, ``sharing`` int8
      `motifs.CORNER`, `EDGE` or `FACE`; a motif sharing no O atom has one self-loop of distance 0
      (`motifs.SELF_LOOP`).

    The edges are those the released generator meant to write: its `collect_neighbors` names an
    edge's source ``element + site index`` but its target the bare element and keeps only targets
    among the sources, which drops every edge (§2.5); `motifs.motif_graph` joins site indices, so
    the edges survive.
    """

    receivers: np.ndarray  # [E] int64
    senders: np.ndarray  # [E] int64
    distances: np.ndarray  # [E] float64, Å
    solid_angles: np.ndarray  # [E] zeros
    weights: np.ndarray  # [E] zeros
    extras: dict[str, dict[str, np.ndarray]]


def _motif_dual(structure: Structure, settings: MotifDualSettings) -> MotifDualGraph:
    """Raises `motifs.MotifError` (naming the formula) for a non-oxide or failed motif analysis;
    the `Featurizer` reports it as that structure's `FeaturizationError`."""
    atoms = to_atoms(structure)
    found = motifs.motif_graph(atoms, name=atoms.get_chemical_formula())
    edges = _radius(structure, RadiusSettings(settings.cutoff))
    return MotifDualGraph(*edges, {
        "motifs": {"centers": found.centers.astype(np.int32), "features": found.features.astype(np.float32),
                   "environments": motifs.environment_ids(found.environments).astype(np.int32)},
        "motif_edges": {"receivers": found.receivers.astype(np.int32), "senders": found.senders.astype(np.int32),
                        "distances": found.distances.astype(np.float32), "sharing": found.sharing}})


register_graph_builder("motif_dual", GraphBuilder(MotifDualSettings, _motif_dual, MOTIF_SETS))


def _work(task: tuple[int, Structure, Any, bool]) -> tuple[int, Featurized | None, tuple[str, str] | None]:
    position, structure, settings, ring = task
    try:
        return position, featurize_one(structure, settings, ring), None
    except Exception as err:  # noqa: BLE001 - reported with the structure's position
        return position, None, (type(err).__name__, str(err))


class Featurizer:
    """Featurises structures with fixed settings, in a pool of worker processes kept until `close`.

    The one featuriser of the package: data sets build their stores with it
    (`featurize_structures`) and the predictor keeps one for its calls. Workers are started with
    the "spawn" method (safe when the parent has started JAX threads) on first use, so a calling
    script needs the usual `if __name__ == "__main__":` guard; a worker that dies raises
    `BrokenProcessPool` instead of hanging. Lists shorter than `min_parallel` structures, or
    `num_workers` <= 1, run in this process.

    Args:
      settings: `neighbors.FeaturizerSettings` (mode, cutoff, min_solid_angle, min_relative_weight).
      ring: also compute `ring_aromatic_flags`.
      num_workers: processes (default os.cpu_count()).
      min_parallel: smallest list sent to the workers.
    """

    def __init__(self, settings: Any, *, ring: bool = False, num_workers: int | None = None,
                 min_parallel: int = 64):
        self.settings, self.ring = settings, ring
        self.num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        self.min_parallel = min_parallel
        self._pool: ProcessPoolExecutor | None = None

    def map(self, structures: Sequence[Structure], *, progress: bool = False,
            desc: str = "featurizing") -> Iterator[Featurized | FeaturizationError]:
        """Yields one `Featurized` per structure in input order, or the `FeaturizationError`
        (naming the position in `structures`) of a structure that failed; the others go on."""
        tasks = ((k, s, self.settings, self.ring) for k, s in enumerate(structures))
        if self.num_workers > 1 and len(structures) >= self.min_parallel:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"))
            chunksize = max(8, min(64, -(-len(structures) // (8 * self.num_workers))))
            results = self._pool.map(_work, tasks, chunksize=chunksize)
        else:
            results = map(_work, tasks)
        with tqdm(total=len(structures), desc=desc, disable=not progress, unit="structure") as bar:
            for position, featurized, error in results:
                bar.update()
                yield featurized if error is None else FeaturizationError(position, *error)

    def close(self) -> None:
        """Stops the worker processes (if any were started)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Featurizer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def featurize_structures(
    structures: Sequence[Structure],
    settings: Any,
    *,
    ring: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    desc: str = "featurizing",
    skip: Collection[str] = (),
) -> Iterator[Featurized | FeaturizationError]:
    """Featurises structures (`Featurizer`, its pool closed at the end), in input order.

    A structure that fails with an error kind in ``skip`` (e.g. ``"MotifError"``) yields its
    `FeaturizationError` in its place, for the caller to leave out.

    Raises:
      FeaturizationError: naming the position of the first structure that failed otherwise.
    """
    with Featurizer(settings, ring=ring, num_workers=num_workers) as featurizer:
        for result in featurizer.map(structures, progress=progress, desc=desc):
            if isinstance(result, FeaturizationError) and result.kind not in skip:
                raise result
            yield result


def build_store(
    structures: Sequence[Structure],
    settings: Any,
    *,
    targets: Mapping[str, Sequence[float]] | None = None,
    index: Sequence[int] | None = None,
    ring: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    skip: Collection[str] = (),
    describe: Callable[[int], str] | None = None,
) -> GraphStore:
    """Featurises `structures` (see `featurize_structures`) into a `GraphStore`.

    Args:
      structures: S structures.
      settings: `neighbors.FeaturizerSettings`.
      targets: name -> S raw target values.
      index: S data-set indices (default 0..S-1).
      ring: add ring/aromatic flags.
      num_workers: processes.
      progress: show a progress bar.
      skip: error kinds whose structures are left out of the store, each logged (named by
        ``describe``) and listed in ``metadata["skipped"]`` (data-set index -> reason); the
        store's ``index`` says which structures each row is.
      describe: names structure ``k`` in messages (default "structure k").
    """
    results = list(featurize_structures(structures, settings, ring=ring, num_workers=num_workers,
                                        progress=progress, skip=skip))
    index = np.arange(len(structures)) if index is None else np.asarray(index, np.int64)
    kept = [k for k, r in enumerate(results) if not isinstance(r, FeaturizationError)]
    skipped = {}
    for k in sorted(set(range(len(results))) - set(kept)):
        error = results[k]
        log.warning("%s skipped: %s: %s", describe(k) if describe else f"structure {k}", error.kind, error.reason)
        skipped[str(int(index[k]))] = f"{error.kind}: {error.reason}"
    if skipped:
        log.warning("%d of %d structures skipped (%s)", len(skipped), len(results), ", ".join(sorted(skip)))
    store = store_from_featurized([structures[k].numbers for k in kept], [results[k] for k in kept], settings,
                                  targets=None if targets is None else
                                  {name: [values[k] for k in kept] for name, values in targets.items()},
                                  index=index[kept], ring=ring)
    return dataclasses.replace(store, metadata={**store.metadata, "skipped": skipped}) if skipped else store


def store_from_featurized(
    numbers: Sequence[np.ndarray],
    featurized: Sequence[Featurized],
    settings: Any,
    *,
    targets: Mapping[str, Sequence[float]] | None = None,
    index: Sequence[int] | None = None,
    ring: bool = False,
) -> GraphStore:
    """Packs featurised structures into a `GraphStore`, with the extra sets (e.g. ALIGNN's
    triplets) of the graph builder whose settings ``settings`` are.

    Args:
      numbers: S arrays [N_s] of atomic numbers.
      featurized: S `Featurized`, from that builder.
      settings: the builder's settings.
      targets, index: as `graphs.GraphStore.from_structures`.
      ring: the structures carry ring/aromatic flags.
    """
    store = GraphStore.from_structures(
        numbers, featurized, targets=targets, index=index,
        ring_aromatic=[f.ring_aromatic for f in featurized] if ring else None)
    for name, refers in builder_of(settings).extras.items():
        store = store.with_extra(name, [f.extras[name] for f in featurized], refers)
    return store


def periodicity(structures: Sequence[Structure]) -> bool | None:
    """True if every structure is a crystal, False if every one is a molecule, None if mixed."""
    kinds = {s.periodic for s in structures}
    return kinds.pop() if len(kinds) == 1 else None


def featurized_store(
    dataset: str,
    read: Callable[[], tuple[Sequence[Structure], Mapping[str, Sequence[float]]]],
    settings: Any,
    *,
    ring: bool = False,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
    describe: Callable[[int], str] | None = None,
    skip: Collection[str] = (),
) -> GraphStore:
    """The featurised store of a data set, from the keyed feature cache or built into it.

    Every data set loader goes through here: the store saved under
    `cache_path(cache_dir, dataset, settings, ring)` is loaded if it verifies; otherwise `read`
    is called, its structures are featurised (`build_store`, in input order, ``index`` =
    0..S-1) and the store is saved there (`cached_store`: locked, written completely before it
    is used, a bad copy rebuilt), with ``metadata["periodic"]`` = `periodicity` of the structures
    (what a model trained on them may be applied to).

    Args:
      dataset: the cache name of the data set, including whatever identifies its content (a
        file digest, ``qm9-first<limit>``).
      read: returns the S structures and name -> S raw target values; called only to build.
      settings: the graph builder's settings (e.g. `neighbors.FeaturizerSettings`).
      ring: add per-atom [in ring, aromatic] flags.
      cache_dir: cache root (None = `default_cache_dir()`).
      num_workers: featurisation processes (None = all cores).
      describe: names structure ``k`` in a `FeaturizationError` (default "structure k").
      skip: error kinds whose structures are left out (`build_store`); a store loaded from the
        cache logs how many were (its ``metadata["skipped"]``).

    Raises:
      FeaturizationError: naming the first structure whose graph could not be built (and
        whose error kind is not in ``skip``).
    """
    path = cache_path(cache_dir, dataset, settings, ring)
    built = False

    def build() -> GraphStore:
        nonlocal built
        built = True
        structures, targets = read()
        try:
            store = build_store(structures, settings, targets=targets, ring=ring, num_workers=num_workers,
                                skip=skip, describe=describe)
        except FeaturizationError as err:
            if describe is None:
                raise
            raise FeaturizationError(err.position, err.kind, err.reason, where=describe(err.position)) from err
        return dataclasses.replace(store, metadata={**store.metadata, "periodic": periodicity(structures)})

    store = cached_store(path / "graphs", build, metadata=cache_metadata(dataset, settings, ring), invalidate=path)
    skipped = store.metadata.get("skipped", {})
    if skipped and not built:
        log.warning("%s: %d structures left out when the feature cache was built (%s): %s", dataset, len(skipped),
                    ", ".join(sorted(skip)), "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items(), key=lambda kv:
                                                                                     int(kv[0]))))
    return store
