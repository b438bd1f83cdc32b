"""MEGNet blocks and AMDNet, the atom–motif dual graph network (Flax Linen; zoo-reference.md §2.6).

Graphs come in the jraph `pad_with_graphs` layout (`batching.pad_batch`): ``receivers`` = centre
i, the node an edge is aggregated onto (the released code's ``index1``), ``senders`` = neighbour j
(``index2``). Every aggregation is a masked segment operation over a static number of segments;
padding nodes, edges and graphs never reach a real one.

The architecture follows the released AMDNet code (`hierarch_model.py::megnet_block`,
`Hierarch_MEGNetModel`, `layers/graph/megnet.py`, `layers/readout/set2set.py`):

* `MEGNetLayer`: e' = φ_e([v_i; v_j; e; u]), v' = φ_v([mean_{edges into i} e'; v; u]),
  u' = φ_u([mean over the graph's edges of e'; mean over its nodes of v'; u]); each φ is
  Dense → act → Dense → act → Dense with a linear last layer (units 64, 64, 32).
* `Set2Set`: with the released code's quirks kept — the LSTM has no input (the gates see only
  q* = [h; r] of the previous step), its cell state is never carried over (so c_t = i ⊙ tanh(z_c)
  every step and the forget gate has no effect, though its weights exist), the gates use Keras'
  hard sigmoid clip(0.2 x + 0.5, 0, 1), the recurrent kernel is orthogonal-initialised and the
  forget bias starts at 1. The attention softmax is max-shifted here (the released code
  exponentiates unshifted scores; equal values, no overflow).
* `MEGNetBranch` (``megnet_block``): two-layer feed-forward (64, 32) on nodes, edges and state;
  three blocks (a feed-forward again before blocks 2 and 3), each a `MEGNetLayer` plus a skip
  connection; Set2Set (3 steps, 16 hidden) over nodes and over edges; concat with the state;
  Dense 32 → Dense 16 → Dense(num_outputs), all with the activation (ReLU in AMDNet) unless
  ``output_activation`` is False.
* `MEGNet`: a branch on the atom graph (Z → Embedding(95, 16), distance → 100 Gaussians on
  [0, 5] Å of width 0.5) with a linear Dense(1) output, as the MEGNet library's regression model.
* `AMDNet`: an atom branch and a motif branch (61-d motif fingerprints, no embedding; centre
  distances → 100 Gaussians on [0, 11] Å), each ending in Dense(16, ReLU), concatenated into
  Dense(32, ReLU) → Dense(1, linear).

`MegnetNet` and `AmdnetNet` are the registered networks "megnet" and "amdnet" (models.py): they
take the trainer's padded batch of a ``radius`` store (a GraphsTuple) or of a ``motif_dual`` store
(a `batching.Batch` whose extra sets ``motifs`` and ``motif_edges`` hold the motif graph,
`datasets.featurize.MotifDualGraph`; `batch_motif_graphs`) and return ``(predictions [G], None)``.

No dropout and no L2 (the AMDNet recipe); ``train`` is accepted for the common interface and
changes nothing. Band gaps: the reference clips predictions at 0 only when it reports the test
MAE (`evaluate_AMDnet.py`: ``p = max(0, p)``), not in the training loss or the validation MAE
that picks the best epoch; the recipe's ``config.prediction_floor = 0`` is that step (the test
figures of `train`, and `predict.Predictor`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from scannet_jax.layers import gather, gaussian_expansion, keras_dense, masked_segment_softmax
from scannet_jax.models import keras_embedding_init

Activation = Callable[[jax.Array], jax.Array]

STATE_DIM = 2  # AMDNet's global state is [[0, 0]]
NUM_SPECIES = 95  # Embedding(95, 16): Z = 1..94, 0 on padding
ATOM_CUTOFF = 5.0  # Å, Gaussian range of the atom graph
MOTIF_CUTOFF = 11.0  # Å, Gaussian range of the motif graph
NUM_GAUSSIANS = 100
GAUSSIAN_WIDTH = 0.5


def softplus2(x: jax.Array) -> jax.Array:
    """MEGNet's default activation, softplus(x) - log 2 (zero at zero)."""
    return jax.nn.softplus(x) - jnp.log(2.0).astype(x.dtype)


