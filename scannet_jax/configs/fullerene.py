"""fullerene-MD training config: the original's fullerene recipe (reference §3, §5) on the
GFN2-xTB data in ``data/fullerene`` (see ``data/README.md``).

Usage: ``python main.py --config=configs/fullerene.py:homo --workdir=runs/fullerene_homo``.
The argument is ``target[,variant...][,key=value...]``:

* target: ``homo``, ``lumo`` or ``total_energy`` (eV; default ``homo``);
* ``tiny``, ``scann``: as in ``configs/qm9.py``;
* ``split=trajectory`` (default) or ``split=temperature``: whole trajectories, or whole
  temperatures, go to train / validation / test (frames of one trajectory are correlated).

Everything not set here is the QM9 config's (``configs/qm9.py``). From the original fullerene
config: lr 1e-4, no GA normalisation, target standardised (here with the training split's mean
and std, as for QM9).
"""

from __future__ import annotations

import ml_collections

from scannet_jax.configs import common, qm9

TARGET_UNITS = {"homo": "eV", "lumo": "eV", "total_energy": "eV"}


def md_data_config(base: ml_collections.ConfigDict, dataset: str, target: str, units: str,
                   split: str) -> None:
    """Points ``base.data`` (the QM9 config's, which has every data set's keys) at an MD data set.

    ``data_dir`` keeps its meaning (the feature cache root).
    """
    data = base.data
    data.dataset = dataset
    data.limit = 0  # QM9 only
    data.target = target
    data.units = units
    data.group_by = split  # "trajectory", "temperature" or "structure"
    data.molecules = True  # MD frames are molecules


def md_config(arg: str | None, dataset: str, target_units: dict[str, str],
              default_target: str) -> ml_collections.ConfigDict:
    """The QM9 config turned into one for the MD data set ``dataset`` (``configs/<dataset>.py``).

    ``arg`` is ``target[,tiny][,scann][,split=trajectory|temperature]``; ``target_units`` maps
    the data set's targets to their units.
    """
    args = common.parse_arg(arg, positional=("target",), target=default_target, tiny=False,
                            scann=False, split="trajectory")
    if args.target not in target_units:
        raise ValueError(f"configs/{dataset}.py: unknown target {args.target!r}; "
                         f"known: {sorted(target_units)}")
    config = qm9.get_config(",".join(["homo"] + [v for v in ("tiny", "scann") if getattr(args, v)]))
    md_data_config(config, dataset, args.target, target_units[args.target], args.split)
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the fullerene-MD config for ``arg`` (see module docstring)."""
    config = md_config(arg, "fullerene", TARGET_UNITS, "homo")
    config.model.use_ga_norm = False
    config.optimizer.lr = 1e-4
    return config
