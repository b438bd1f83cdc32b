"""Bridges to the original TensorFlow/Keras SCANN: its weights and its padded batches.

* ``load_original_weights`` reads the original's weights, either from a fixture ``.npz``
  (``weight/<keras name>`` arrays, ``weight_names`` in model order, ``config_json``) or from a
  Keras-2 HDF5 file, and returns our model config and Flax params.
* ``graphs_from_original_batch`` turns the original's padded [B, M, N] batch into a padded
  ``jraph.GraphsTuple``.

Supported HDF5 layout (what Keras 2 ``model.save_weights(path.h5)`` and ``model.save(path.h5)``
write): the weights live in the root group, or in ``model_weights/`` for a full-model file; that
group's attribute ``layer_names`` lists the layers in model order; each layer's group has the
attribute ``weight_names`` (the variables' full Keras names, e.g. ``local_attention/query/kernel:0``,
in the layer's order) and stores each variable as the dataset at that name inside the layer group.
Layers without weights have an empty ``weight_names``. The model config is not read from the HDF5
file: it is the original's YAML (``config.yaml`` next to the file or one directory up, where the
original's training writes it) or the ``config`` argument.

Keras names carry global counters (``dense_3``, ``layer_normalization_5``) that depend on how many
layers the Keras session had built before, so names are matched by their order and their
counter-free role (``local_attention/layer_normalization/gamma``), and every mismatch is an error
naming the weight.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax
import jraph
import ml_collections
import numpy as np

from scannet_jax import models
from scannet_jax.models import ScannConfig, default_model_config, scann_config

ORIGINAL_IGNORED_KEYS = ("scale",)
# A weight may declare at most this many times the file's size (Keras weights are stored raw);
# a larger declaration is refused before anything is allocated.
MAX_WEIGHT_EXPANSION = 64  # read by the original's config but not used by its model


class KerasWeight(NamedTuple):
    """One variable of the original model."""

    name: str  # canonical Keras name in a fresh session, e.g. "local_attention_1/key/bias:0"
    path: tuple[str, ...]  # our Flax param path, e.g. ("local_attention_1", "key", "bias")
    shape: tuple[int, ...]


def _counter(name: str, n: int) -> str:
    return name if n == 0 else f"{name}_{n}"


def keras_weight_layout(model_config: Any) -> list[KerasWeight]:
    """The original model's variables, in its weight order, with our param paths.

    Args:
      model_config: our model config (ConfigDict, dict or ``ScannConfig``).

    Returns:
      One ``KerasWeight`` per variable, in the order of ``keras.Model.weights`` (which is also
      the order of the HDF5 layer groups).
    """
    cfg = scann_config(model_config)
    d, k = cfg.local_dim, cfg.num_gaussians
    layout: list[KerasWeight] = []

    def dense(keras_layer: str, path: tuple[str, ...], n_in: int, n_out: int) -> None:
        layout.append(KerasWeight(f"{keras_layer}/kernel:0", path + ("kernel",), (n_in, n_out)))
        layout.append(KerasWeight(f"{keras_layer}/bias:0", path + ("bias",), (n_out,)))

    def norm(keras_layer: str, path: tuple[str, ...]) -> None:
        layout.append(KerasWeight(f"{keras_layer}/gamma:0", path + ("scale",), (d,)))
        layout.append(KerasWeight(f"{keras_layer}/beta:0", path + ("bias",), (d,)))

    layout.append(
        KerasWeight("embed_atom/embeddings:0", ("embed_atom", "embedding"), (cfg.n_atoms, cfg.embedding_dim))
    )
    embed_in = cfg.embedding_dim
    if cfg.use_ring:
        dense("extra_embed", ("extra_embed",), 2, 10)
        embed_in += 10
    dense("dense_embed", ("dense_embed",), embed_in, d)
    if cfg.g_update:
        dense("neighbor_d", ("neighbor_d",), k, d)
        dense("neighbor_w", ("neighbor_w",), k, d)

    n_norm = n_dense = 0
    for b in range(cfg.n_attention):
        la, ours = _counter("local_attention", b), f"local_attention_{b}"
        dense(f"{la}/query", (ours, "query"), d, d)
        dense(f"{la}/key", (ours, "key"), d, d)
        dense(f"{la}/filter_geo", (ours, "filter_geo"), 3 * d if cfg.g_update else k, d)
        norm(f"{la}/{_counter('layer_normalization', n_norm)}", (ours, "layer_norm"))
        n_norm += 1
        if cfg.g_update:
            norm(f"{la}/{_counter('layer_normalization', n_norm)}", (ours, "layer_norm_g"))
            n_norm += 1
        if cfg.use_attn_norm:
            rn, ours = _counter("residual_norm", b), f"residual_norm_{b}"
            dense(_counter("dense", n_dense), (ours, "dense_0"), d, d)
            dense(_counter("dense", n_dense + 1), (ours, "dense_1"), d, d)
            n_dense += 2
            norm(f"{rn}/{_counter('layer_normalization', n_norm)}", (ours, "layer_norm"))
            n_norm += 1
    dense("after_Lc", ("after_Lc",), d, cfg.global_dim)
    dense("global_attention/query", ("global_attention", "query"), cfg.global_dim, cfg.global_dim)
    dense("global_attention/key", ("global_attention", "key"), cfg.global_dim, cfg.global_dim)
    dense("bf_property", ("bf_property",), cfg.global_dim, cfg.dense_out)
    dense("predict_property", ("predict_property",), cfg.dense_out, 1)
    return layout


def _role(name: str) -> tuple[str, ...]:
    """Counter-free role of a Keras variable name: "residual_norm_1/dense_3/kernel:0" → parts."""
    parts = [re.sub(r"_\d+$", "", p) for p in name.removesuffix(":0").split("/")]
    return tuple(parts)


def _same_role(found: str, expected: str) -> bool:
    f, e = _role(found), _role(expected)
    if f[-2:] != e[-2:]:
        return False
    # The feed-forward Dense of a block is "dense_N/…" or, in some Keras versions,
    # "residual_norm_N/dense_N/…"; compare the owning layer only where both names have one.
    return len(f) < 3 or len(e) < 3 or f[0] == e[0]


def match_weight_names(names: Sequence[str], model_config: Any) -> list[tuple[str, KerasWeight]]:
    """Pairs the original's variable names (in model order) with our layout.

    Args:
      names: the Keras variable names in the model's weight order.
      model_config: our model config.

    Returns:
      (original name, ``KerasWeight``) pairs in order.

    Raises:
      ValueError: naming the first missing, unexpected or out-of-place weight.
    """
    layout = keras_weight_layout(model_config)
    pairs = []
    for position, (found, expected) in enumerate(zip(names, layout)):
        if not _same_role(found, expected.name):
            raise ValueError(
                f"original weights: expected {expected.name!r} (shape {expected.shape}) at position "
                f"{position}, found {found!r}; the weight is missing, extra or out of order for "
                f"this model config"
            )
        pairs.append((found, expected))
    if len(names) < len(layout):
        missing = [w.name for w in layout[len(names):]]
        raise ValueError(f"original weights: missing weight(s) {missing}")
    if len(names) > len(layout):
        raise ValueError(f"original weights: unexpected extra weight(s) {list(names[len(layout):])}")
    return pairs


def params_from_keras(
    weights: Mapping[str, np.ndarray], names: Sequence[str], model_config: Any
) -> dict[str, Any]:
    """Builds our Flax params from the original's variables.

    Args:
      weights: Keras name → array.
      names: the Keras names in model order (keys of ``weights``).
      model_config: our model config.

    Returns:
      The nested params dict (float32), ready for ``module.apply({"params": params}, …)``.

    Raises:
      ValueError: for a missing, extra or mis-shaped weight, naming it.
    """
    flat = {}
    for name, expected in match_weight_names(names, model_config):
        if name not in weights:
            raise ValueError(f"original weights: {name!r} is listed but has no array")
        value = np.asarray(weights[name], dtype=np.float32)
        if value.shape != expected.shape:
            raise ValueError(
                f"original weights: {name!r} has shape {value.shape}, expected {expected.shape}"
            )
        flat[expected.path] = value
    return flax.traverse_util.unflatten_dict(flat)


def keras_arrays_from_params(params: Mapping[str, Any], model_config: Any) -> dict[str, np.ndarray]:
    """The inverse of ``params_from_keras`` with canonical names (e.g. for gradients): name → array."""
    flat = flax.traverse_util.flatten_dict(dict(params))
    return {w.name: np.asarray(flat[w.path]) for w in keras_weight_layout(model_config)}


def model_config_from_original(original: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Our model config from the original's config (its whole YAML/JSON dict or its ``model`` part).

    The original's ``hyper.target == "e_b"`` switches on ``relu_output``; its ``scale`` key is
    ignored (the original model does not use it); only ``feature: atomic`` is supported.

    Raises:
      ValueError: for an unsupported feature or unknown key.
    """
    model = dict(original.get("model", original))
    hyper = dict(original.get("hyper", {}))
    feature = model.pop("feature", "atomic")
    if feature != "atomic":
        raise ValueError(f"original config: feature={feature!r} is not supported (only 'atomic')")
    for key in ORIGINAL_IGNORED_KEYS:
        model.pop(key, None)
    config = default_model_config()
    unknown = sorted(set(model) - set(config))
    if unknown:
        raise ValueError(f"original config: unknown model key(s) {unknown}")
    config.update(model)
    config.name = models.model_name({"g_update": config.g_update})
    config.relu_output = hyper.get("target") == "e_b"
    return config


