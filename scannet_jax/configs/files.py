"""Training config for your own structure files or ASE database.

Usage, e.g. for multi-frame xyz files whose comment line is ``homo lumo total_energy``::

    python main.py --config=configs/files.py:homo,paths=runs/md/*.xyz.gz,format=property_xyz,\
columns=homo:lumo:total_energy --workdir=runs/my_md

or for SmFe12-style extended xyz (periodic, a ``formation_energy=…`` key per frame)::

    python main.py --config=configs/files.py:formation_energy,paths=smfe12.extxyz,format=extxyz,\
split=structure,periodic --workdir=runs/smfe12

The argument is ``target[,variant...][,key=value...]``:

* target: the property to learn;
* ``paths=``: glob pattern(s) of the files (several joined by ``;``);
* ``format=``: ``property_xyz`` (comment line = numbers named by ``columns``), ``extxyz``
  (``Lattice="…"`` and ``key=value`` pairs) or ``ase`` (anything ``ase.io`` reads, or an
  ``ase.db`` database; targets from ``atoms.info`` / key-value pairs);
* ``columns=``: ``property_xyz``: the names of all comment-line values, in order, joined by
  ``:``; default: the target alone;
* ``split=``: ``trajectory`` (default: whole files go to one split; use for MD, one trajectory
  per file), ``temperature`` (``_T<kelvin>K`` in the file names) or ``structure`` (random
  split, only for uncorrelated structures; needed for a single file or database);
* ``units=``: the target's unit, for logs only;
* ``periodic``: keep the files' cells and periodicity (crystals); default: every structure is
  treated as a molecule (boxed);
* ``tiny``, ``scann``, ``ring``: as in ``configs/qm9.py``.
"""

from __future__ import annotations

import ml_collections

from scannet_jax.configs import common, fullerene, qm9

FORMATS = ("property_xyz", "extxyz", "ase")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the config for ``arg`` (see module docstring)."""
    args = common.parse_arg(arg, positional=("target",), target="", paths="", format="property_xyz",
                            columns="", split="trajectory", periodic=False, units="",
                            tiny=False, scann=False, ring=False)
    if not args.target:
        raise ValueError("configs/files.py: name the target, e.g. configs/files.py:energy,paths=…")
    if not args.paths:
        raise ValueError("configs/files.py: give the files, e.g. paths=data/mine/*.xyz")
    if args.format not in FORMATS:
        raise ValueError(f"configs/files.py: unknown format {args.format!r}; known: {FORMATS}")
    columns = args.columns.split(":") if args.columns else [args.target]
    if args.target not in columns:
        raise ValueError(f"configs/files.py: target {args.target!r} is not among columns {columns}")
    variants = [v for v in ("tiny", "scann", "ring") if getattr(args, v)]
    config = qm9.get_config(",".join(["homo"] + variants))
    fullerene.md_data_config(config, "files", args.target, args.units, args.split)
    config.data.paths = args.paths.replace(";", ",")
    config.data.file_format = args.format
    config.data.columns = ":".join(columns)
    config.data.molecules = not args.periodic
    return config