ACTIVATIONS: dict[str, Activation] = {"relu": jax.nn.relu, "softplus2": softplus2}


def keras_hard_sigmoid(x: jax.Array) -> jax.Array:
    """Keras 2.4 / TF 2.3 ``hard_sigmoid``: clip(0.2 x + 0.5, 0, 1) (not jax.nn.hard_sigmoid)."""
    return jnp.clip(0.2 * x + 0.5, 0.0, 1.0)


def _segments(graphs: jraph.GraphsTuple) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Node→graph [N] and edge→graph [E] indices and the padding masks (node, edge, graph)."""
    graphs = graphs._replace(n_node=jnp.asarray(graphs.n_node), n_edge=jnp.asarray(graphs.n_edge))
    num_graphs = graphs.n_node.shape[0]
    num_nodes = jax.tree.leaves(graphs.nodes)[0].shape[0]
    num_edges = graphs.senders.shape[0]
    node_graph = jnp.repeat(jnp.arange(num_graphs), graphs.n_node, total_repeat_length=num_nodes)
    edge_graph = jnp.repeat(jnp.arange(num_graphs), graphs.n_edge, total_repeat_length=num_edges)
    return (node_graph, edge_graph, jraph.get_node_padding_mask(graphs),
            jraph.get_edge_padding_mask(graphs), jraph.get_graph_padding_mask(graphs))


def masked_segment_mean(x: jax.Array, segment_ids: jax.Array, mask: jax.Array,
                        num_segments: int) -> jax.Array:
    """Mean of the rows of ``x`` [K, D] with ``mask`` [K] True within each segment; 0 for none.

    The released code's ``tf.math.segment_mean``; a segment with no real row gives 0.
    """
    weights = mask.astype(x.dtype)
    total = jax.ops.segment_sum(x * weights[:, None], segment_ids, num_segments)
    count = jax.ops.segment_sum(weights, segment_ids, num_segments)
    return total / jnp.maximum(count, 1.0)[:, None]


class MLP(nn.Module):
    """Dense layers with the activation after each; the last layer linear if ``linear_output``."""

    units: Sequence[int]
    activation: Activation
    linear_output: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for k, features in enumerate(self.units):
            x = keras_dense(features, name=f"dense_{k}")(x)
            if k < len(self.units) - 1 or not self.linear_output:
                x = self.activation(x)
        return x


class MEGNetLayer(nn.Module):
    """One MEGNet graph-network update of edges, nodes and state (§2.6).

    Attributes:
      edge_units, node_units, state_units: widths of φ_e, φ_v, φ_u (last layer linear).
      activation: hidden activation of the three MLPs.
    """

    edge_units: Sequence[int] = (64, 64, 32)
    node_units: Sequence[int] = (64, 64, 32)
    state_units: Sequence[int] = (64, 64, 32)
    activation: Activation = jax.nn.relu

    @nn.compact
    def __call__(self, nodes: jax.Array, edges: jax.Array, state: jax.Array,
                 graphs: jraph.GraphsTuple) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Updates (nodes [N, Dv], edges [E, De], state [G, Du]) on the topology of ``graphs``.

        Returns:
          (nodes [N, node_units[-1]], edges [E, edge_units[-1]], state [G, state_units[-1]]).
        """
        node_graph, edge_graph, node_mask, edge_mask, _ = _segments(graphs)
        num_nodes, num_graphs = nodes.shape[0], state.shape[0]
        edge_in = jnp.concatenate([gather(nodes, graphs.receivers), gather(nodes, graphs.senders),
                                   edges, gather(state, edge_graph)], axis=-1)
        edges = MLP(self.edge_units, self.activation, linear_output=True, name="phi_e")(edge_in)
        to_node = masked_segment_mean(edges, graphs.receivers, edge_mask, num_nodes)
        node_in = jnp.concatenate([to_node, nodes, gather(state, node_graph)], axis=-1)
        nodes = MLP(self.node_units, self.activation, linear_output=True, name="phi_v")(node_in)
        state_in = jnp.concatenate([
            masked_segment_mean(edges, edge_graph, edge_mask, num_graphs),
            masked_segment_mean(nodes, node_graph, node_mask, num_graphs), state], axis=-1)
        state = MLP(self.state_units, self.activation, linear_output=True, name="phi_u")(state_in)
        return nodes, edges, state


