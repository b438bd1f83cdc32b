"""Ball-and-stick pictures of molecules and crystals with atoms coloured by a per-atom value.

Atoms are drawn as balls (discs, depth-sorted with the sticks), coloured by the value (by default
the global-attention (GA) score, on a 0 → max colour scale shown as a colour bar), with radii that
grow with the covalent radius. Bonds are sticks between atoms closer than
``bond_scale · (r_i + r_j)`` (covalent radii, `ase.data.covalent_radii`), found through periodic
images in crystals. A crystal is drawn with its cell (or a supercell, ``repeat``) outlined; atoms
on a cell face, edge or corner are also drawn on the opposite ones, as crystallographers draw
cells; bonds to atoms outside the drawn cell are left out unless ``outside_bonds`` (then they are
half sticks pointing to the outside atom).
Atoms are labelled with symbol and index ("N3", as in the prediction table) in small structures.
"""

from __future__ import annotations

import itertools
import os
from typing import NamedTuple

import ase
import numpy as np
from ase.data import covalent_radii
from ase.neighborlist import neighbor_list
from ase.utils import rotate

from scannet_jax import atomic

COLORMAP = "viridis"
MAX_LABELLED_ATOMS = 40  # larger structures are drawn without atom labels
ROTATION = "10x,20y,0z"  # a slight tilt so that planar molecules are not seen edge-on
BOND_SCALE = 1.2  # bond where d < BOND_SCALE * (r_i + r_j), covalent radii
STICK_WIDTH = 0.12  # Å
CIRCLE_VERTICES = 48  # a ball is drawn as a polygon of this many vertices
BOUNDARY_TOLERANCE = 1e-3  # fractional coordinate within this of 0 (or 1) lies on a cell face
# Elements that are not metals (noble gases, nonmetals, metalloids); every other element is a metal.
NONMETALS = frozenset("H He B C N O F Ne Si P S Cl Ar Ge As Se Br Kr Sb Te I Xe At Rn".split())


class Bonds(NamedTuple):
    """Undirected bonds, each listed once.

    Attributes:
      first: int64 [B], atom i.
      second: int64 [B], atom j (i < j, or i == j for a bond to its own periodic image).
      shifts: int64 [B, 3], the bonded image of j is at ``positions[j] + shifts @ cell``.
      lengths: float64 [B], Å.
    """

    first: np.ndarray
    second: np.ndarray
    shifts: np.ndarray
    lengths: np.ndarray