def _as_model_config(config: Any) -> ml_collections.ConfigDict:
    """Accepts our config, the original's config dict, or a path to the original's YAML."""
    if isinstance(config, (str, Path)):
        import yaml

        with open(config) as f:
            return model_config_from_original(yaml.safe_load(f))
    if isinstance(config, ScannConfig):
        return ml_collections.ConfigDict(vars(config).copy())
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    if "model" in values or not set(values) <= set(default_model_config()):
        return model_config_from_original(values)
    merged = default_model_config()
    merged.update(values)
    if "name" not in values:
        merged.name = models.model_name({"g_update": merged.g_update})
    return merged


def _read_npz(path: Path) -> tuple[list[str], dict[str, np.ndarray], dict[str, Any] | None]:
    with np.load(path) as data:
        if "weight_names" not in data:
            raise ValueError(f"{path}: no 'weight_names' array (not an original-weights .npz)")
        names = [str(n) for n in data["weight_names"]]
        weights = {k.removeprefix("weight/"): data[k] for k in data.files if k.startswith("weight/")}
        extra = sorted(set(weights) - set(names))
        if extra:
            raise ValueError(f"{path}: weight array(s) {extra} are not listed in weight_names")
        config = json.loads(str(data["config_json"])) if "config_json" in data else None
    return names, weights, config


