"""QM9 training config: the original recipe (reference §3), one target per run.

Usage: ``python main.py --config=configs/qm9.py:homo --workdir=runs/qm9_homo``.
The argument is ``target[,variant...][,key=value...]``:

* target: one of :data:`TARGET_UNITS` (default ``homo``);
* ``tiny``: a few hundred molecules, a small model, a handful of epochs (about a minute on
  one CPU core), writing everything a full run writes;
* ``scann``: SCANN (no geometry update, ρ weights) instead of SCANN+;
* ``ring``: add the ring/aromatic atom flags;
* ``alignn``: ALIGNN with its reference training recipe (`alignn_recipe`, zoo-reference.md §1)
  on its own k-NN graphs of the molecules (no periodic images, see knn.py), the search started
  at 5 Å as the reference's QM9 recipe does (for a molecule the bonds do not depend on it); the
  target standardised as above (the reference trains on the standardised ``qm9_std_jctc``);
* ``megnet``: MEGNet on the 5 Å radius graph of the molecules with the released MEGNet/AMDNet
  recipe (`megnet_recipe`, zoo-reference.md §2.7), the target standardised as above;
* ``limit=N``: use only the first N molecules.

Every field can also be overridden on the command line, e.g. ``--config.batch_size=64``.

Deliberate departure from the original: the target is standardised with the mean and std of
the TRAINING split; the original used the whole data set, which leaks the test targets.
"""

from __future__ import annotations

import ml_collections

from scannet_jax.configs import common

