"""Pictures of structures with atoms coloured by their global-attention (GA) score.

Drawn with ASE's matplotlib renderer (the class behind ``ase.visualize.plot.plot_atoms``); the
colour scale runs from 0 to the largest GA score of the structure and is shown as a colour bar.
Atoms are labelled with symbol and index ("N3", as in the prediction table) in small structures.
"""

from __future__ import annotations

import os

import ase
import numpy as np

COLORMAP = "viridis"
MAX_LABELLED_ATOMS = 40  # larger structures are drawn without atom labels
ROTATION = "10x,20y,0z"  # a slight tilt so that planar molecules are not seen edge-on


def render_ga(atoms: ase.Atoms, ga_scores: np.ndarray, path: str | os.PathLike, title: str,
              *, rotation: str = ROTATION, dpi: int = 120) -> None:
    """Writes a PNG of ``atoms`` coloured by ``ga_scores``.

    Args:
      atoms: the structure (N atoms).
      ga_scores: [N] GA scores (sum to 1).
      path: the PNG file to write.
      title: figure title (e.g. the formula and the prediction with its unit).
      rotation: ASE rotation string of the view.
      dpi: resolution.

    Raises:
      ValueError: if ``ga_scores`` does not hold one finite value per atom.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ase.visualize.plot import Matplotlib

    scores = np.asarray(ga_scores, np.float64)
    if scores.shape != (len(atoms),) or not np.isfinite(scores).all():
        raise ValueError(f"render_ga: need {len(atoms)} finite GA scores, got shape {scores.shape}")
    norm = matplotlib.colors.Normalize(vmin=0.0, vmax=max(float(scores.max()), 1e-12))
    cmap = matplotlib.colormaps[COLORMAP]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    drawing = Matplotlib(atoms, ax, rotation=rotation, colors=[cmap(norm(s)) for s in scores], radii=0.45,
                         show_unit_cell=int(bool(np.any(atoms.pbc))))
    drawing.write()  # what ase.visualize.plot.plot_atoms does, keeping the projected positions
    if len(atoms) <= MAX_LABELLED_ATOMS:
        for i, (x, y) in enumerate(drawing.positions[:, :2]):
            ax.annotate(f"{atoms[i].symbol}{i}", (x, y), ha="center", va="center", fontsize=7,
                        color="white" if norm(scores[i]) < 0.6 else "black", zorder=10)
    ax.set_axis_off()
    ax.set_title(title)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="GA score")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