def _read_h5(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    import h5py

    def text(x: Any) -> str:
        return x.decode("utf8") if isinstance(x, bytes) else str(x)

    limit = max(MAX_WEIGHT_EXPANSION * path.stat().st_size, 1 << 20)  # bytes one dataset may declare
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise ValueError(f"{path}: no 'layer_names' attribute (not a Keras-2 HDF5 weights file)")
        names, weights = [], {}
        for layer in map(text, root.attrs["layer_names"]):
            group = root[layer]
            for name in map(text, group.attrs.get("weight_names", [])):
                if name not in group or not isinstance(group[name], h5py.Dataset):
                    raise ValueError(f"{path}: layer {layer!r} lists weight {name!r} but has no dataset for it")
                dataset = group[name]
                if dataset.external or dataset.is_virtual:
                    raise ValueError(f"{path}: weight {name!r} keeps its data in another file "
                                     f"({'virtual' if dataset.is_virtual else dataset.external[0][0]}); refused")
                declared = dataset.size * dataset.dtype.itemsize
                if declared > limit:
                    raise ValueError(f"{path}: weight {name!r} declares shape {dataset.shape} ({declared:,} bytes) in a "
                                     f"{path.stat().st_size:,}-byte file; refused before reading")
                names.append(name)
                weights[name] = np.asarray(dataset)
    return names, weights


def _find_original_yaml(path: Path) -> Path:
    for candidate in (path.parent / "config.yaml", path.parent.parent / "config.yaml"):
        if candidate.exists():
            return candidate
    raise ValueError(
        f"{path}: no config given and no config.yaml next to it or one directory up; "
        f"pass config= (the original's YAML path or dict, or our model config)"
    )


def load_original_weights(
    path: str | Path, config: Any = None
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """Reads the original model's weights into our params.

    Args:
      path: a fixture-style ``.npz`` or a Keras-2 ``.h5`` / ``.hdf5`` file (layout in the module
        docstring).
      config: the model config: None (read it from the ``.npz`` ``config_json``, or from the
        original's ``config.yaml`` beside the ``.h5`` or one directory up), the original's config
        dict or YAML path, or our model config.

    Returns:
      (model_config, params): our ConfigDict (``n_atoms`` as in the file) and the Flax params.

    Raises:
      ValueError: for an unreadable file or a missing, extra or mis-shaped weight, naming it.
    """
    path = Path(path)
    if path.suffix == ".npz":
        names, weights, file_config = _read_npz(path)
        if config is None:
            if file_config is None:
                raise ValueError(f"{path}: no config_json in the file and no config given")
            config = file_config
    elif path.suffix in (".h5", ".hdf5", ".keras"):
        names, weights = _read_h5(path)
        if config is None:
            config = _find_original_yaml(path)
    else:
        raise ValueError(f"{path}: unknown weights format {path.suffix!r} (expected .npz or .h5)")
    model_config = _as_model_config(config)
    return model_config, params_from_keras(weights, names, model_config)


def graphs_from_original_batch(
    inputs: Mapping[str, np.ndarray],
    *,
    weight: str = "solid_angle",
    targets: np.ndarray | None = None,
) -> jraph.GraphsTuple:
    """Turns the original's padded batch (reference §1.3) into a padded GraphsTuple.

    Structures keep their batch order and their atoms their order; each real neighbour slot
    becomes one edge (receiver = centre i, sender = neighbour j), in slot order. One padding graph
    holding one padding node (Z = 0) and no edge is appended (``jraph.pad_with_graphs`` layout),
    so the result can go straight into the model.

    The original's ``neighbor_weight`` is Ω for SCANN+ and ρ for SCANN; ``weight`` says which:
    * "solid_angle": stored in ``edges["solid_angles"]``; ``edges["relative_weights"]`` is
      rebuilt as Ω_ij / max over i's edges of Ω_ik. That equals the original's ρ whenever i's
      largest facet is an edge (the usual case; the original normalises over all facets).
    * "relative_weight": stored in ``edges["relative_weights"]``; Ω cannot be recovered, so
      ``edges["solid_angles"]`` is NaN (a SCANN+ model fed these graphs predicts NaN).

    Args:
      inputs: the original's arrays without the ``input/`` prefix: ``atomic`` [B, M],
        ``neighbors``, ``neighbor_mask``, ``neighbor_weight``, ``neighbor_distance`` [B, M, Nb],
        optionally ``atom_mask`` [B, M, 1] and ``ring_aromatic`` [B, M, 2].
      weight: "solid_angle" or "relative_weight", see above.
      targets: optional [B] targets for ``globals["target"]`` (NaN when absent).

    Returns:
      GraphsTuple with B + 1 graphs; ``globals["index"]`` = batch position, -1 on padding.

    Raises:
      ValueError: for missing arrays, inconsistent shapes, or a real slot pointing at a padded
        atom (naming structure, atom and slot).
    """
    if weight not in ("solid_angle", "relative_weight"):
        raise ValueError(f"weight must be 'solid_angle' or 'relative_weight', got {weight!r}")
    required = ("atomic", "neighbors", "neighbor_mask", "neighbor_weight", "neighbor_distance")
    missing = [k for k in required if k not in inputs]
    if missing:
        raise ValueError(f"original batch: missing array(s) {missing}")
    z = np.asarray(inputs["atomic"])
    if z.ndim != 2:
        raise ValueError(f"original batch: 'atomic' must be [B, M], got shape {z.shape}")
    num_structures, max_atoms = z.shape
    atom_mask = z != 0
    if "atom_mask" in inputs:
        given = np.asarray(inputs["atom_mask"]).reshape(num_structures, max_atoms).astype(bool)
        bad = np.argwhere(given != atom_mask)
        if bad.size:
            b, i = bad[0]
            raise ValueError(f"original batch: atom_mask disagrees with Z != 0 at structure {b}, atom {i}")
    neighbors = np.asarray(inputs["neighbors"])
    slot_shape = (num_structures, max_atoms, neighbors.shape[-1])
    for key in required[1:]:
        if np.shape(inputs[key]) != slot_shape:
            raise ValueError(f"original batch: {key!r} has shape {np.shape(inputs[key])}, expected {slot_shape}")
    slot_mask = np.asarray(inputs["neighbor_mask"]).astype(bool) & atom_mask[:, :, None]

    # Global index of every (structure, local atom) position; -1 where padded.
    n_node = atom_mask.sum(axis=1)
    global_index = np.full(z.shape, -1, dtype=np.int64)
    global_index[atom_mask] = np.arange(n_node.sum())

    b, i, slot = np.nonzero(slot_mask)  # C order: structure, centre atom, slot
    j = neighbors[b, i, slot]
    if np.any((j < 0) | (j >= max_atoms)):
        k = int(np.argmax((j < 0) | (j >= max_atoms)))
        raise ValueError(
            f"original batch: structure {b[k]}, atom {i[k]}, slot {slot[k]} points at atom {j[k]}, "
            f"outside 0..{max_atoms - 1}"
        )
    senders = global_index[b, j]
    if np.any(senders < 0):
        k = int(np.argmax(senders < 0))
        raise ValueError(
            f"original batch: structure {b[k]}, atom {i[k]}, slot {slot[k]} points at padded atom {j[k]}"
        )
    receivers = global_index[b, i]
    values = np.asarray(inputs["neighbor_weight"], np.float32)[b, i, slot]
    distances = np.asarray(inputs["neighbor_distance"], np.float32)[b, i, slot]
    if weight == "solid_angle":
        solid_angles = values
        largest = np.zeros(n_node.sum(), np.float32)
        np.maximum.at(largest, receivers, values)
        relative_weights = values / np.maximum(largest[receivers], np.finfo(np.float32).tiny)
    else:
        relative_weights = values
        solid_angles = np.full_like(values, np.nan)

    nodes = {"atomic_numbers": np.append(z[atom_mask], 0).astype(np.int32)}
    if "ring_aromatic" in inputs:
        ring = np.asarray(inputs["ring_aromatic"], np.float32)[atom_mask]
        nodes["ring_aromatic"] = np.concatenate([ring, np.zeros((1, ring.shape[-1]), np.float32)])
    target = np.full(num_structures, np.nan, np.float32) if targets is None else np.asarray(targets, np.float32)
    if target.shape != (num_structures,):
        raise ValueError(f"targets must have shape ({num_structures},), got {target.shape}")
    return jraph.GraphsTuple(
        nodes=nodes,
        edges={
            "distances": distances,
            "solid_angles": solid_angles,
            "relative_weights": relative_weights.astype(np.float32),
        },
        senders=senders.astype(np.int32),
        receivers=receivers.astype(np.int32),
        n_node=np.append(n_node, 1).astype(np.int32),
        n_edge=np.append(np.bincount(b, minlength=num_structures), 0).astype(np.int32),
        globals={
            "target": np.append(target, 0.0).astype(np.float32),
            "index": np.append(np.arange(num_structures), -1).astype(np.int32),
        },
    )