def _directed_bonds(atoms: ase.Atoms, bond_scale: float, metal_metal: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both directions of every bond: (i [2B], j [2B], shifts [2B, 3], lengths [2B])."""
    if len(atoms) == 0:
        return (np.zeros(0, np.int64),) * 2 + (np.zeros((0, 3), np.int64), np.zeros(0))
    radii = bond_scale * covalent_radii[atoms.numbers]  # pairs with d < radii[i] + radii[j]
    i, j, shifts, d = neighbor_list("ijSd", atoms, radii, self_interaction=False)
    if not metal_metal:
        metal = np.array([s not in NONMETALS for s in atoms.get_chemical_symbols()])
        keep = ~(metal[i] & metal[j])
        i, j, shifts, d = i[keep], j[keep], shifts[keep], d[keep]
    return i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int64), d


def find_bonds(atoms: ase.Atoms, *, bond_scale: float = BOND_SCALE, metal_metal: bool = False) -> Bonds:
    """Bonds from covalent radii: atoms i, j (or a periodic image of j) closer than
    ``bond_scale · (r_i + r_j)``.

    Covalent radii overstate the bonds between electropositive atoms of ionic solids (rock-salt
    Na–Na at 3.99 Å against 1.2 · (1.66 + 1.66) = 3.98 Å; Sr–Sr and Sr–Ti in SrTiO3 at 3.9 and
    3.4 Å fall inside), so metal–metal pairs are not bonded unless ``metal_metal`` (for metal
    clusters and alloys).

    Args:
      atoms: a molecule or a periodic structure (N atoms).
      bond_scale: tolerance factor on the sum of covalent radii.
      metal_metal: also bond two metal atoms (every element outside `NONMETALS`).

    Returns:
      The B bonds, each once.
    """
    i, j, shifts, d = _directed_bonds(atoms, bond_scale, metal_metal)
    first_nonzero = shifts[np.arange(len(shifts)), np.argmax(shifts != 0, axis=1)]  # 0 for no shift
    once = (i < j) | ((i == j) & (first_nonzero > 0))  # of (i, j, S) and (j, i, -S) keep one
    return Bonds(i[once], j[once], shifts[once], d[once])


class _Drawn(NamedTuple):
    """The atom copies drawn: atom index [M], cell offset [M, 3] (in cells), position [M, 3] (Å)."""

    index: np.ndarray
    offset: np.ndarray
    positions: np.ndarray


def _drawn_copies(atoms: ase.Atoms) -> _Drawn:
    """Every atom once, plus for a crystal its copies on the opposite face/edge/corner."""
    n = len(atoms)
    index, offsets = list(range(n)), [np.zeros(3, np.int64)] * n
    if atoms.pbc.any():
        frac = atoms.cell.scaled_positions(atoms.positions)
        for k in range(n):
            options = [(0, 1) if atoms.pbc[a] and abs(frac[k, a]) < BOUNDARY_TOLERANCE else (0,)
                       for a in range(3)]
            for offset in itertools.product(*options):
                if any(offset):
                    index.append(k)
                    offsets.append(np.array(offset, np.int64))
    index, offsets = np.array(index, np.int64), np.array(offsets, np.int64).reshape(-1, 3)
    return _Drawn(index, offsets, atoms.positions[index] + offsets @ atoms.cell[:])


def _cell_edges(cell: np.ndarray) -> np.ndarray:
    """[12, 2, 3] the edges of the parallelepiped spanned by the rows of ``cell`` (Å)."""
    corners = np.array(list(itertools.product((0, 1), repeat=3)))
    edges = [(a, b) for a, b in itertools.combinations(range(8), 2)
             if np.abs(corners[a] - corners[b]).sum() == 1]
    return np.array([[corners[a] @ cell, corners[b] @ cell] for a, b in edges])


def _stick(p: np.ndarray, q: np.ndarray, width: float) -> np.ndarray:
    """[4, 2] corners of a stick of ``width`` from 2-D point p to q."""
    direction = q - p
    normal = np.array([-direction[1], direction[0]]) / max(float(np.linalg.norm(direction)), 1e-12)
    half = 0.5 * width * normal
    return np.array([p + half, q + half, q - half, p - half])


class Drawing(NamedTuple):
    """What `draw_structure` drew: one collection of balls, half sticks and cell edges, back to front.

    Attributes:
      collection: the matplotlib ``PolyCollection`` added to the axes.
      atom_index: int64 [M], for each ball (drawn copy, boundary copies included) its atom in the
        (repeated) structure.
      ball_colors: float64 [M, 4], RGBA of each ball.
      sticks: float64 [H, 2, 2], screen start and end of each half stick (a bond between two drawn
        atoms is two halves meeting at its middle).
      cell_lines: float64 [12, 2, 2], screen ends of the (super)cell's edges; [0, 2, 2] for a
        molecule.
    """

    collection: object
    atom_index: np.ndarray
    ball_colors: np.ndarray
    sticks: np.ndarray
    cell_lines: np.ndarray


def _check_inputs(atoms: ase.Atoms, values: np.ndarray, repeat: tuple[int, ...]) -> tuple[np.ndarray, tuple]:
    values = np.asarray(values, np.float64)
    if values.shape != (len(atoms),) or not np.isfinite(values).all():
        raise ValueError(f"render_ga: need {len(atoms)} finite GA scores, got shape {values.shape}")
    repeat = tuple(int(r) for r in repeat)
    if len(repeat) != 3 or min(repeat) < 1 or any(r > 1 and not p for r, p in zip(repeat, atoms.pbc)):
        raise ValueError(f"render_ga: repeat={repeat} must be three integers >= 1, 1 along "
                         f"non-periodic directions (pbc={atoms.pbc.tolist()})")
    return values, repeat


def draw_structure(ax, atoms: ase.Atoms, values: np.ndarray, *, norm, cmap, rotation: str = ROTATION,
                   repeat: tuple[int, int, int] = (1, 1, 1), bonds: bool = True,
                   bond_scale: float = BOND_SCALE, metal_metal: bool = False,
                   outside_bonds: bool = False) -> Drawing:
    """Draws ``atoms`` as balls and sticks into matplotlib axes ``ax`` (arguments as `render_ga`).

    Balls, sticks and cell edges go into one ``PolyCollection`` ordered by depth (painter's
    algorithm), which is also what keeps large structures fast to draw.

    Args:
      ax: matplotlib axes; limits and aspect are set to fit the structure.
      atoms: N atoms.
      values: [N] per-atom values, coloured with ``cmap(norm(value))``.
      norm, cmap: matplotlib normalisation and colour map.

    Returns:
      What was drawn.
    """
    from matplotlib.collections import PolyCollection

    values, repeat = _check_inputs(atoms, values, repeat)
    n_original = len(atoms)
    if repeat != (1, 1, 1):
        atoms = atoms.repeat(repeat)  # copies in blocks of N atoms
        values = np.tile(values, int(np.prod(repeat)))
    drawn = _drawn_copies(atoms)
    view = rotate(rotation)
    projected = drawn.positions @ view  # [M, 3]; x, y on screen, z towards the viewer
    draw_radius = 0.2 + 0.2 * covalent_radii[atoms.numbers[drawn.index]]  # Å
    ball_colors = np.array([cmap(norm(v)) for v in values[drawn.index]]).reshape(-1, 4)
    angles = np.linspace(0.0, 2 * np.pi, CIRCLE_VERTICES, endpoint=False)
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # [C, 2]
    # (polygon [P, 2], depth, face colour, edge colour, line width) of everything drawn
    items = [(projected[k, :2] + draw_radius[k] * circle, projected[k, 2] + 1e-3, ball_colors[k], "black", 0.6)
             for k in range(len(drawn.index))]
    sticks = []
    if bonds:
        i, j, shifts, _ = _directed_bonds(atoms, bond_scale, metal_metal)
        cell = atoms.cell[:]
        copies = {(int(a), *map(int, o)) for a, o in zip(drawn.index, drawn.offset)}
        for k in range(len(drawn.index)):  # a half stick from each drawn copy towards each partner
            mine = np.flatnonzero(i == drawn.index[k])
            if not outside_bonds:
                offsets = shifts[mine] + drawn.offset[k]
                mine = mine[[(int(b), *map(int, o)) in copies for b, o in zip(j[mine], offsets)]]
            partner = atoms.positions[j[mine]] + (shifts[mine] + drawn.offset[k]) @ cell
            start = projected[k]
            for end in (0.5 * (drawn.positions[k] + partner)) @ view:
                sticks.append([start[:2], end[:2]])
                items.append((_stick(start[:2], end[:2], STICK_WIDTH), 0.5 * (start[2] + end[2]), "0.5", "none", 0.0))
    cell_lines = np.zeros((0, 2, 2))
    extent = projected[:, :2]
    if atoms.pbc.any():
        edges = _cell_edges(atoms.cell[:]) @ view  # [12, 2, 3]
        cell_lines = edges[:, :, :2]
        items += [(e[:, :2], e[:, 2].mean(), "none", "black", 0.8) for e in edges]
        extent = np.vstack([cell_lines.reshape(-1, 2), extent])
    items.sort(key=lambda item: item[1])
    collection = PolyCollection([it[0] for it in items], facecolors=[it[2] for it in items],
                                edgecolors=[it[3] for it in items], linewidths=[it[4] for it in items])
    ax.add_collection(collection)
    if n_original <= MAX_LABELLED_ATOMS:
        for k in np.flatnonzero((drawn.index < n_original) & ~drawn.offset.any(axis=1)):
            a = drawn.index[k]
            ax.annotate(f"{atoms[a].symbol}{a}", projected[k, :2], ha="center", va="center", fontsize=7,
                        color="white" if norm(values[a]) < 0.6 else "black", zorder=3)
    margin = float(draw_radius.max()) + 0.3 if len(draw_radius) else 1.0
    low, high = extent.min(axis=0) - margin, extent.max(axis=0) + margin
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_aspect("equal")
    ax.set_axis_off()
    return Drawing(collection, drawn.index, ball_colors, np.array(sticks).reshape(-1, 2, 2), cell_lines)


def render_ga(atoms: ase.Atoms, ga_scores: np.ndarray, path: str | os.PathLike, title: str,
              *, rotation: str = ROTATION, dpi: int = 120, repeat: tuple[int, int, int] = (1, 1, 1),
              bonds: bool = True, bond_scale: float = BOND_SCALE, metal_metal: bool = False,
              outside_bonds: bool = False, colorbar_label: str = "GA score") -> None:
    """Writes a PNG of ``atoms`` as balls and sticks coloured by ``ga_scores``.

    Args:
      atoms: the structure (N atoms); periodic directions (``pbc``) get the cell outline.
      ga_scores: [N] GA scores (sum to 1), or another per-atom value named by ``colorbar_label``;
        the colour scale runs from min(0, smallest) to the largest value.
      path: the PNG file to write.
      title: figure title (e.g. the formula and the prediction with its unit).
      rotation: ASE rotation string of the view (e.g. ``"-80x,-25y"``).
      dpi: resolution.
      repeat: supercell drawn along the three cell vectors (periodic directions only).
      bonds: draw bonds (see `find_bonds`); ``bond_scale`` and ``metal_metal`` as there.
      outside_bonds: also draw bonds to atoms outside the drawn cell, as half sticks pointing to
        them (default: only bonds between drawn atoms, boundary copies included).
      colorbar_label: label of the colour bar.

    Raises:
      ValueError: if ``ga_scores`` does not hold one finite value per atom, or ``repeat`` is not
        three positive integers (1 along non-periodic directions).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, repeat = _check_inputs(atoms, ga_scores, repeat)
    vmin = min(0.0, float(scores.min()))
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=max(float(scores.max()), vmin + 1e-12))
    cmap = matplotlib.colormaps[COLORMAP]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    draw_structure(ax, atoms, scores, norm=norm, cmap=cmap, rotation=rotation, repeat=repeat, bonds=bonds,
                   bond_scale=bond_scale, metal_metal=metal_metal, outside_bonds=outside_bonds)
    ax.set_title(title)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=colorbar_label)
    fig.tight_layout()
    atomic.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)


