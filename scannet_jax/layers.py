"""Building blocks of SCANN / SCANN+ over edge lists (Flax Linen).

Everything here works on flat node and edge arrays (jraph layout): N nodes, E directed edges with
``receivers`` = centre atom i (the attention query) and ``senders`` = neighbour j (the key), H
heads, D features. Aggregations are segment operations with a static number of segments; there is
no [N, N] matrix and no dense [atoms, neighbours] tensor. Padding is removed with boolean masks
(``edge_mask`` [E], ``node_mask`` [N]) so padded edges and nodes never reach a real atom.

Reference: ``shared/docs/scann-reference.md`` §2.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

LAYER_NORM_EPSILON = 1e-6  # Keras LayerNormalization(epsilon=1e-6) in the original.


def keras_dense(features: int, name: str, dtype: Dtype = jnp.float32) -> nn.Dense:
    """Dense layer with the original's Keras defaults (Glorot-uniform kernel, zero bias).

    Parameters are always float32; ``dtype`` is the compute dtype.
    """
    return nn.Dense(
        features,
        name=name,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.glorot_uniform(),
        bias_init=nn.initializers.zeros,
    )


@jax.custom_vjp
def _normalise(x: jax.Array) -> jax.Array:
    """(x − mean) / sqrt(var + eps) over the last axis, two-pass variance as Keras, float32."""
    return _normalise_fwd(x)[0]


def _normalise_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + LAYER_NORM_EPSILON)
    normalised = centred * rstd
    return normalised, (normalised, rstd)


def _normalise_bwd(residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    # dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂)): one pass over each row for the two means and
    # one for dx, instead of autodiff's chain through both passes of the variance.
    normalised, rstd = residuals
    mean_g = jnp.mean(g, axis=-1, keepdims=True)
    mean_gx = jnp.mean(g * normalised, axis=-1, keepdims=True)
    return (rstd * (g - mean_g - normalised * mean_gx),)


_normalise.defvjp(_normalise_fwd, _normalise_bwd)


class KerasLayerNorm(nn.Module):
    """LayerNorm over the feature axis as Keras computes it (two-pass variance, eps 1e-6, float32).

    Same parameters as ``nn.LayerNorm`` (``scale`` [F] ones, ``bias`` [F] zeros) and the same
    forward values, with a hand-written gradient: on edge arrays [E, D] autodiff through the
    two-pass variance materialises several [E, D] temporaries per LayerNorm that this avoids.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps x [..., F] to [..., F] float32."""
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return _normalise(x.astype(jnp.float32)) * scale + bias


def keras_layer_norm(name: str) -> KerasLayerNorm:
    """LayerNorm over the feature axis as Keras computes it (two-pass variance, eps 1e-6, float32)."""
    return KerasLayerNorm(name=name)


def gather(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x[indices] along axis 0 for indices known to be in range (node indices of a valid graph).

    Skips the bounds handling of plain indexing, which makes edge gathers several times faster
    on CPU; an out-of-range index gives unspecified values instead of an error.
    """
    return x.at[indices].get(mode="promise_in_bounds")


def gaussian_expansion(x: jax.Array, centers: np.ndarray, width: float = 0.5) -> jax.Array:
    """Gaussian radial basis exp(-(x - c_k)^2 / width^2), as the original's ``GaussianExpansion``.

    Args:
      x: [...] float, distances in Å or solid angles in sr.
      centers: [K] basis centres, same unit as ``x``.
      width: basis width (the original uses 0.5, i.e. a denominator of 0.25).

    Returns:
      [..., K] float32.
    """
    x = jnp.asarray(x, jnp.float32)[..., None]
    c = jnp.asarray(centers, jnp.float32)
    return jnp.exp(-((x - c) ** 2) / jnp.float32(width**2))


def _masked_segment_exp(
    logits: jax.Array, segment_ids: jax.Array, mask: jax.Array, num_segments: int
) -> tuple[jax.Array, jax.Array]:
    """exp(logits − segment max) on the entries where ``mask`` is True (exactly 0 elsewhere), and
    each segment's sum of them (the softmax denominator, 1 for a segment with no real entry).

    Returns:
      (weights [E, ...] float32, denominators [num_segments, ...] float32).
    """
    logits = logits.astype(jnp.float32)
    m = mask.reshape(mask.shape + (1,) * (logits.ndim - 1))
    seg_max = jax.ops.segment_max(
        jax.lax.stop_gradient(jnp.where(m, logits, -jnp.inf)), segment_ids, num_segments
    )
    seg_max = jnp.where(jnp.isfinite(seg_max), seg_max, 0.0)
    exp = jnp.where(m, jnp.exp(jnp.where(m, logits - gather(seg_max, segment_ids), 0.0)), 0.0)
    denom = jax.ops.segment_sum(exp, segment_ids, num_segments)
    return exp, jnp.where(denom > 0, denom, 1.0)