# Units of the targets as the QM9 loader stores them (energies converted from Hartree to eV).
TARGET_UNITS = {
    "homo": "eV",
    "lumo": "eV",
    "gap": "eV",
    "zpve": "eV",
    "u0": "eV",
    "alpha": "bohr^3",
    "cv": "cal/(mol K)",
    "mu": "D",
    "r2": "bohr^2",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the QM9 config for ``arg`` (see module docstring)."""
    args = common.parse_arg(
        arg, positional=("target",), target="homo", tiny=False, scann=False, ring=False, limit=0,
        alignn=False, megnet=False,
    )
    if args.target not in TARGET_UNITS:
        raise ValueError(
            f"configs/qm9.py: unknown QM9 target {args.target!r}; known: {sorted(TARGET_UNITS)}"
        )
    from scannet_jax import models  # deferred: keeps `import configs.qm9` free of JAX

    config = ml_collections.ConfigDict()
    config.seed = 0  # parameter init and dropout
    config.split_seed = 0  # the original's np.random.seed(0) permutation

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "qm9"
    config.data.target = args.target
    config.data.units = TARGET_UNITS[args.target]
    config.data.data_dir = ""  # "" = the package's default cache directory
    config.data.limit = args.limit  # 0 = all 130,831 molecules
    config.data.ring = args.ring
    config.data.num_workers = 0  # featurisation processes; 0 = all cores
    config.data.graph_builder = "voronoi"  # featurize.GRAPH_BUILDERS; config.data.featurizer are its settings
    config.data.featurizer = ml_collections.ConfigDict()
    config.data.featurizer.mode = "exact"  # "original" reproduces the boxed-molecule neighbours
    config.data.featurizer.cutoff = 4.0  # d_t, Å
    config.data.featurizer.min_solid_angle = 0.4  # w_t, sr
    config.data.featurizer.min_relative_weight = 0.2
    config.data.standardize = True  # mean/std of the TRAINING split (original: whole set)
    # Options of the other data sets (datasets.Source); every data set's config has these keys.
    config.data.source_dir = ""  # fullerene, pt_graphene: folder of the chunk files; "" = data/<name>
    config.data.group_by = "trajectory"  # MD / file sets: "trajectory", "temperature" or "structure"
    config.data.molecules = True  # MD / file sets: treat every structure as a molecule
    config.data.paths = ""  # files: comma-separated glob patterns
    config.data.file_format = ""  # files: property_xyz, extxyz or ase
    config.data.columns = ""  # files: target names joined by ":"
    config.data.oxides_only = False  # mp_*: only the oxides, each split restricted to them

    config.model = models.default_model_config("scann" if args.scann else "scannplus")
    config.model.use_ring = args.ring
    config.loss = "rmse"  # the original's: RMSE of the standardised target (losses.LOSSES)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adam"  # "adam" (Keras-2, the original's) or "adamw" (PyTorch's, ALIGNN's)
    config.optimizer.lr = 5e-4
    config.optimizer.min_lr = 1e-4
    # "sgdr" (per epoch), "cosine" (per step), "constant" or "onecycle" (PyTorch's, per step)
    config.optimizer.schedule = "sgdr"
    config.optimizer.sgdr_t0 = 50  # epochs in the first cycle
    config.optimizer.sgdr_tmult = 2
    config.optimizer.sgdr_compression = 1.2  # each restart's peak = previous / 1.2
    config.optimizer.sgdr_trigger = 300.0  # val MAE (standardised) that starts the restarts
    config.optimizer.cosine_epochs = 1000  # the cosine reaches min_lr at half of this
    config.optimizer.legacy_decay = 1e-5  # Keras-2 Adam `decay`: lr / (1 + 1e-5·step); 0 = off
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-7  # the Keras default
    config.optimizer.l2 = 1e-4  # on the kernels the original penalises (losses.py)
    config.optimizer.weight_decay = 0.0  # adamw: decoupled decay λ (θ -= rate·λ·θ)
    config.optimizer.no_decay = ("bias", "bn")  # adamw: parameter-path substrings exempt from decay
    # a non-finite step's update is always skipped; then "skip": the rate is halved at the next
    # log; "reload_best" (MEGNet's): at the end of an epoch with a non-finite step or a loss over
    # 100x the previous epoch's, the rate is halved and the best-validation parameters reloaded
    # (optimiser moments kept), and training stops once the rate is below 1e-7
    config.optimizer.on_divergence = "skip"
    # onecycle (torch OneCycleLR; optim.OneCycle, over optimizer.onecycle_epochs, set below):
    # warm-up fraction, peak/initial and initial/final rate ratios, the β1 cycle (max -> base at
    # the peak rate -> max; False: β1 stays b1)
    config.optimizer.onecycle_pct_start = 0.3
    config.optimizer.onecycle_div_factor = 25.0
    config.optimizer.onecycle_final_div_factor = 1e4
    config.optimizer.onecycle_cycle_momentum = True
    config.optimizer.onecycle_base_momentum = 0.85
    config.optimizer.onecycle_max_momentum = 0.95

    config.batch_size = 128  # global, over all devices
    config.eval_batch_size = 128
    config.num_buckets = 4  # padded shapes per split (one compilation each)
    config.prefetch = 4  # batches prepared ahead by a background thread
    # glibc keeps XLA's freed host buffers for the next step (host_memory.py), set by the command
    # line before JAX starts: faster where a step's arrays exceed 32 MiB (ALIGNN's triplets), more
    # peak RSS and no speed-up where they do not (SCANN+ on QM9, docs/performance.md)
    config.keep_freed_host_memory = False
    config.num_epochs = 1000
    # the epochs the one-cycle spans: follows num_epochs (also when it is overridden) unless set
    config.optimizer.onecycle_epochs = config.get_ref("num_epochs") * 1
    config.patience = 200  # early stopping on validation MAE, epochs
    config.max_wall_time_s = 0.0  # whole run incl. final evaluation (estimated); 0 = no limit
    config.final_train_eval_limit = 0  # final training-split MAE on this many molecules; 0 = all
    # predictions below this are raised to it in the test figures and by predict (the AMDNet
    # recipe's max(0, p) for band gaps); None: none. Validation (best epoch) stays unclipped.
    config.prediction_floor = ml_collections.config_dict.placeholder(float)
    config.checkpoint_every_steps = 0  # extra mid-epoch checkpoints every N steps; 0 = none
    config.checkpoint_every_minutes = 10.0  # and every N minutes (a killed run loses at most that); 0 = off
    config.checkpoints_to_keep = 2
    config.log_every_steps = 50
    config.init_from = ""  # fine-tune: a workdir, checkpoint dir, or original .npz/.h5 weights

    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator_address = ""  # "host:port"; "" = single process (or env)
    config.distributed.num_processes = 0
    config.distributed.process_id = -1

    if args.tiny:
        config.data.limit = args.limit or 400
        config.model.update(_tiny_model_sizes(config.model))
        config.batch_size = 32
        config.eval_batch_size = 64
        config.num_buckets = 2
        config.num_epochs = 6
        config.patience = 20
        config.optimizer.lr = 1e-3
        config.optimizer.sgdr_t0 = 3
        config.checkpoint_every_steps = 4
        config.log_every_steps = 5
    if args.alignn:
        alignn_recipe(config, args.tiny)
        config.data.featurizer.cutoff = 5.0  # Å, the reference's qm9 recipe (same bonds: see knn.py)
    if args.megnet:
        megnet_recipe(config, args.tiny, "megnet")
    return config


def alignn_recipe(config: ml_collections.ConfigDict, tiny: bool) -> None:
    """ALIGNN's graphs, network, loss and training recipe, in place (zoo-reference.md §1.10).

    The paper-era recipe (``alignn/train_props.py``, run by ``alignn/train.py``):

    * graphs: k = 12 nearest bonds from an 8 Å start radius and their bond-angle triplets
      (``graph_builder = "knn_line_graph"``; molecules without images, see knn.py);
    * the §1.9 network, MSE loss, no loss regulariser, batches of 64, 300 epochs, no early
      stopping (``patience`` follows ``num_epochs``);
    * ``torch.optim.AdamW`` (β (0.9, 0.999), ε 1e-8) at lr 1e-3 with weight decay 1e-5 on the
      parameter groups of ``alignn.utils.group_decay`` (`optim.decay_mask`: no decay for biases
      and the EGGC BatchNorms; the MLPLayer BatchNorm scales are decayed, as in the reference);
    * ``OneCycleLR(max_lr=1e-3, epochs, steps_per_epoch, pct_start=0.3)`` stepped once per batch,
      PyTorch's defaults otherwise: cosine annealing, div_factor 25, final_div_factor 1e4, β1
      cycled 0.95 -> 0.85 -> 0.95 (`optim.OneCycle`).

    ``tiny``: one ALIGNN and one GCN layer of 32 features, batches of 16, the tiny config's epochs
    (the one-cycle spans them).

    Args:
      config: a config of this module (or one derived from it), changed in place.
      tiny: the smoke-run sizes.
    """
    from scannet_jax import models  # deferred: keeps `import configs.qm9` free of JAX

    config.data.graph_builder = "knn_line_graph"
    config.data.featurizer = ml_collections.ConfigDict({"cutoff": 8.0, "max_neighbors": 12})
    config.data.ring = False
    config.model = models.default_model_config("alignn")
    config.loss = "mse"  # the reference's criterion
    config.keep_freed_host_memory = True  # [T, 256] triplet arrays of 88 MiB per batch of 32 crystals
    opt = config.optimizer
    opt.name = "adamw"
    opt.lr = 1e-3  # the one-cycle's peak (max_lr)
    opt.min_lr = 1e-3  # unused by the one-cycle (its floor is lr / 25 / 1e4)
    opt.schedule = "onecycle"
    opt.legacy_decay = 0.0  # Keras-2 only
    opt.b1, opt.b2, opt.eps = 0.9, 0.999, 1e-8  # PyTorch's (β1 then follows the one-cycle)
    opt.weight_decay = 1e-5
    opt.no_decay = ("bias", "bn")
    opt.l2 = 0.0  # ALIGNN has no loss regulariser
    opt.onecycle_pct_start = 0.3
    opt.onecycle_div_factor, opt.onecycle_final_div_factor = 25.0, 1e4
    opt.onecycle_cycle_momentum = True
    opt.onecycle_base_momentum, opt.onecycle_max_momentum = 0.85, 0.95
    if tiny:
        config.model.update({"alignn_layers": 1, "gcn_layers": 1, "embedding_features": 16,
                             "hidden_features": 32})
        config.batch_size = 16
        config.eval_batch_size = 32
    else:
        config.batch_size = 64
        config.eval_batch_size = 64
        config.num_epochs = 300
        config.patience = config.get_ref("num_epochs") * 1  # the reference does not stop early


def megnet_recipe(config: ml_collections.ConfigDict, tiny: bool, name: str) -> None:
    """MEGNet's or AMDNet's (``name``) graphs, network, loss and released training recipe
    (zoo-reference.md §2.7), in place: the 5 Å radius graph (``graph_builder = "radius"``; for
    AMDNet with the oxides' motif graph, ``"motif_dual"``), MSE, Adam at a constant 5e-5, batches
    of 32, patience 100, MEGNet's handling of a diverged epoch (``on_divergence =
    "reload_best"``) and, for band gaps, test figures and predictions clipped at 0.

    Args:
      config: a config of this module (or one derived from it), changed in place.
      tiny: the smoke-run sizes.
      name: ``"megnet"`` or ``"amdnet"``.
    """
    from scannet_jax import models  # deferred: keeps `import configs.qm9` free of JAX

    config.data.graph_builder = "motif_dual" if name == "amdnet" else "radius"
    config.data.featurizer = ml_collections.ConfigDict({"cutoff": 5.0})
    config.data.ring = False
    config.model = models.default_model_config(name)
    config.loss = "mse"
    config.optimizer.update(name="adam", lr=5e-5, min_lr=5e-5, schedule="constant", legacy_decay=0.0, eps=1e-7,
                            l2=0.0, weight_decay=0.0, on_divergence="reload_best")
    if config.data.target == "band_gap":
        config.prediction_floor = 0.0  # evaluate_AMDnet.py: max(0, p)
    config.batch_size, config.eval_batch_size = 32, 64
    config.num_epochs, config.patience = 1000, 100
    if tiny:
        config.model.update({"num_blocks": 1, "n1": 16, "n2": 8, "n3": 4, "num_steps": 2,
                             **({"num_output_embedding": 4, "num_last_layer": 8} if name == "amdnet" else {})})
        config.optimizer.update(lr=1e-2, min_lr=1e-2)
        config.batch_size, config.eval_batch_size = 4, 8


def _tiny_model_sizes(model: ml_collections.ConfigDict) -> dict:
    """Small sizes for smoke runs; only keys the model config has are touched."""
    small = {
        "embedding_dim": 16,
        "local_dim": 32,
        "num_head": 4,
        "n_attention": 2,
        "global_dim": 32,
        "dense_out": 32,
    }
    return {k: v for k, v in small.items() if k in model}