class Set2Set(nn.Module):
    """Set2Set readout with the released MEGNet/AMDNet quirks (module docstring).

    Attributes:
      num_hidden: width n of the memory m_i and of h; the output is 2n.
      num_steps: processing steps T.
    """

    num_hidden: int = 16
    num_steps: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array, mask: jax.Array,
                 num_segments: int) -> jax.Array:
        """Reads out the rows of ``x`` [K, D] (nodes or edges) per segment (graph).

        Args:
          x: [K, D] features.
          segment_ids: [K] graph of each row.
          mask: [K] bool, real rows.
          num_segments: static number of graphs G.

        Returns:
          [G, 2 n] q* = [h; r] of the last step (0-attention graphs get r = 0).
        """
        n = self.num_hidden
        memory = keras_dense(n, name="memory")(x)  # [K, n]
        kernel = self.param("recurrent_kernel", nn.initializers.orthogonal(), (2 * n, 4 * n),
                            jnp.float32)
        bias = self.param("recurrent_bias", lambda _, shape: jnp.concatenate([
            jnp.zeros(n), jnp.ones(n), jnp.zeros(2 * n)]).astype(jnp.float32), (4 * n,))

        def step(q_star: jax.Array) -> jax.Array:  # [G, 2n] -> [G, 2n]
            z = q_star @ kernel + bias  # [G, 4n]: input, forget, cell, output gates
            cell = keras_hard_sigmoid(z[:, :n]) * jnp.tanh(z[:, 2 * n:3 * n])  # c never carried
            h = keras_hard_sigmoid(z[:, 3 * n:]) * jnp.tanh(cell)
            scores = jnp.sum(memory * gather(h, segment_ids), axis=-1)  # [K]
            attention = masked_segment_softmax(scores, segment_ids, mask, num_segments)
            readout = jax.ops.segment_sum(attention[:, None] * memory, segment_ids, num_segments)
            return jnp.concatenate([h, readout], axis=-1)

        q_star = jnp.zeros((num_segments, 2 * n), memory.dtype)
        for _ in range(self.num_steps):  # unrolled: T is small (a loop carry would need manual axes under shard_map)
            q_star = step(q_star)
        return q_star


class MEGNetBranch(nn.Module):
    """The released ``megnet_block``: node/edge/state features of one graph type → [G, num_outputs].

    Attributes:
      num_outputs: width of the last Dense layer.
      output_activation: apply the activation to that layer (True in AMDNet's branches).
      num_blocks: MEGNet blocks (3).
      n1, n2, n3: hidden widths (64, 32, 16): feed-forward (n1, n2), MEGNetLayer (n1, n1, n2),
        Set2Set n3 hidden, head Dense n2 → Dense n3.
      num_steps: Set2Set steps (3).
      activation: "relu" (AMDNet) or "softplus2" (the MEGNet library's default).
    """

    num_outputs: int = 16
    output_activation: bool = True
    num_blocks: int = 3
    n1: int = 64
    n2: int = 32
    n3: int = 16
    num_steps: int = 3
    activation: str = "relu"

    @nn.compact
    def __call__(self, nodes: jax.Array, edges: jax.Array, state: jax.Array,
                 graphs: jraph.GraphsTuple) -> jax.Array:
        """Args: nodes [N, Dv], edges [E, De], state [G, Du] float32; ``graphs`` the topology.

        Returns:
          [G, num_outputs] graph embeddings (finite but meaningless on padding graphs).
        """
        act = ACTIVATIONS[self.activation]
        node_graph, edge_graph, node_mask, edge_mask, _ = _segments(graphs)
        num_graphs = state.shape[0]
        feed_forward = (self.n1, self.n2)
        nodes = MLP(feed_forward, act, name="ff_nodes")(nodes)
        edges = MLP(feed_forward, act, name="ff_edges")(edges)
        state = MLP(feed_forward, act, name="ff_state")(state)
        for block in range(self.num_blocks):
            v, e, u = nodes, edges, state
            if block > 0:
                v = MLP(feed_forward, act, name=f"block_{block}_ff_nodes")(v)
                e = MLP(feed_forward, act, name=f"block_{block}_ff_edges")(e)
                u = MLP(feed_forward, act, name=f"block_{block}_ff_state")(u)
            units = (self.n1, self.n1, self.n2)
            v, e, u = MEGNetLayer(units, units, units, act, name=f"block_{block}_megnet")(
                v, e, u, graphs)
            nodes, edges, state = nodes + v, edges + e, state + u
        node_vec = Set2Set(self.n3, self.num_steps, name="set2set_nodes")(
            nodes, node_graph, node_mask, num_graphs)
        edge_vec = Set2Set(self.n3, self.num_steps, name="set2set_edges")(
            edges, edge_graph, edge_mask, num_graphs)
        x = jnp.concatenate([node_vec, edge_vec, state], axis=-1)
        x = MLP((self.n2, self.n3), act, name="head")(x)
        x = keras_dense(self.num_outputs, name="output")(x)
        return act(x) if self.output_activation else x