def masked_segment_softmax(
    logits: jax.Array,
    segment_ids: jax.Array,
    mask: jax.Array,
    num_segments: int,
) -> jax.Array:
    """Softmax of ``logits`` within each segment, over the entries where ``mask`` is True.

    Masked entries get probability exactly 0 and take no part in any segment's normaliser, so a
    segment whose entries are all masked (or that has none) contributes nothing; gradients stay
    finite in every case. Computed in float32 and shifted by the (gradient-free) segment maximum.

    Args:
      logits: [E, ...] scores; softmax is taken over the leading axis within each segment,
        independently for every trailing index (e.g. every head).
      segment_ids: [E] int, segment of each entry (e.g. the receiver of an edge).
      mask: [E] bool, True for real entries.
      num_segments: static number of segments.

    Returns:
      [E, ...] float32 probabilities.
    """
    exp, denom = _masked_segment_exp(logits, segment_ids, mask, num_segments)
    return exp / gather(denom, segment_ids)


class EdgeConcatDense(nn.Module):
    """Dense layer on [h_i ‖ g_ij ‖ h_j] per edge, computed without building the concatenation.

    With the kernel split into row blocks (W_i, W_g, W_j), the output is
    (h W_i)[receivers] + g W_g + (h W_j)[senders] + b: the node terms are computed once per node
    and gathered, which removes two thirds of the edge-level multiply-adds of SCANN+'s geometry
    update (``filter_geo``). Parameters are the same ``kernel`` [2·D_h + D_g, F] and ``bias`` [F]
    as a Dense on the concatenation; results agree to float32 rounding.

    Attributes:
      features: output size F.
      dtype: compute dtype.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        h: jax.Array,  # [N, D_h]
        geometry: jax.Array,  # [E, D_g]
        senders: jax.Array,  # [E]
        receivers: jax.Array,  # [E]
    ) -> jax.Array:
        """Returns [E, F] in ``dtype``."""
        d_h, d_g = h.shape[-1], geometry.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.glorot_uniform(), (2 * d_h + d_g, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        h, geometry, kernel, bias = nn.dtypes.promote_dtype(h, geometry, kernel, bias, dtype=self.dtype)
        centre = h @ kernel[:d_h]  # [N, F]
        neighbour = h @ kernel[d_h + d_g:]  # [N, F]
        return gather(centre, receivers) + geometry @ kernel[d_h:d_h + d_g] + gather(neighbour, senders) + bias


class LocalAttention(nn.Module):
    """One local attention block (reference §2 steps 1-5), without the feed-forward.

    SCANN+ (``g_update`` True) updates the carried edge geometry g_ij from [h_i ‖ g_ij ‖ h_j];
    SCANN (``g_update`` False) builds g_ij = swish(Dense(G_d(d_ij))) · ρ_ij afresh in every block.
    Keys k_ij = Dense(h_j ⊙ g_ij) double as values; the query q_i = Dense(h_i) is the residual:
    h_i' = LN(q_i + concat_h Σ_j a_ij^h k_ij^h), with a the per-head softmax of
    ⟨q_i^h, k_ij^h⟩ / sqrt(D/H) over the real edges entering i. An atom with no real edge gets LN(q_i).

    Attributes:
      dim: feature size D.
      num_head: number of heads H (D must be divisible by H).
      g_update: SCANN+ geometry update (True) or SCANN distance filter (False).
      attention_dropout: dropout rate on the attention weights (0 disables it).
      dtype: compute dtype of the Dense layers (softmax and LayerNorm stay float32).
    """

    dim: int
    num_head: int
    g_update: bool
    attention_dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        h: jax.Array,  # [N, D]
        geometry: jax.Array,  # [E, D] carried g (SCANN+) or [E, K] distance Gaussians (SCANN)
        senders: jax.Array,  # [E] int, neighbour j
        receivers: jax.Array,  # [E] int, centre i
        edge_mask: jax.Array,  # [E] bool
        edge_weights: jax.Array | None = None,  # [E] ρ_ij (SCANN only)
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (h' [N, D] float32, g [E, D] (updated geometry), attention [E, H] float32)."""
        if self.dim % self.num_head:
            raise ValueError(f"local_dim={self.dim} is not divisible by num_head={self.num_head}")
        num_nodes = h.shape[0]
        head_dim = self.dim // self.num_head
        h_j = gather(h, senders)  # [E, D]

        if self.g_update:
            update = EdgeConcatDense(self.dim, self.dtype, name="filter_geo")(h, geometry, senders, receivers)
            geometry = keras_layer_norm("layer_norm_g")(nn.swish(update) + geometry)
        else:
            if edge_weights is None:
                raise ValueError("SCANN (g_update=False) needs edge_weights (relative weights ρ)")
            filter_geo = keras_dense(self.dim, "filter_geo", self.dtype)
            geometry = nn.swish(filter_geo(geometry)) * edge_weights[:, None].astype(self.dtype)

        query = keras_dense(self.dim, "query", self.dtype)(h)  # [N, D]
        key = keras_dense(self.dim, "key", self.dtype)(h_j * geometry)  # [E, D]

        q_heads = query.reshape(num_nodes, self.num_head, head_dim)
        k_heads = key.reshape(-1, self.num_head, head_dim).astype(jnp.float32)  # [E, H, D/H]
        # The original multiplies the query by head_dim ** -0.5 (its `scale` key is not used here).
        # A multiply-and-sum, not an einsum: XLA would make the per-edge dot a batched matmul.
        q_edges = gather(q_heads.astype(jnp.float32) * jnp.float32(head_dim**-0.5), receivers)
        logits = jnp.sum(q_edges * k_heads, axis=-1)  # [E, H]
        weights, denom = _masked_segment_exp(logits, receivers, edge_mask, num_nodes)  # [E, H], [N, H]
        if self.attention_dropout > 0.0:
            attention = nn.Dropout(self.attention_dropout)(
                weights / gather(denom, receivers), deterministic=deterministic
            )
            messages = attention[..., None] * k_heads  # [E, H, D/H]
            context = jax.ops.segment_sum(messages.reshape(-1, self.dim), receivers, num_nodes)
        else:
            # Σ_j a_ij k_ij = (Σ_j w_ij k_ij) / Σ_j w_ij: normalised per node, not per edge. Masked
            # edges have w = 0 exactly, so they add nothing.
            unnormalised = jax.ops.segment_sum(
                (weights[..., None] * k_heads).reshape(-1, self.dim), receivers, num_nodes
            )
            context = (unnormalised.reshape(num_nodes, self.num_head, head_dim) / denom[..., None]).reshape(
                num_nodes, self.dim
            )
            attention = weights / gather(denom, receivers)  # returned (sown) only
        h_new = keras_layer_norm("layer_norm")(query.astype(jnp.float32) + context)
        return h_new, geometry, attention


