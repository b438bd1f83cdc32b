"""QM9 training config: the original recipe (reference §3), one target per run.

Usage: ``python main.py --config=configs/qm9.py:homo --workdir=runs/qm9_homo``.
The argument is ``target[,variant...][,key=value...]``:

* target: one of :data:`TARGET_UNITS` (default ``homo``);
* ``tiny``: a few hundred molecules, a small model, a handful of epochs (about a minute on
  one CPU core), writing everything a full run writes;
* ``scann``: SCANN (no geometry update, ρ weights) instead of SCANN+;
* ``ring``: add the ring/aromatic atom flags;
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
        arg, positional=("target",), target="homo", tiny=False, scann=False, ring=False, limit=0
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

    config.model = models.default_model_config("scann" if args.scann else "scannplus")
    config.model.use_ring = args.ring
    config.loss = "rmse"  # the original's: RMSE of the standardised target (losses.LOSSES)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.lr = 5e-4
    config.optimizer.min_lr = 1e-4
    config.optimizer.schedule = "sgdr"  # "sgdr" (per epoch), "cosine" (per step) or "constant"
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

    config.batch_size = 128  # global, over all devices
    config.eval_batch_size = 128
    config.num_buckets = 4  # padded shapes per split (one compilation each)
    config.prefetch = 4  # batches prepared ahead by a background thread
    config.num_epochs = 1000
    config.patience = 200  # early stopping on validation MAE, epochs
    config.max_wall_time_s = 0.0  # whole run incl. final evaluation (estimated); 0 = no limit
    config.final_train_eval_limit = 0  # final training-split MAE on this many molecules; 0 = all
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
    return config


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