def _state(graphs: jraph.GraphsTuple) -> jax.Array:
    """globals["state"] [G, 2] if the graphs carry one, else AMDNet's zeros."""
    num_graphs = graphs.n_node.shape[0]
    if isinstance(graphs.globals, dict) and "state" in graphs.globals:
        return jnp.asarray(graphs.globals["state"], jnp.float32).reshape(num_graphs, -1)
    return jnp.zeros((num_graphs, STATE_DIM), jnp.float32)


def _distance_basis(graphs: jraph.GraphsTuple, cutoff: float, num_gaussians: int) -> jax.Array:
    centers = np.linspace(0.0, cutoff, num_gaussians)
    return gaussian_expansion(graphs.edges["distances"], centers, GAUSSIAN_WIDTH)  # [E, K]


class AtomEmbedding(nn.Module):
    """Z [N] int → [N, dim], Keras-initialised Embedding(num_species, dim)."""

    num_species: int = NUM_SPECIES
    dim: int = 16

    @nn.compact
    def __call__(self, numbers: jax.Array) -> jax.Array:
        return nn.Embed(self.num_species, self.dim, embedding_init=keras_embedding_init,
                        name="embedding")(numbers)


class MEGNet(nn.Module):
    """MEGNet on the atom graph: ``MEGNet()(graphs, train=...) -> predictions [G]``.

    ``graphs``: nodes["atomic_numbers"] int32 [N] (0 on padding), edges["distances"] [E] Å (the
    `radius_graph` 5 Å graph), optional globals["state"] [G, 2] (zeros otherwise). Predictions are
    0 on padding graphs.
    """

    num_species: int = NUM_SPECIES
    embedding_dim: int = 16
    cutoff: float = ATOM_CUTOFF
    num_gaussians: int = NUM_GAUSSIANS
    num_blocks: int = 3
    n1: int = 64
    n2: int = 32
    n3: int = 16
    num_steps: int = 3
    activation: str = "relu"

    @nn.compact
    def __call__(self, graphs: jraph.GraphsTuple, *, train: bool = False) -> jax.Array:
        del train  # no dropout in the recipe
        nodes = AtomEmbedding(self.num_species, self.embedding_dim, name="atoms")(
            graphs.nodes["atomic_numbers"])
        edges = _distance_basis(graphs, self.cutoff, self.num_gaussians)
        y = MEGNetBranch(1, False, self.num_blocks, self.n1, self.n2, self.n3, self.num_steps,
                         self.activation, name="branch")(nodes, edges, _state(graphs), graphs)
        return jnp.where(_segments(graphs)[-1], y[:, 0], 0.0)


