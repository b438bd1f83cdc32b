"""The original's training loss and masked metric sums (reference §3).

Everything takes the per-graph ``graph_mask`` [G] (True for real graphs with a target) so that
padding graphs, and NaN targets behind the mask, never reach a sum or a gradient. Metrics are
returned as sums plus a count, to be added over batches and divided on the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

# Kernels the original penalises with Keras' l2(1e-4): (layer, Dense) of our param tree, where
# the layer is matched on its name without the block number.
_L2_KERNELS = {
    ("local_attention", "query"),
    ("local_attention", "key"),
    ("local_attention", "filter_geo"),
    ("residual_norm", "dense_0"),
    ("residual_norm", "dense_1"),
    ("global_attention", "query"),
    ("global_attention", "key"),
    ("after_Lc",),
    ("bf_property",),
}


def is_l2_penalised(path: tuple[str, ...]) -> bool:
    """Whether the param at ``path`` (e.g. ("local_attention_3", "key", "kernel")) is penalised.

    Only kernels are: local-attention query/key/filter_geo, both feed-forward Dense of every
    block, ``after_Lc``, global-attention query/key and ``bf_property``. Embedding,
    ``dense_embed``, ``extra_embed``, ``neighbor_d``/``neighbor_w``, ``predict_property``,
    biases and LayerNorm parameters are not.
    """
    if path[-1] != "kernel":
        return False
    layer = path[0].rsplit("_", 1)[0] if path[0][-1].isdigit() else path[0]
    return (layer,) + path[1:-1] in _L2_KERNELS


def l2_penalty(params: Mapping[str, Any], coeff: float = 1e-4) -> jax.Array:
    """coeff · Σ w² over the kernels the original regularises (see ``is_l2_penalised``).

    Args:
      params: the model's params tree.
      coeff: the Keras ``l2`` factor (1e-4 in the original).

    Returns:
      float32 scalar.
    """
    flat = flax.traverse_util.flatten_dict(dict(params))
    total = sum(
        jnp.sum(jnp.square(w.astype(jnp.float32))) for path, w in flat.items() if is_l2_penalised(path)
    )
    return jnp.float32(coeff) * total


def _masked_errors(predictions: jax.Array, targets: jax.Array, graph_mask: jax.Array) -> jax.Array:
    """predictions − targets where the mask is True, exactly 0 elsewhere (NaN targets included)."""
    return jnp.where(graph_mask, predictions.astype(jnp.float32) - jnp.where(graph_mask, targets, 0.0), 0.0)


def original_loss(
    params: Mapping[str, Any],
    predictions: jax.Array,
    targets: jax.Array,
    graph_mask: jax.Array,
    l2: float = 1e-4,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The original's loss: RMSE over the real graphs of the batch plus the Keras L2 terms.

    Args:
      params: the model's params (for the L2 term).
      predictions: [G] model outputs (in the target's training units).
      targets: [G] targets in the same units; ignored where ``graph_mask`` is False.
      graph_mask: [G] bool, real graphs.
      l2: L2 coefficient (0 drops the term).

    Returns:
      (total, {"rmse": …, "l2": …}), float32 scalars. The RMSE's gradient is guarded so that a
      perfect fit or an empty mask gives 0, not NaN.
    """
    errors = _masked_errors(predictions, targets, graph_mask)
    rmse = rmse_from_sums(jnp.sum(errors**2), jnp.sum(graph_mask).astype(jnp.float32))
    penalty = l2_penalty(params, l2) if l2 else jnp.float32(0.0)
    return rmse + penalty, {"rmse": rmse, "l2": penalty}


def rmse_from_sums(squared_error_sum: jax.Array, count: jax.Array) -> jax.Array:
    """sqrt(squared_error_sum / max(count, 1)), with a gradient guarded so that a perfect fit or
    an empty batch gives 0, not NaN (the original's RMSE loss)."""
    mse = squared_error_sum / jnp.maximum(count, 1.0)
    return jnp.where(mse > 0, jnp.sqrt(jnp.where(mse > 0, mse, 1.0)), 0.0)


def mse_from_sums(squared_error_sum: jax.Array, count: jax.Array) -> jax.Array:
    """squared_error_sum / max(count, 1): the mean squared error (ALIGNN's and MEGNet's loss)."""
    return squared_error_sum / jnp.maximum(count, 1.0)


# config.loss -> the loss of a (global) batch from its summed squared error and count.
LOSSES = {"rmse": rmse_from_sums, "mse": mse_from_sums}


def metric_sums(predictions: jax.Array, targets: jax.Array, graph_mask: jax.Array) -> dict[str, jax.Array]:
    """Masked sums for MAE / RMSE over many batches.

    Args:
      predictions: [G]; targets: [G]; graph_mask: [G] bool.

    Returns:
      {"squared_error_sum", "abs_error_sum", "count"} float32 scalars; MAE = abs_error_sum /
      count and RMSE = sqrt(squared_error_sum / count) after summing over batches.
    """
    errors = _masked_errors(predictions, targets, graph_mask)
    return {
        "squared_error_sum": jnp.sum(errors**2),
        "abs_error_sum": jnp.sum(jnp.abs(errors)),
        "count": jnp.sum(graph_mask).astype(jnp.float32),
    }