# Line width (points) and style of a motif edge by its sharing type (`motifs.SHARING_NAMES`).
SHARING_STYLES = {1: (0.8, ":"), 2: (1.6, "--"), 3: (2.6, "-")}
ANION_COLOR = "0.8"


def motif_edge_ends(atoms: ase.Atoms, graph) -> np.ndarray:
    """[E_m, 2, 3] Cartesian ends (Å) of each motif edge of ``graph`` (a `motifs.MotifGraph`):
    the receiver's centre and the sender's centre image at ``shifts @ cell``."""
    positions = atoms.positions
    start = positions[graph.centers[graph.receivers]]
    end = positions[graph.centers[graph.senders]] + np.asarray(graph.shifts, np.float64) @ atoms.cell[:]
    return np.stack([start, end], axis=1).reshape(-1, 2, 3)


def render_motifs(atoms: ase.Atoms, graph, path: str | os.PathLike, title: str, *,
                  rotation: str = ROTATION, dpi: int = 120) -> None:
    """Writes a PNG of an oxide's atoms (left) beside its motif graph (right), in one view.

    Each cation, and its motif, is coloured by the motif's ChemEnv environment (e.g. ``O:6``,
    an octahedron); O atoms are grey. On the right every motif is a node at its centre and every
    motif edge a line to the neighbouring centre's image (drawn faded where it lies outside the
    cell), styled by what the two polyhedra share: dotted a corner, dashed an edge, solid a face;
    a motif with no neighbour gets a ring (its self-loop).

    Args:
      atoms: the oxide (N atoms, periodic).
      graph: its `motifs.MotifGraph`.
      path: the PNG file to write.
      title: figure title.
      rotation: ASE rotation string of the view.
      dpi: resolution.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    environments = sorted(set(graph.environments.tolist()))
    colors = [matplotlib.colormaps["tab10"](k % 10) for k in range(len(environments))]
    value = np.full(len(atoms), len(environments), np.float64)  # anions and other atoms: grey
    value[graph.centers] = [environments.index(e) for e in graph.environments]
    cmap = matplotlib.colors.ListedColormap([*colors, ANION_COLOR])
    norm = matplotlib.colors.BoundaryNorm(np.arange(len(environments) + 2) - 0.5, cmap.N)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6))
    draw_structure(left, atoms, value, norm=norm, cmap=cmap, rotation=rotation)
    left.set_title("atoms", fontsize=9)

    view = rotate(rotation)
    edges = _cell_edges(atoms.cell[:]) @ view
    for e in edges:
        right.plot(e[:, 0], e[:, 1], color="black", lw=0.8, zorder=1)
    centres = atoms.positions[graph.centers] @ view
    ends = motif_edge_ends(atoms, graph) @ view  # [E_m, 2, 3]
    inside = np.all(np.asarray(graph.shifts) == 0, axis=1)
    for (a, b), sharing, own in zip(ends, graph.sharing, inside):
        if sharing == 0:
            right.scatter(*a[:2], s=420, facecolors="none", edgecolors="0.4", lw=1.2, zorder=2)
            continue
        width, style = SHARING_STYLES[int(min(sharing, 3))]
        right.plot([a[0], b[0]], [a[1], b[1]], color="0.3", lw=width, ls=style, zorder=2, alpha=1.0 if own else 0.5)
        if not own:
            right.scatter(*b[:2], s=40, color="0.7", zorder=3)
    node_colors = [colors[environments.index(e)] for e in graph.environments]
    right.scatter(centres[:, 0], centres[:, 1], s=160, c=node_colors, edgecolors="black", zorder=4)
    for k, c in enumerate(graph.centers):
        right.annotate(f"{atoms[int(c)].symbol}{int(c)}", centres[k, :2], ha="center", va="center",
                       fontsize=6, zorder=5)
    right.set_aspect("equal")
    right.set_axis_off()
    counts = {e: int(np.sum(graph.environments == e)) for e in environments}
    handles = [Line2D([], [], marker="o", ls="", color=colors[k], markeredgecolor="black",
                      label=f"{e} ({counts[e]} motif{'s' if counts[e] > 1 else ''})")
               for k, e in enumerate(environments)]
    handles += [Line2D([], [], color="0.3", lw=w, ls=s, label=f"shares a{'n' if name == 'edge' else ''} {name}")
                for (w, s), name in zip(SHARING_STYLES.values(), ("corner", "edge", "face"))]
    handles.append(Line2D([], [], marker="o", ls="", color=ANION_COLOR, markeredgecolor="black", label="O"))
    right.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    right.set_title(f"motif graph: {len(graph.centers)} motifs, {int(np.sum(graph.sharing > 0))} edges",
                    fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    atomic.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