class AMDNet(nn.Module):
    """Atom–motif dual graph network: ``AMDNet()(graphs, motif_graphs, train=...) -> [G]``.

    ``graphs``: the atom graph as for `MEGNet`. ``motif_graphs``: nodes["features"] [M, F] float
    (61-d CrystalNN fingerprints, `motifs.MotifGraph.features`), edges["distances"] [E_m] Å between
    motif centres, optional globals["state"]; the same number of graph slots G, graph g of both
    being the same structure. Predictions are 0 on padding graphs.
    """

    num_species: int = NUM_SPECIES
    embedding_dim: int = 16
    atom_cutoff: float = ATOM_CUTOFF
    motif_cutoff: float = MOTIF_CUTOFF
    num_gaussians_atom: int = NUM_GAUSSIANS
    num_gaussians_motif: int = NUM_GAUSSIANS
    num_blocks: int = 3
    n1: int = 64
    n2: int = 32
    n3: int = 16
    num_steps: int = 3
    num_output_embedding: int = 16
    num_last_layer: int = 32
    activation: str = "relu"

    @nn.compact
    def __call__(self, graphs: jraph.GraphsTuple, motif_graphs: jraph.GraphsTuple, *,
                 train: bool = False) -> jax.Array:
        del train  # no dropout in the recipe
        if graphs.n_node.shape != motif_graphs.n_node.shape:
            raise ValueError(f"atom and motif batches differ in graph slots: "
                             f"{graphs.n_node.shape[0]} vs {motif_graphs.n_node.shape[0]}")
        act = ACTIVATIONS[self.activation]

        def branch(name: str) -> MEGNetBranch:
            return MEGNetBranch(self.num_output_embedding, True, self.num_blocks, self.n1, self.n2,
                                self.n3, self.num_steps, self.activation, name=name)

        atom_nodes = AtomEmbedding(self.num_species, self.embedding_dim, name="atoms")(
            graphs.nodes["atomic_numbers"])
        atom_vec = branch("atom_branch")(
            atom_nodes, _distance_basis(graphs, self.atom_cutoff, self.num_gaussians_atom),
            _state(graphs), graphs)
        motif_vec = branch("motif_branch")(
            jnp.asarray(motif_graphs.nodes["features"], jnp.float32),
            _distance_basis(motif_graphs, self.motif_cutoff, self.num_gaussians_motif),
            _state(motif_graphs), motif_graphs)
        x = act(keras_dense(self.num_last_layer, name="last")(
            jnp.concatenate([atom_vec, motif_vec], axis=-1)))
        y = keras_dense(1, name="output")(x)[:, 0]
        return jnp.where(_segments(graphs)[-1], y, 0.0)


def batch_motif_graphs(batch: Any) -> jraph.GraphsTuple:
    """The motif graphs of a padded ``motif_dual`` `batching.Batch`, in the `pad_batch` layout.

    Nodes are the rows of the extra set ``motifs`` (``features`` [M, 61]), edges those of
    ``motif_edges`` (``receivers`` / ``senders`` batch-global motif rows, ``distances`` [E_m] Å),
    ``n_node`` / ``n_edge`` their ``n_row`` [G]. Graph g is structure g of ``batch.graphs``; the
    padding graph holds every padding row and has at least one motif row (``motif_edges`` refers
    to ``motifs``, so `batching.pad_batch` keeps one), as jraph's padding masks need.
    """
    motifs, edges = batch.extras["motifs"], batch.extras["motif_edges"]
    return jraph.GraphsTuple(nodes={"features": motifs.fields["features"]},
                             edges={"distances": edges.fields["distances"]},
                             senders=edges.fields["senders"], receivers=edges.fields["receivers"],
                             n_node=motifs.n_row, n_edge=edges.n_row, globals=None)


class MegnetNet(nn.Module):
    """`MEGNet` behind the model registry's contract (models.py): ``apply(variables, graphs,
    train=...) -> (predictions [G], None)`` on the trainer's padded GraphsTuple of a ``radius``
    store; padding graphs predict 0, no atom scores."""

    network: MEGNet

    @nn.compact
    def __call__(self, graphs: jraph.GraphsTuple, train: bool = False) -> tuple[jax.Array, None]:
        return self.network(jax.tree.map(jnp.asarray, graphs), train=train), None


class AmdnetNet(nn.Module):
    """`AMDNet` behind the model registry's contract (models.py): ``apply(variables, batch,
    train=...) -> (predictions [G], None)`` on the trainer's padded `batching.Batch` of a
    ``motif_dual`` store (atom graph ``batch.graphs``, motif graph `batch_motif_graphs`); padding
    graphs predict 0, no atom scores."""

    network: AMDNet

    @nn.compact
    def __call__(self, batch: Any, train: bool = False) -> tuple[jax.Array, None]:
        batch = jax.tree.map(jnp.asarray, batch)
        return self.network(batch.graphs, batch_motif_graphs(batch), train=train), None