class ResidualNorm(nn.Module):
    """Residual feed-forward h ← LN(h + Dropout(Dense(swish(Dense(h))))) (reference §2 step 6).

    Attributes:
      dim: feature size D.
      dropout_rate: dropout on the feed-forward output (0.1 in the original).
      dtype: compute dtype of the Dense layers.
    """

    dim: int
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, deterministic: bool = True) -> jax.Array:
        """Maps h [N, D] to [N, D] float32."""
        y = nn.swish(keras_dense(self.dim, "dense_0", self.dtype)(h))
        y = keras_dense(self.dim, "dense_1", self.dtype)(y)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        return keras_layer_norm("layer_norm")(h.astype(jnp.float32) + y.astype(jnp.float32))


class GlobalAttention(nn.Module):
    """Linear-time global attention readout (reference §2, ``global_attention``).

    Q_i = Dense(c_i), K_i = Dense(c_i), both zeroed on padding nodes;
    s_i = ⟨K_i, Σ_{k in graph(i)} Q_k − Q_i⟩ (the original's Σ_{k≠i} ⟨K_i, Q_k⟩ without a pair
    matrix); optionally s ← s / max(‖s‖₂, eps) per graph; α = softmax of s over the real atoms of
    each graph; r = Σ_i α_i K_i.

    Deliberate departure: the original divides by ‖s‖₂ unguarded, which gives NaN for a one-atom
    structure (s = 0). Here the norm is floored at ``norm_eps``, so such a structure gets s = 0,
    α = 1 and a finite prediction; every other structure is unchanged.

    Attributes:
      dim: size of Q and K (``global_dim``).
      use_norm: the original's ``use_ga_norm``.
      norm_eps: floor of ‖s‖₂.
      dtype: compute dtype of the Dense layers (scores and softmax stay float32).
    """

    dim: int
    use_norm: bool = True
    norm_eps: float = 1e-12
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        c: jax.Array,  # [N, F]
        node_graph: jax.Array,  # [N] int, graph of each node (sorted)
        node_mask: jax.Array,  # [N] bool
        num_graphs: int,
    ) -> tuple[jax.Array, jax.Array]:
        """Returns (α [N] float32, 0 on padding nodes; r [G, dim] float32)."""
        mask = node_mask[:, None]
        query = jnp.where(mask, keras_dense(self.dim, "query", self.dtype)(c), 0).astype(jnp.float32)
        key = jnp.where(mask, keras_dense(self.dim, "key", self.dtype)(c), 0).astype(jnp.float32)

        query_sum = jax.ops.segment_sum(query, node_graph, num_graphs, indices_are_sorted=True)
        scores = jnp.sum(key * (gather(query_sum, node_graph) - query), axis=-1)  # [N]
        scores = jnp.where(node_mask, scores, 0.0)
        if self.use_norm:
            sq_norm = jax.ops.segment_sum(scores**2, node_graph, num_graphs, indices_are_sorted=True)
            norm = jnp.sqrt(jnp.maximum(sq_norm, jnp.float32(self.norm_eps) ** 2))
            scores = scores / gather(norm, node_graph)

        alpha = masked_segment_softmax(scores, node_graph, node_mask, num_graphs)  # [N]
        context = jax.ops.segment_sum(
            alpha[:, None] * key, node_graph, num_graphs, indices_are_sorted=True
        )
        return alpha, context
