"""A data set's store with its split indices and the training split's target scaler."""

from __future__ import annotations

import dataclasses

import numpy as np

from scannet_jax.graphs import Domain, GraphStore, concat_ranges


@dataclasses.dataclass
class Datasets:
    """One data set with its splits and the training-split target scaler.

    Attributes:
      store: every structure of the data set.
      splits: split name -> int64 positions in ``store``.
      target: the target's name in ``store.targets``.
      mean, std: the target scaler (training split; 0 and 1 without standardisation).
    """

    store: GraphStore
    splits: dict[str, np.ndarray]
    target: str
    mean: float
    std: float

    def indices(self, name: str) -> np.ndarray:
        """int64 positions in ``store`` of split ``name``."""
        return np.asarray(self.splits[name], np.int64)

    def split(self, name: str) -> GraphStore:
        """A copy of split ``name`` as its own store (for inspection; training reads ``store``
        through the split's indices)."""
        return self.store.subset(self.indices(name))

    @property
    def train(self) -> GraphStore:
        return self.split("train")

    @property
    def validation(self) -> GraphStore:
        return self.split("validation")

    @property
    def test(self) -> GraphStore:
        return self.split("test")

    def domain(self, periodic: bool | None, chunk: int = 65536) -> Domain:
        """The training split's elements; the size of the largest structure of any split; whether
        the structures are crystals (``periodic``, or if that is None what the store recorded when
        it was featurised: ``store.metadata["periodic"]``, None for a mixed or older store).

        The atoms are visited ``chunk`` structures at a time (bounded memory on large stores).
        """
        if periodic is None:
            periodic = self.store.metadata.get("periodic")
        train, elements = self.indices("train"), set()
        for start in range(0, len(train), chunk):
            part = train[start:start + chunk]
            nodes = concat_ranges(self.store.node_ptr[part], self.store.n_node[part])
            elements.update(np.unique(self.store.atomic_numbers[nodes]).tolist())
        return Domain(frozenset(int(z) for z in elements), periodic, int(self.store.n_node.max(initial=1)))


def make_datasets(store: GraphStore, splits: dict[str, np.ndarray], target: str, standardize: bool = True) -> Datasets:
    """`Datasets` of ``store`` with the target scaler computed on the training split.

    Raises:
      ValueError: for a target the store lacks, or a training split without any finite target.
    """
    if target not in store.targets:
        raise ValueError(f"config.data.target={target!r} is not in the data set; available: {sorted(store.targets)}")
    values = store.targets[target][np.asarray(splits["train"], np.int64)]
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError(f"no finite {target!r} target in the training split")
    mean, std = (float(np.mean(values[finite])), float(np.std(values[finite]))) if standardize else (0.0, 1.0)
    return Datasets(store, {k: np.asarray(v, np.int64) for k, v in splits.items()}, target, mean,
                    std if std > 0 else 1.0)
