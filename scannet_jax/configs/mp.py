"""Materials Project crystals (``data/mp``, DFT labels, see data/README.md): the original's MP2018
recipe (reference §1, §2, §5) on the sets that install with the package.

Usage: ``python main.py --config=configs/mp.py:e_form --workdir=runs/mp_e_form`` (formation
energy per atom, 3,938 crystals of Faber et al. 2015) or ``configs/mp.py:gap`` (PBE band gap,
1,056 crystals of Petousis et al. 2016). The argument is
``set[,tiny][,scann|,alignn|,lstm[,augment]|,megnet|,amdnet][,oxides]``:

* set: ``e_form`` or ``gap``;
* ``tiny``: a few epochs with a small model (smoke runs, tests);
* ``scann``: SCANN instead of SCANN+;
* ``alignn``: ALIGNN (zoo-reference.md §1) on its own graphs with its reference training
  recipe (``configs/qm9.py``'s `alignn_recipe`): k = 12 nearest bonds from an 8 Å start radius
  and their bond-angle triplets (``graph_builder = "knn_line_graph"``), the §1.9 model, MSE loss,
  AdamW (lr 1e-3, weight decay 1e-5 with the reference's parameter groups) under a one-cycle
  schedule stepped per batch, batches of 64, 300 epochs. With ``tiny``: one ALIGNN and one GCN
  layer of 32 features, the tiny config's epochs.
* ``lstm``: the LSTM neighbour-list model (zoo-reference.md §3, ``scannet_jax/lstm.py``) on the
  19-nearest-neighbour lists (``graph_builder = "neighbour_list"``), MSE loss, Adam at a constant
  1e-3, batches of 32 (the source states neither loss nor optimiser: both are choices);
  ``augment`` adds the source's axis-swap augmentation (the xy, yz and xz swaps of the lattice
  stored as atom orders; one drawn per structure and step).
* ``megnet``, ``amdnet``: MEGNet on the 5 Å radius graph, or AMDNet on it and the oxides' motif
  graph (``graph_builder = "motif_dual"``; zoo-reference.md §2), with the released recipe (§2.7):
  Adam at a constant 5e-5, MSE, batches of 32, patience 100, MEGNet's handling of a diverged
  epoch (``optimizer.on_divergence = "reload_best"``) and, for band gaps, test figures and
  predictions clipped at 0 (``prediction_floor``). ``amdnet`` implies ``oxides``;
* ``oxides``: only the oxides of the set, each stored split restricted to them (1,232 of the
  3,938 e_form crystals, 218 of the 1,056 gap crystals): the split every network is compared on
  with AMDNet.

From the original's MP2018 recipe: ``d_t`` = 6 Å, ``gaussian_d`` = 6 Å, a 95-row element table,
GA normalisation on, no target standardisation; everything else as for QM9 (``configs/qm9.py``).
The split is the one stored with the data (``data/mp/<set>_split.json``, 80/10/10), the same
for every model.
"""

from __future__ import annotations

import ml_collections

from scannet_jax.configs import common, qm9

# set -> (data set name, target in the files, units)
SETS = {"e_form": ("mp_e_form", "formation_energy_per_atom", "eV/atom"),
        "gap": ("mp_gap", "band_gap", "eV")}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the Materials Project config for ``arg`` (see module docstring)."""
    args = common.parse_arg(arg, positional=("set",), set="e_form", tiny=False, scann=False, alignn=False,
                            lstm=False, augment=False, megnet=False, amdnet=False, oxides=False)
    if args.set not in SETS:
        raise ValueError(f"configs/mp.py: unknown set {args.set!r}; known: {sorted(SETS)}")
    config = qm9.get_config(",".join(["homo"] + [v for v in ("tiny", "scann") if getattr(args, v)]))
    dataset, target, units = SETS[args.set]
    config.data.dataset = dataset
    config.data.limit = 0  # QM9 only
    config.data.target = target
    config.data.units = units
    config.data.molecules = False  # crystals: exact Voronoi cells of the infinite crystal
    config.data.standardize = False  # as the original's MP2018 recipe
    config.data.featurizer.cutoff = 6.0  # d_t, Å
    config.model.gaussian_d = 6.0  # Å
    config.model.n_atoms = 95
    if args.alignn:
        qm9.alignn_recipe(config, args.tiny)
    if args.lstm:
        lstm_recipe(config, args.tiny, args.augment)
    elif args.augment:
        raise ValueError("configs/mp.py: 'augment' is an option of the 'lstm' model")
    if args.megnet or args.amdnet:
        qm9.megnet_recipe(config, args.tiny, "amdnet" if args.amdnet else "megnet")
    config.data.oxides_only = args.oxides or args.amdnet
    return config


def lstm_recipe(config: ml_collections.ConfigDict, tiny: bool, augment: bool) -> None:
    """Turns ``config`` into the LSTM neighbour-list model's (see the module docstring)."""
    from scannet_jax import models  # deferred: keeps `import scannet_jax.configs.mp` free of JAX

    config.data.graph_builder = "neighbour_list"
    config.data.featurizer = ml_collections.ConfigDict(
        {"num_neighbours": 19, "tolerance": 1e-3, "settings": "swaps" if augment else "original"})
    config.data.ring = False
    config.model = models.default_model_config("lstm")
    config.model.augment = augment
    config.loss = "mse"
    config.optimizer.update(lr=1e-3, min_lr=1e-3, schedule="constant", legacy_decay=0.0, eps=1e-8, l2=0.0)
    config.batch_size, config.eval_batch_size = 32, 64
    if tiny:
        config.model.update({"embedding_dim": 8, "atom_features": 12, "crystal_features": 10, "head_features": [8]})
        config.batch_size = config.eval_batch_size = 8
