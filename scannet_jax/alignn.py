"""ALIGNN (Choudhary & DeCost, npj Comput. Mater. 7, 185 (2021)) in Flax Linen.

Number for number the reference `alignn.models.alignn.ALIGNN` (zoo-reference.md §1.4-1.9): CGCNN
atom features, RBF expansions with the reference's widths, edge-gated graph convolutions run on
the bond graph first and on its line graph second, BatchNorm everywhere, mean readout.

Inputs are two padded graphs (jraph `pad_with_graphs` layout, at least one padding graph each):

* `graphs`: the atom graph, N nodes, E directed bonds (`knn.KnnNeighbors`; message from `senders`
  to `receivers`), nodes["atomic_numbers"] int32 [N], edges["vectors"] float32 [E, 3] Å (only
  their norm is used) or edges["distances"] float32 [E] Å.
* `line_graph`: one node per edge of `graphs` (same order, same padding: `line_graph.
  pad_alignn_batch`), T triplets (senders/receivers index bonds), edges["cosines"] float32 [T].

In training the trainer's `batching.Batch` of a `knn_line_graph` store (featurize.py) holds both:
`AlignnNet` (the registered network "alignn", models.py) reads `batch.graphs` and builds the line
graph from the "triplets" extra set (`batch_line_graph`), the same arrays as `pad_alignn_batch`.

BatchNorm statistics (train mode) run over real rows only; padded atoms, bonds and triplets are
masked out, so a batch gives the same result whatever its padding. Running statistics live in the
"batch_stats" collection, updated as PyTorch does (momentum 0.1, unbiased variance).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import resources
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from scannet_jax.layers import gather

BN_MOMENTUM = 0.1  # PyTorch convention: new = (1 - m) old + m batch
BN_EPSILON = 1e-5
GATE_EPSILON = 1e-6  # EdgeGatedGraphConv: sum σ·Vh / (sum σ + 1e-6)
LINKS = ("identity", "log", "logit")
CGCNN_FEATURES = 92


@dataclasses.dataclass(frozen=True)
class AlignnConfig:
    """Hyper-parameters of `ALIGNN` (the reference's `ALIGNNConfig`; defaults of §1.9)."""

    alignn_layers: int = 4
    gcn_layers: int = 4
    atom_input_features: int = 92  # CGCNN table width (the only featurisation supported)
    edge_input_features: int = 80  # distance RBF bins on [0, 8] Å
    triplet_input_features: int = 40  # cosine RBF bins on [-1, 1]
    embedding_features: int = 64
    hidden_features: int = 256
    output_features: int = 1
    link: str = "identity"  # "identity", "log" (exp of the output, bias init log 0.7), "logit"

    def __post_init__(self) -> None:
        if self.link not in LINKS:
            raise ValueError(f"AlignnConfig: link must be one of {LINKS}, got {self.link!r}")
        if self.atom_input_features != CGCNN_FEATURES:
            raise ValueError(f"AlignnConfig: atom_input_features must be {CGCNN_FEATURES} (CGCNN), "
                             f"got {self.atom_input_features}")


@functools.cache
def cgcnn_table() -> np.ndarray:
    """[104, 92] float32 CGCNN atom features by atomic number Z (scannet_jax/data/README.md).

    Row 0 (padding) is zeros; Z 101-103, absent from the table, get row 100 as in the reference.
    """
    text = resources.files("scannet_jax").joinpath("data/cgcnn_atom_init.json").read_text()
    rows = {int(z): v for z, v in json.loads(text).items()}
    table = np.zeros((104, len(rows[1])), np.float32)
    for z in range(1, 104):
        table[z] = rows.get(z, rows[100])
    return table


def rbf_expansion(x: jax.Array, vmin: float, vmax: float, bins: int) -> jax.Array:
    """exp(-γ (x - μ_b)²), μ = linspace(vmin, vmax, bins), γ = 1 / mean spacing (§1.4).

    Args:
      x: [M] distances (Å) or cosines.

    Returns:
      [M, bins] float32. γ is 1/spacing, not 1/spacing² (the reference's choice): 9.875 Å⁻² for
      80 bins on [0, 8] Å, 19.5 for 40 bins on [-1, 1].
    """
    centers = np.linspace(vmin, vmax, bins, dtype=np.float32)
    gamma = np.float32(1.0 / np.diff(centers).mean())
    return jnp.exp(-gamma * (x[:, None] - centers) ** 2)


def _torch_linear(features: int, fan_in: int, name: str, bias_init=None) -> nn.Dense:
    """Dense with torch.nn.Linear's initialisation: kernel and bias U(±1/√fan_in)."""
    bound = 1.0 / np.sqrt(fan_in)

    def uniform_bias(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.Dense(features, name=name,
                    kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                    bias_init=bias_init or uniform_bias)


class MaskedBatchNorm(nn.Module):
    """BatchNorm1d over rows [M, F] with padded rows left out of the statistics.

    Train mode normalises with the biased variance of the real rows and updates the running
    statistics with their unbiased variance (PyTorch's rule); eval mode uses the running ones.
    Parameters "scale", "bias"; batch_stats "mean", "var".
    """

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        if train:
            w = mask.astype(x.dtype)[:, None]  # [M, 1]
            count = w.sum()
            mean = (w * x).sum(0) / jnp.maximum(count, 1.0)
            var = (w * (x - mean) ** 2).sum(0) / jnp.maximum(count, 1.0)
            if not self.is_initializing():
                ra_mean.value = (1 - BN_MOMENTUM) * ra_mean.value + BN_MOMENTUM * mean
                unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
                ra_var.value = (1 - BN_MOMENTUM) * ra_var.value + BN_MOMENTUM * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        return (x - mean) / jnp.sqrt(var + BN_EPSILON) * scale + bias


class MLPLayer(nn.Module):
    """Linear -> BatchNorm -> SiLU (the reference's `MLPLayer` in models/alignn.py)."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        x = _torch_linear(self.features, x.shape[-1], "linear")(x)
        return nn.silu(MaskedBatchNorm(name="norm")(x, mask, train=train))


class EdgeGatedGraphConv(nn.Module):
    """Edge-gated graph convolution with residuals (§1.6), messages summed at the receiver.

    m_k = A h_{s_k} + B h_{r_k} + C e_k;  σ = sigmoid(m)
    h'_i = h_i + SiLU(BN(U h_i + Σ_{k→i} σ_k ⊙ V h_{s_k} / (Σ_{k→i} σ_k + 1e-6)))
    e'_k = e_k + SiLU(BN(m_k))
    (A, B, C, U, V = src_gate, dst_gate, edge_gate, src_update, dst_update, the reference's names.)
    """

    features: int

    @nn.compact
    def __call__(self, h: jax.Array, e: jax.Array, senders: jax.Array, receivers: jax.Array,
                 node_mask: jax.Array, edge_mask: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        """Args: h [N, F] node features, e [E, F] edge features, senders/receivers [E] int32,
        node_mask [N], edge_mask [E] bool. Returns (h' [N, F], e' [E, F])."""
        num_nodes, fan_in = h.shape
        dense = functools.partial(_torch_linear, self.features, fan_in)
        m = gather(dense("src_gate")(h), senders) + gather(dense("dst_gate")(h), receivers) + dense("edge_gate")(e)
        sigma = jax.nn.sigmoid(m)
        num = jax.ops.segment_sum(sigma * gather(dense("dst_update")(h), senders), receivers, num_nodes)
        den = jax.ops.segment_sum(sigma, receivers, num_nodes)
        x = dense("src_update")(h) + num / (den + GATE_EPSILON)
        x = nn.silu(MaskedBatchNorm(name="bn_nodes")(x, node_mask, train=train))
        y = nn.silu(MaskedBatchNorm(name="bn_edges")(m, edge_mask, train=train))
        return h + x, e + y


class ALIGNNConv(nn.Module):
    """One ALIGNN layer (§1.7): bond graph first, then the line graph (the code's order)."""

    features: int

    @nn.compact
    def __call__(self, x, y, z, graphs: jraph.GraphsTuple, line_graph: jraph.GraphsTuple, masks, *,
                 train: bool):
        """x [N, F] atoms, y [E, F] bonds, z [T, F] triplets; masks (node [N], edge [E], triplet [T])."""
        node_mask, edge_mask, triplet_mask = masks
        x, m = EdgeGatedGraphConv(self.features, name="node_update")(
            x, y, graphs.senders, graphs.receivers, node_mask, edge_mask, train=train)
        y, z = EdgeGatedGraphConv(self.features, name="edge_update")(
            m, z, line_graph.senders, line_graph.receivers, edge_mask, triplet_mask, train=train)
        return x, y, z


class ALIGNN(nn.Module):
    """ALIGNN: `apply(variables, graphs, line_graph, train=...) -> predictions`.

    Returns [G] when output_features is 1, else [G, output_features] (padding graphs included;
    their values are meaningless). In train mode call with mutable=["batch_stats"]. Every layer's
    output is sown into "intermediates" (atom_embedding.x, edge_embedding.y, angle_embedding.z,
    alignn_layers_i.{x,y,z}, gcn_layers_i.{x,y}, readout; x atoms, y bonds, z triplets).
    """

    config: AlignnConfig = AlignnConfig()

    @nn.compact
    def __call__(self, graphs: jraph.GraphsTuple, line_graph: jraph.GraphsTuple, *, train: bool) -> jax.Array:
        cfg = self.config
        graphs, line_graph = jax.tree_util.tree_map(jnp.asarray, (graphs, line_graph))
        num_graphs = graphs.n_node.shape[0]
        node_mask = jraph.get_node_padding_mask(graphs)
        edge_mask = jraph.get_edge_padding_mask(graphs)
        triplet_mask = jraph.get_edge_padding_mask(line_graph)
        masks = (node_mask, edge_mask, triplet_mask)

        if "vectors" in graphs.edges:
            lengths = jnp.linalg.norm(graphs.edges["vectors"], axis=-1)
        else:
            lengths = graphs.edges["distances"]
        x = jnp.asarray(cgcnn_table())[graphs.nodes["atomic_numbers"]]
        x = MLPLayer(cfg.hidden_features, name="atom_embedding")(x, node_mask, train=train)
        y = rbf_expansion(lengths, 0.0, 8.0, cfg.edge_input_features)
        y = MLPLayer(cfg.embedding_features, name="edge_embedding_0")(y, edge_mask, train=train)
        y = MLPLayer(cfg.hidden_features, name="edge_embedding_1")(y, edge_mask, train=train)
        z = rbf_expansion(line_graph.edges["cosines"], -1.0, 1.0, cfg.triplet_input_features)
        z = MLPLayer(cfg.embedding_features, name="angle_embedding_0")(z, triplet_mask, train=train)
        z = MLPLayer(cfg.hidden_features, name="angle_embedding_1")(z, triplet_mask, train=train)
        for name, value in (("atom_embedding.x", x), ("edge_embedding.y", y), ("angle_embedding.z", z)):
            self.sow("intermediates", name, value)

        for i in range(cfg.alignn_layers):
            x, y, z = ALIGNNConv(cfg.hidden_features, name=f"alignn_layers_{i}")(
                x, y, z, graphs, line_graph, masks, train=train)
            for n, value in zip("xyz", (x, y, z)):
                self.sow("intermediates", f"alignn_layers_{i}.{n}", value)
        for i in range(cfg.gcn_layers):
            x, y = EdgeGatedGraphConv(cfg.hidden_features, name=f"gcn_layers_{i}")(
                x, y, graphs.senders, graphs.receivers, node_mask, edge_mask, train=train)
            for n, value in zip("xy", (x, y)):
                self.sow("intermediates", f"gcn_layers_{i}.{n}", value)

        graph_index = jnp.repeat(jnp.arange(num_graphs), graphs.n_node, total_repeat_length=x.shape[0])
        counts = jnp.maximum(graphs.n_node, 1).astype(x.dtype)[:, None]
        h = jax.ops.segment_sum(x, graph_index, num_graphs, indices_are_sorted=True) / counts  # [G, F]
        self.sow("intermediates", "readout", h)

        # link "log": the reference starts the bias at log(0.7 eV), "the average bandgap in dft_3d".
        bias_init = nn.initializers.constant(np.log(0.7)) if cfg.link == "log" else None
        out = _torch_linear(cfg.output_features, cfg.hidden_features, "fc", bias_init)(h)
        if cfg.link == "log":
            out = jnp.exp(out)
        elif cfg.link == "logit":
            out = jax.nn.sigmoid(out)
        return out[:, 0] if cfg.output_features == 1 else out


TRIPLETS = "triplets"  # the extra set of a `batching.Batch` holding the line graph (featurize.knn_line_graph)


def batch_line_graph(batch: Any) -> jraph.GraphsTuple:
    """The padded line graph of a `batching.Batch` whose extra set "triplets" holds the bond-angle
    triplets: one node per bond of ``batch.graphs`` (n_node = its n_edge), senders/receivers the
    triplet fields (batch-global bond indices), edges {"cosines"}, n_edge the rows per graph. The
    same arrays as `line_graph.pad_alignn_batch` (tests/test_batching.py)."""
    triplets = batch.extras[TRIPLETS]
    return jraph.GraphsTuple(nodes=None, edges={"cosines": triplets.fields["cosines"]},
                             senders=triplets.fields["senders"], receivers=triplets.fields["receivers"],
                             n_node=batch.graphs.n_edge,
                             n_edge=triplets.n_row, globals=None)


class AlignnNet(nn.Module):
    """`ALIGNN` behind the model registry's contract (models.py): ``apply(variables, batch,
    train=...) -> (predictions [G], None)`` on the trainer's `batching.Batch` (atom graph plus the
    "triplets" extra set); ALIGNN scores no atoms. In train mode call with mutable=["batch_stats"]."""

    config: AlignnConfig = AlignnConfig()

    @nn.compact
    def __call__(self, batch: Any, train: bool = False) -> tuple[jax.Array, None]:
        if self.config.output_features != 1:
            raise ValueError("AlignnNet: the trainer needs output_features = 1 (one target per run)")
        predictions = ALIGNN(self.config, name="alignn")(batch.graphs, batch_line_graph(batch), train=train)
        return predictions, None


def num_parameters(params) -> int:
    """Number of trainable scalars in a parameter tree."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
