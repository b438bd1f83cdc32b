"""Draws one oxide of the Materials Project band-gap set beside its motif graph (AMDNet's second graph).

    python experiments/draw_motif_graph.py --material=mp-4784

The oxide (default mp-4784, Ca2Pt2O6 of the oxide test split: Ca square antiprisms (SBT:8) and
Pt octahedra sharing corners, edges and faces) is
read from ``data/mp`` (`mp.read`), its motifs found with ChemEnv and CrystalNN as AMDNet's
generator does (`motifs.motif_graph`) and drawn with `render.render_motifs` to
``docs/images/motifs_<formula>_mp.png``; the environments and edge counts are printed.
"""

from __future__ import annotations

import collections
from pathlib import Path

from absl import app, flags

from scannet_jax import motifs, render
from scannet_jax.datasets import mp

REPO = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("material", "mp-4784", "material_id of an oxide of the band-gap set")
flags.DEFINE_string("rotation", "-70x,10y,0z", "ASE rotation string of the view")


def main(argv: list[str]) -> None:
    del argv
    atoms_list, _ = mp.read("gap")
    found = [a for a in atoms_list if a.info["material_id"] == FLAGS.material]
    if not found:
        raise app.UsageError(f"{FLAGS.material}: not in the band-gap set (data/mp)")
    atoms = found[0]
    graph = motifs.motif_graph(atoms, name=FLAGS.material)
    formula = atoms.get_chemical_formula(mode="metal")
    sharing = collections.Counter(motifs.SHARING_NAMES[s] for s in graph.sharing)
    print(f"{FLAGS.material} {formula}: environments {collections.Counter(graph.environments.tolist())}, "
          f"directed motif edges {dict(sharing)}")
    path = REPO / f"docs/images/motifs_{formula}_mp.png"
    render.render_motifs(atoms, graph, path, f"{formula} ({FLAGS.material}), PBE band gap "
                         f"{atoms.info['band_gap']:.2f} eV", rotation=FLAGS.rotation)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
