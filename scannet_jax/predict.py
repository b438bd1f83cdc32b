"""Predictions and global-attention (GA) scores of a trained model on ``ase.Atoms``.

``Predictor.from_workdir(path)`` reads a training workdir once (config, target scaler, best
validation params) and ``predictor(atoms)`` runs structures through exactly the training path:
Voronoi neighbours with the run's featuriser settings (``datasets.featurize``) → ``GraphStore``
→ padded batches (``batching.pad_batch``) → the model, jitted once per padded shape.

Padded shapes ("buckets") come from a fixed ladder instead of the training split's size
distribution (which a workdir does not store): node budgets 64·√2^k rounded to 64, edge budgets
``EDGES_PER_NODE`` times that, and one padding graph plus either one structure (single calls) or
``batch_size`` structures. The ladder stops at the size that holds ``batch_size`` of the largest
structures of the training data set (``Domain.max_atoms``); a batch beyond it gets its own
padded size rounded to 64 (one more compilation, never truncation). Within a call, structures
are sorted by size before batching so that each batch lands in a tight bucket; results come back
in input order.

The elements and the periodicity a model may be applied to, and the size of the largest
training structure, are read from the workdir's ``domain.json`` (``graphs.Domain``, written by
``train.train_and_evaluate``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ase
import jax
import jax.numpy as jnp
import numpy as np
from ase.data import chemical_symbols

from scannet_jax import batching, checkpoints, models, steps, structures
from scannet_jax.batching import Bucket
from scannet_jax.datasets import featurize
from scannet_jax.graphs import BUILTIN_SETS, Domain, GraphStore
from scannet_jax.neighbors import FeaturizerSettings

EDGES_PER_NODE = 6  # QM9 has at most 5.7 edges per atom (4.4 on average)
MIN_NODES = 64
PARALLEL_THRESHOLD = 256  # structures; smaller lists are featurised in this process


class StructureError(ValueError):
    """One structure cannot be predicted; the message says why (atom, element, geometry)."""


@dataclasses.dataclass
class Prediction:
    """The model's output for one structure of N atoms.

    Attributes:
      value: the prediction in target units (model output · std + mean).
      ga_scores: float64 [N], global-attention score of each atom (sums to 1), or None for a
        network that scores no atoms (``models.ModelSpec.node_scores``).
      warnings: why the value may not be trusted (no neighbour within the cutoff, larger than
        any training structure); empty if none.
    """

    value: float
    ga_scores: np.ndarray | None
    warnings: tuple[str, ...] = ()


def _find_workdir(path: Path) -> Path:
    """The workdir holding ``config.json``: ``path`` itself or one of its three parents."""
    for candidate in (path, *list(path.parents)[:3]):
        if (candidate / checkpoints.CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {checkpoints.CONFIG_FILE} here or in the 3 directories above; "
                            "expected a training workdir or a checkpoint directory inside one")


def _ladder(n_graph: int, cap_nodes: int) -> list[Bucket]:
    """Buckets of ``n_graph`` graphs with node budgets 64·√2^k (rounded to 64) up to ``cap_nodes``."""
    out: list[Bucket] = []
    k = 0
    while not out or out[-1].n_node < cap_nodes:
        n_node = int(math.ceil(MIN_NODES * math.sqrt(2) ** k / 64) * 64)
        if not out or n_node > out[-1].n_node:
            out.append(Bucket(n_node, EDGES_PER_NODE * n_node, n_graph))
        k += 1
    return out


def _own_bucket(totals: dict[str, int], padding: dict[str, int], n_graph: int) -> Bucket:
    """A bucket of ``n_graph`` graphs holding ``totals`` real rows per set plus ``padding``: nodes
    and edges rounded up to 64, extra sets (e.g. triplets) to the next 64·√2^k, so that batches of
    a graph builder with extra sets share a few compiled shapes."""
    up = lambda x: max(int(math.ceil(x / 64) * 64), 64)  # noqa: E731

    def ladder_up(x: int) -> int:
        return next(size for size in (up(MIN_NODES * math.sqrt(2) ** k) for k in range(200)) if size >= x)

    extras = tuple((name, ladder_up(rows + padding.get(name, 0))) for name, rows in sorted(totals.items())
                   if name not in BUILTIN_SETS)
    n_node = (up if not extras else ladder_up)(totals["nodes"] + padding["nodes"])
    n_edge = (up if not extras else ladder_up)(totals["edges"] + padding["edges"])
    return Bucket(n_node, n_edge, n_graph, extras)


class Predictor:
    """A trained model applied to ``ase.Atoms`` (see the module docstring).

    Args:
      model_config: the model section of the training config (``models.build_model``).
      params: the Flax params pytree.
      model_state: the network's other variables (e.g. ``batch_stats``), ``{}`` if none.
      settings: featuriser settings of the training run.
      ring: compute the ring/aromatic atom flags (``config.data.ring``).
      target: name of the predicted quantity (``atoms.info`` key with ``write=True``).
      units: its units, e.g. "eV".
      mean, std: target scaler; predictions are model output · std + mean.
      prediction_floor: predictions below it are raised to it (``config.prediction_floor``,
        e.g. 0 for the AMDNet recipe's band gaps); None: none.
      domain: where the model may be applied.
      batch_size: structures per padded batch.
      num_workers: featurisation processes for lists of at least ``PARALLEL_THRESHOLD``
        structures (default: all cores); the pool persists until ``close()``.
      average_settings: test-time averaging of a network that depends on the crystal's setting
        (``lstm``): the mean prediction over the distinct settings made by swapping two lattice
        axes (`neighbor_lists.equivalent_settings`), the source's equivalent settings.

    Raises:
      ValueError: ``average_settings`` for a network without settings.
    """

    def __init__(self, model_config: Any, params: Any, *, model_state: Any = None, settings: FeaturizerSettings,
                 ring: bool = False, target: str = "y", units: str = "", mean: float = 0.0, std: float = 1.0,
                 prediction_floor: float | None = None, domain: Domain = Domain(), batch_size: int = 128,
                 num_workers: int | None = None, average_settings: bool = False):
        self.model_config = models._as_dict(model_config)
        self.model_config.setdefault("name", models.model_name(self.model_config))
        self.spec = models.get_spec(self.model_config)
        if average_settings:
            if "average_settings" not in self.model_config:
                raise ValueError(f"average_settings: the {self.model_config['name']} network has no crystal "
                                 "settings to average over (the lstm network has)")
            self.model_config["average_settings"] = True
            if getattr(settings, "settings", None) == "original":  # stored orders of the swapped settings too
                settings = dataclasses.replace(settings, settings="swaps")
        self.num_elements = self.spec.num_elements(self.model_config)
        self.settings = settings
        self.ring = ring
        self.target, self.units = target, units
        self.mean, self.std = float(mean), float(std)
        self.prediction_floor = prediction_floor
        self.domain = domain
        self.batch_size = batch_size
        self.num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        self.featurizer = featurize.Featurizer(settings, ring=ring, num_workers=self.num_workers,
                                               min_parallel=PARALLEL_THRESHOLD)
        weakref.finalize(self, self.featurizer.close)
        self.buckets = {
            1: _ladder(2, domain.max_atoms + 1),
            batch_size: _ladder(batch_size + 1, batch_size * domain.max_atoms + 1),
        }
        model = models.build_model(self.model_config)
        variables = {"params": params, **(model_state or {})}
        self._variables = jax.device_put(jax.tree.map(jnp.asarray, variables))
        scale = np.float32(self.mean), np.float32(self.std)
        self._trace = steps.TraceCounter(
            lambda variables, graphs: steps.model_outputs(model.apply, variables, graphs, *scale))
        self._apply = jax.jit(self._trace, compiler_options=steps.compiler_options(
            models.get_spec(self.model_config).forward_with_ynn))

    # ---------------------------------------------------------------------------------------
    # Construction.

    @classmethod
    def from_workdir(cls, path: str | os.PathLike, **kwargs: Any) -> Predictor:
        """Loads the best-validation params of a training workdir (or of a checkpoint directory
        inside one: ``best/``, ``checkpoints/``, or one step of them), its config and scaler.

        Args:
          path: the workdir or checkpoint directory.
          **kwargs: ``batch_size``, ``num_workers`` (see the class).

        Raises:
          FileNotFoundError: if no ``config.json`` belongs to ``path``, or the workdir lacks its
            ``domain.json``.
          checkpoints.CheckpointError: if it holds no readable checkpoint.
        """
        path = Path(path).absolute()
        workdir = _find_workdir(path)
        config = json.loads((workdir / checkpoints.CONFIG_FILE).read_text())
        domain_file = workdir / checkpoints.DOMAIN_FILE
        if not domain_file.is_file():
            raise FileNotFoundError(f"{domain_file}: missing; it records the elements and periodicity the "
                                    "model was trained on (written at the start of training)")
        domain = Domain.from_json(json.loads(domain_file.read_text()))
        pretrained = checkpoints.load_pretrained(path)
        scaler = pretrained.scaler
        scaler_file = workdir / checkpoints.SCALER_FILE
        saved = json.loads(scaler_file.read_text()) if scaler_file.is_file() else {}
        scaler = scaler or {"mean": saved.get("mean", 0.0), "std": saved.get("std", 1.0)}
        data = config["data"]
        return cls(config["model"], pretrained.params, model_state=pretrained.model_state,
                   settings=featurize.graph_settings(data.get("graph_builder", "voronoi"), data["featurizer"]),
                   ring=bool(data.get("ring", False)), target=data["target"],
                   units=saved.get("units", data.get("units", "")), mean=scaler["mean"], std=scaler["std"],
                   prediction_floor=config.get("prediction_floor"), domain=domain, **kwargs)

    @classmethod
    def pretrained(cls, name: str, **kwargs: Any) -> Predictor:
        """A pre-built model shipped with the package (`scannet_jax.pretrained.names()`).

        Raises:
          ValueError: for an unknown name, listing the available ones.
        """
        from scannet_jax import pretrained

        return cls.from_workdir(pretrained.path(name), **kwargs)

    @classmethod
    def from_original(cls, weights: str | os.PathLike, config: Any = None, *, mean: float = 0.0,
                      std: float = 1.0, target: str = "y", units: str = "",
                      settings: FeaturizerSettings = FeaturizerSettings(mode="original"),
                      domain: Domain = Domain(), **kwargs: Any) -> Predictor:
        """Weights of the original TensorFlow model (``convert.load_original_weights``), with the
        original-mode featuriser. The original stored no scaler: pass its ``mean``/``std``."""
        from scannet_jax import convert

        model_config, params = convert.load_original_weights(weights, config)
        return cls(model_config, params, settings=settings, ring=bool(model_config.use_ring), target=target,
                   units=units, mean=mean, std=std, domain=domain, **kwargs)

    # ---------------------------------------------------------------------------------------
    # Prediction.

    @property
    def num_compiles(self) -> int:
        """Compilations of the jitted model so far (one per padded shape used)."""
        return self._trace.count

    def check(self, atoms: ase.Atoms, allow_unseen_elements: bool = False) -> None:
        """Raises StructureError if ``atoms`` is outside what the model can be applied to.

        Checked: at least one atom, finite positions, periodicity matching the training data,
        elements within the embedding table and (unless ``allow_unseen_elements``) seen in
        training. Geometry problems found by the featuriser (atoms closer than 0.1 Å, also
        across a cell boundary; a singular cell) are reported by ``predict_each``.

        Defined results, not errors: a left-handed cell is predicted as the same crystal with a
        right-handed cell (`neighbors.voronoi_neighbors`); a one-atom cell gets α = 1 and a finite
        value (the GA norm is floored, ``layers.GlobalAttention``; the original gives NaN).
        Periodicity is checked only when the training data set fixes it (``Domain.periodic``).
        """
        if len(atoms) == 0:
            raise StructureError("empty structure (no atoms)")
        bad = np.flatnonzero(~np.isfinite(atoms.positions).all(axis=1))
        if bad.size:
            raise StructureError(f"atom {bad[0]} ({atoms[bad[0]].symbol}) has non-finite coordinates "
                                 f"{atoms.positions[bad[0]].tolist()}")
        periodic = bool(np.any(atoms.pbc))
        if self.domain.periodic is not None and periodic != self.domain.periodic:
            kind = "a crystal model" if self.domain.periodic else "a molecule model"
            given = f"a periodic structure (pbc={atoms.pbc.tolist()})" if periodic else "a non-periodic structure"
            raise StructureError(f"{given} given to {kind}")
        z = atoms.numbers
        bad = np.flatnonzero((z < 1) | (z >= len(chemical_symbols)))
        if bad.size:
            raise StructureError(f"atom {bad[0]} has atomic number Z={z[bad[0]]}: no such element")
        bad = np.flatnonzero(z >= self.num_elements)
        if bad.size:
            raise StructureError(f"atom {bad[0]} is {chemical_symbols[z[bad[0]]]} (Z={z[bad[0]]}); the model embeds "
                                 f"only Z < {self.num_elements}")
        if self.domain.elements is not None and not allow_unseen_elements:
            unseen = sorted(set(z.tolist()) - self.domain.elements)
            if unseen:
                first = int(np.flatnonzero(z == unseen[0])[0])
                seen = " ".join(chemical_symbols[e] for e in sorted(self.domain.elements))
                raise StructureError(
                    f"element(s) {' '.join(chemical_symbols[e] for e in unseen)} (first: atom {first}) never "
                    f"seen in training (elements: {seen}); allow with --allow-unseen-elements")

    def __call__(self, atoms: ase.Atoms | Sequence[ase.Atoms], *, write: bool = False,
                 allow_unseen_elements: bool = False) -> Prediction | list[Prediction]:
        """Predicts one structure (returns a Prediction) or a list of them (a list, batched).

        Args:
          atoms: one ``ase.Atoms`` or a sequence of them.
          write: also set ``atoms.info[self.target]`` and ``atoms.arrays["ga_score"]``.
          allow_unseen_elements: skip the training-elements check.

        Raises:
          StructureError: naming the position of the first structure that cannot be predicted.
        """
        single = isinstance(atoms, ase.Atoms)
        results = self.predict_each([atoms] if single else list(atoms), write=write,
                                    allow_unseen_elements=allow_unseen_elements)
        for position, result in enumerate(results):
            if isinstance(result, StructureError):
                raise StructureError(str(result) if single else f"structure {position}: {result}")
        return results[0] if single else results

    def predict_each(self, atoms_list: Sequence[ase.Atoms], *, write: bool = False,
                     allow_unseen_elements: bool = False) -> list[Prediction | StructureError]:
        """Like ``__call__`` on a list, but a structure that fails gets its StructureError in
        place of a Prediction and the others are still predicted."""
        results: list[Prediction | StructureError | None] = [None] * len(atoms_list)
        good = []
        for position, atoms in enumerate(atoms_list):
            try:
                self.check(atoms, allow_unseen_elements)
                good.append(position)
            except StructureError as err:
                results[position] = err
        featurized = self._featurize([atoms_list[p] for p in good])
        for position, item in zip(list(good), featurized):
            if isinstance(item, StructureError):
                results[position] = item
                good.remove(position)
        features = [f for f in featurized if not isinstance(f, StructureError)]
        if good:
            store = featurize.store_from_featurized([atoms_list[p].numbers for p in good], features, self.settings,
                                                    ring=self.ring)
            for position, prediction in zip(good, self.predict_store(store)):
                results[position] = prediction
                if write:
                    atoms_list[position].info[self.target] = prediction.value
                    atoms_list[position].arrays["ga_score"] = prediction.ga_scores
        return results

    def _featurize(self, atoms_list: list[ase.Atoms]) -> list[featurize.Featurized | StructureError]:
        """Neighbours (and ring flags) of each structure; a failure becomes a StructureError.

        Lists of at least ``PARALLEL_THRESHOLD`` structures go to the featuriser's pool of
        ``num_workers`` processes, started on first use and kept for later calls.
        """
        results = self.featurizer.map([structures.from_atoms(a) for a in atoms_list])
        return [StructureError(f"featurisation failed: {r.reason}") if isinstance(r, featurize.FeaturizationError)
                else r for r in results]

    def close(self) -> None:
        """Stops the featurisation worker processes (if any were started)."""
        self.featurizer.close()

    def bucket_for(self, totals: dict[str, int], n_graph: int, padding: dict[str, int] | None = None) -> Bucket:
        """The padded shape of a batch of ``n_graph`` structures with ``totals`` real rows per set
        ("nodes", "edges", extra sets) and ``padding`` rows per set (`batching.padding_rows`):
        the ladder, or, beyond it or with extra sets, its own size (`_own_bucket`)."""
        ladder = self.buckets[1] if n_graph == 1 else self.buckets[self.batch_size]
        padding = {"nodes": 1, "edges": 0} if padding is None else padding
        if set(totals) == set(BUILTIN_SETS):
            try:
                return batching.select_bucket(totals["nodes"], totals["edges"], n_graph, ladder, padding=padding)
            except ValueError:
                pass
        return _own_bucket(totals, padding, ladder[-1].n_graph)

    def _warnings(self, n_node: int, n_edge: int) -> tuple[str, ...]:
        """Reasons to distrust a prediction of a structure of these sizes."""
        out = []
        if n_edge == 0:
            cutoff = getattr(self.settings, "cutoff", None)
            out.append(f"no neighbour within the cutoff{f' ({cutoff} Å)' if cutoff else ''}: the atoms do not "
                       "interact in the model")
        if self.domain.elements is not None and n_node > self.domain.max_atoms:  # a known training domain
            out.append(f"{n_node} atoms: larger than any structure the model was trained on "
                       f"(at most {self.domain.max_atoms})")
        return tuple(out)

    def predict_store(self, store: GraphStore) -> list[Prediction]:
        """Predictions of every structure of an already featurised ``store`` (made with this
        model's featuriser settings, e.g. a training data set's split), in store order."""
        n_node, n_edge = store.n_node, store.n_edge
        counts = {name: store.counts(name) for name in (*BUILTIN_SETS, *sorted(store.extras))}
        padding = batching.padding_rows(store)
        order = np.argsort(n_node, kind="stable")
        out: list[Prediction | None] = [None] * len(store)
        for start in range(0, len(store), self.batch_size):
            indices = order[start:start + self.batch_size]
            totals = {name: int(count[indices].sum()) for name, count in counts.items()}
            bucket = self.bucket_for(totals, len(indices), padding)
            batch = batching.pad_batch(store, indices, bucket, None)
            values, scores = jax.device_get(self._apply(self._variables, batch))
            if self.prediction_floor is not None:
                values = np.maximum(values, self.prediction_floor)
            ends = np.cumsum(n_node[indices])
            for k, (s, end) in enumerate(zip(indices, ends)):
                atom_scores = None if scores is None else np.asarray(scores[end - n_node[s]:end], np.float64)
                out[s] = Prediction(float(values[k]), atom_scores, self._warnings(int(n_node[s]), int(n_edge[s])))
        return out


def top_atoms(atoms: ase.Atoms, ga_scores: np.ndarray, k: int = 3) -> list[tuple[int, str, float]]:
    """The ``k`` atoms with the highest GA score: (index, symbol, score), highest first."""
    best = np.argsort(-np.asarray(ga_scores), kind="stable")[:k]
    return [(int(i), atoms[int(i)].symbol, float(ga_scores[i])) for i in best]
