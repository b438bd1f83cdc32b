"""A tiny training run on the first Materials Project crystals, shared by the networks' tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

NUM_MP = 40  # crystals: 24 train, 8 validation, 8 test


def train_on_mp_subset(config: Any, workdir: Path, num: int = NUM_MP) -> tuple[Any, dict[str, Any]]:
    """Trains ``config`` (its ``data.graph_builder`` and settings) on the first ``num`` crystals of
    its MP set, split 60/20/20 by a seeded permutation; one bucket, no mid-epoch checkpoints.

    Returns:
      (the `splits.Datasets`, the run's results).
    """
    from scannet_jax import train
    from scannet_jax.datasets import featurize, mp, splits
    from scannet_jax.structures import from_atoms

    config.num_buckets = 1
    config.checkpoint_every_steps = 0
    atoms, _ = mp.read(config.data.dataset.removeprefix("mp_"))
    atoms = atoms[:num]
    settings = featurize.graph_settings(config.data.graph_builder, config.data.featurizer.to_dict())
    target = config.data.target
    store = featurize.build_store([from_atoms(a) for a in atoms], settings,
                                  targets={target: [a.info[target] for a in atoms]}, num_workers=1, progress=False)
    order = np.random.default_rng(0).permutation(num)
    train_end, val_end = int(0.6 * num), int(0.8 * num)
    split = {"train": np.sort(order[:train_end]), "validation": np.sort(order[train_end:val_end]),
             "test": np.sort(order[val_end:])}
    data = splits.make_datasets(store, split, target, config.data.standardize)
    return data, train.train_and_evaluate(config, str(workdir), data=data)
