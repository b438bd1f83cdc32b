"""The LSTM neighbour-list band-gap model (zoo-reference.md §3; seed 003) in Flax Linen.

Source text (§3.2), with the sizes it leaves open chosen here:

1. "the atom and its 19 nearest atoms, a list of 20 (element, distance) pairs, sorted by distance":
   `scannet_jax.neighbor_lists` (periodic images included, documented tie rule).
2. "each element is mapped to a learned vector, multiplied by the inverse of its distance":
   `v_j = E[Z_j] / d_j`. Embedding size UNSPECIFIED: `embedding_dim` = 32. Elements "1–85"
   in the source; here rows 0..`max_atomic_number` (94, the project's range; row 0 is padding and
   never read). The centre atom has d = 0, its factor is UNSPECIFIED: `centre_factor` = 1, i.e. the
   centre contributes its plain embedding (as if at 1 Å; first-shell factors are 1/d ≈ 0.3–0.5 Å⁻¹
   at 2–3 Å, and ≈ 1 Å⁻¹ for C–H bonds). Distances in Å.
3. "an LSTM over the list gives one vector per atom": one `nn.LSTMCell` layer, the last hidden
   state (presumed in the source). Hidden size UNSPECIFIED: `atom_features` = 64.
4. "an LSTM over the atoms' vectors, ordered by fractional x, y, z ascending": one `nn.LSTMCell`
   layer, last hidden state; `crystal_features` = 64 (UNSPECIFIED). Variable atom counts
   (UNSPECIFIED in the source): the structures' atom sequences are concatenated and the LSTM's
   carry is reset at the start of each, its output read at each sequence's last atom, so
   padding never reaches the result.
5. "a fully connected layer gives the result": sizes and activations UNSPECIFIED:
   `head_features` = (64,) with ReLU, then a linear output. The output is in the units the
   trainer standardises the target to, like the project's other models.

**Layout.** The module reads flat arrays, never [structures, atoms] tensors: per atom its
distance-sorted neighbour list, [N, K] (an LSTM reads an ordered sequence, not a set of edges, so
the first LSTM runs over the N lists of K + 1 places in parallel), and the second LSTM runs once
over the concatenated atom sequences of the batch, `sequence` [P] (atom index at each place),
its carry reset to zero where a new sequence starts (`sequence_lengths`), so no structure sees
another's atoms and no Python loop over atoms or structures is needed. It is therefore P
sequential steps per batch on any device (the price of not padding every structure to the largest
one). Neighbour places beyond a molecule's atom count carry Z = 0 and end the first LSTM's sequence.

`LstmNet` (the registered network "lstm", models.py) builds these arrays inside jit from the
trainer's padded `batching.Batch` of a ``neighbour_list`` store (`datasets.featurize`): the
neighbour lists from the edges (receivers = centre atom, sorted by receiver then rank), the atom
sequences from the extra set ``atom_orders`` (the fractional-coordinate order of each stored
setting of the crystal). `neighbor_lists.pad_sequences` makes the same arrays on the host.

The source is a text description with no code, so every size above is a choice, not a
reproduction. The model is invariant to rotation and to the order in which the atoms are given,
but not to the crystal's setting (the atom order of step 4 depends on it), as the source notes,
nor to the choice of origin. The source's augmentation (§3.3: every distinct setting made by
swapping two lattice axes is a training sample) is `LstmConfig.augment` here: one stored setting
drawn per structure and step (a departure: each structure weighs the same, however many distinct
settings it has); `LstmConfig.average_settings` is the source's test-time average over them.
Both read the settings the store holds: ``config.data.featurizer.settings = "swaps"`` (the source's
xy, yz and xz swaps) or ``"permutations"`` (all six); with ``"original"`` both are no-ops.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from scannet_jax.neighbor_lists import ATOM_ORDERS, NUM_NEIGHBOURS, NUM_SETTINGS_MAX

MAX_ATOMIC_NUMBER = 94


class _ResettingLSTMCell(nn.RNNCellBase):
    """`nn.LSTMCell` whose carry is zeroed (a fresh sequence) where the input's last channel is 1.

    Inputs [..., D + 1]: D features and the start flag. Parameters are those of the inner cell.
    """

    features: int

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array], inputs: jax.Array
                 ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        start = inputs[..., -1:] > 0
        carry = jax.tree.map(lambda c: jnp.where(start, jnp.zeros_like(c), c), carry)
        return nn.LSTMCell(self.features, name="cell")(carry, inputs[..., :-1])

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        zeros = jnp.zeros((*input_shape[:-1], self.features), jnp.float32)
        return zeros, zeros

    @property
    def num_feature_axes(self) -> int:
        return 1


def _zero_carry(inputs: jax.Array, features: int) -> tuple[jax.Array, jax.Array]:
    """The LSTM's zero (c, h) [B, features] for inputs [B, T, D], made from the inputs: inside the
    trainer's shard_map a constant carry would not be device-varying like the scan's output carry,
    and lax.scan requires the two types to agree."""
    zeros = jnp.broadcast_to(jnp.zeros_like(inputs[:, 0, :1], jnp.float32), (inputs.shape[0], features))
    return zeros, zeros


class NeighbourListLSTM(nn.Module):
    """Per-atom LSTM over distance-sorted neighbours, then an LSTM over each atom sequence, then a dense head.

    Attributes:
      max_atomic_number: largest Z; the embedding has rows 0..max_atomic_number (0 = padding).
      embedding_dim: D_E, size of the element vectors.
      atom_features: H_1, hidden size of the neighbour-list LSTM (the atom vector).
      crystal_features: H_2, hidden size of the atom-sequence LSTM (the structure vector).
      head_features: widths of the hidden dense layers (ReLU) before the scalar output.
      centre_factor: the factor replacing 1/d for the centre atom (d = 0), Å⁻¹.
    """

    max_atomic_number: int = MAX_ATOMIC_NUMBER
    embedding_dim: int = 32
    atom_features: int = 64
    crystal_features: int = 64
    head_features: Sequence[int] = (64,)
    centre_factor: float = 1.0

    @nn.compact
    def __call__(self, atomic_numbers: jax.Array, neighbour_numbers: jax.Array,
                 neighbour_distances: jax.Array, sequence: jax.Array, sequence_lengths: jax.Array) -> jax.Array:
        """Predicts one value per atom sequence.

        Args:
          atomic_numbers: [N] int, Z of each atom; 0 on padding.
          neighbour_numbers: [N, K] int, Z of the K nearest neighbours of each atom, distance-sorted;
            0 on fill (places after the last neighbour) and padding.
          neighbour_distances: [N, K] float, Å (> 0 where the Z is non-zero; not read elsewhere).
          sequence: [P] int, the atom (index into N) at each place; the S sequences lie one after the
            other from place 0, each in the source's order (fractional x, y, z ascending); places
            after the last sequence are padding and never read.
          sequence_lengths: [S] int, atoms of each sequence (sum <= P; 0 for an empty one).

        Returns:
          [S] float32 predictions; 0 for empty sequences.
        """
        n, k = neighbour_numbers.shape
        valid = neighbour_numbers > 0  # [N, K]
        factors = jnp.where(valid, 1.0 / jnp.where(valid, neighbour_distances, 1.0), 0.0)
        factors = jnp.concatenate([jnp.full((n, 1), self.centre_factor, factors.dtype), factors], -1)
        numbers = jnp.concatenate([atomic_numbers[:, None], neighbour_numbers], -1)  # [N, K+1]
        vectors = nn.Embed(self.max_atomic_number + 1, self.embedding_dim, name="embedding")(numbers)
        vectors = vectors * factors[..., None].astype(vectors.dtype)  # [N, K+1, D_E]
        (_, atom_vectors), _ = nn.RNN(nn.LSTMCell(self.atom_features, name="atom_lstm"), return_carry=True)(
            vectors, initial_carry=_zero_carry(vectors, self.atom_features),
            seq_lengths=1 + valid.sum(-1))  # [N, H_1]; centre + its neighbours

        p = sequence.shape[0]
        starts = jnp.cumsum(sequence_lengths) - sequence_lengths  # [S]
        is_start = jnp.zeros(p, jnp.float32).at[jnp.where(sequence_lengths > 0, starts, p)].set(1.0, mode="drop")
        places = jnp.concatenate([atom_vectors[sequence], is_start[:, None]], -1)[None]  # [1, P, H_1 + 1]
        outputs = nn.RNN(_ResettingLSTMCell(self.crystal_features, name="crystal_lstm"))(
            places, initial_carry=_zero_carry(places, self.crystal_features))[0]  # [P, H_2]
        x = outputs[jnp.clip(starts + sequence_lengths - 1, 0, p - 1)]  # [S, H_2], each sequence's last atom
        for i, width in enumerate(self.head_features):
            x = nn.relu(nn.Dense(width, name=f"head_{i}")(x))
        y = nn.Dense(1, name="output")(x)[:, 0]
        return jnp.where(sequence_lengths > 0, y, 0.0)


@dataclasses.dataclass(frozen=True)
class LstmConfig:
    """Hyper-parameters of `LstmNet`: the sizes of `NeighbourListLSTM` (module docstring) and how the
    stored settings of a crystal are used.

    Attributes:
      num_neighbours: K, neighbour places per atom; must equal the graph builder's (edges of a
        receiver beyond the K-th are not read).
      augment: in training, read one stored setting per structure and step, drawn uniformly with
        the "dropout" key (§3.3's augmentation); otherwise the original setting (stored first).
      average_settings: in inference, predict the mean over every stored setting (§3.4's
        test-time average); otherwise the original setting.
    """

    max_atomic_number: int = MAX_ATOMIC_NUMBER
    embedding_dim: int = 32
    atom_features: int = 64
    crystal_features: int = 64
    head_features: tuple[int, ...] = (64,)
    centre_factor: float = 1.0
    num_neighbours: int = NUM_NEIGHBOURS
    augment: bool = False
    average_settings: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_features", tuple(int(w) for w in self.head_features))
        if self.num_neighbours < 1 or self.max_atomic_number < 1:
            raise ValueError(f"LstmConfig: need num_neighbours >= 1 and max_atomic_number >= 1, got "
                             f"{self.num_neighbours}, {self.max_atomic_number}")


def neighbour_arrays(graphs: jraph.GraphsTuple, num_neighbours: int) -> tuple[jax.Array, jax.Array]:
    """Each atom's neighbour list as dense rows, from edges sorted by receiver then rank.

    The rank of edge e is its offset from its receiver's first edge (segment_min over receivers), so
    the lists need no stored rank; padding edges and ranks >= K are dropped from the scatter.

    Args:
      graphs: padded GraphsTuple (`batching.pad_batch` layout) of a ``neighbour_list`` store.
      num_neighbours: K.

    Returns:
      neighbour Z [N, K] int32 (0 on fill and padding) and distances [N, K] float32 (Å; 0 there).
    """
    z = graphs.nodes["atomic_numbers"]
    n, e = z.shape[0], graphs.senders.shape[0]
    edge_ids = jnp.arange(e)
    first = jax.ops.segment_min(edge_ids, graphs.receivers, num_segments=n, indices_are_sorted=True)  # [N]
    rank = edge_ids - first[graphs.receivers]  # [E]
    keep = jraph.get_edge_padding_mask(graphs) & (rank < num_neighbours)
    rows = jnp.where(keep, graphs.receivers, n)  # row n is out of range: dropped
    numbers = jnp.zeros((n, num_neighbours), jnp.int32).at[rows, rank].set(
        z[graphs.senders].astype(jnp.int32), mode="drop")
    distances = jnp.zeros((n, num_neighbours), jnp.float32).at[rows, rank].set(
        graphs.edges["distances"].astype(jnp.float32), mode="drop")
    return numbers, distances


class LstmNet(nn.Module):
    """`NeighbourListLSTM` behind the model registry's contract (models.py): ``apply(variables,
    batch, train=..., rngs={"dropout": key}) -> (predictions [G], None)`` on the trainer's
    `batching.Batch` of a ``neighbour_list`` store (edges: the neighbour lists; extra set
    ``atom_orders``: field ``atoms`` [R] (batch-global atom index), per structure the atom order of
    each stored setting one after the other, the original setting first, ``n_row`` = settings x
    atoms). Padding graphs predict 0; the model scores no atoms."""

    config: LstmConfig = LstmConfig()

    @nn.compact
    def __call__(self, batch: Any, train: bool = False) -> tuple[jax.Array, None]:
        cfg = self.config
        batch = jax.tree.map(jnp.asarray, batch)  # jraph's masks index n_node with traced values
        graphs = batch.graphs
        orders = batch.extras[ATOM_ORDERS]
        atoms = orders.fields["atoms"]  # [R]
        n, g = graphs.nodes["atomic_numbers"].shape[0], graphs.n_node.shape[0]
        real = jraph.get_graph_padding_mask(graphs)  # [G]
        n_node = jnp.where(real, graphs.n_node, 0)  # [G]
        num_settings = jnp.where(real, orders.n_row // jnp.maximum(graphs.n_node, 1), 0)  # [G]
        row_start = jnp.cumsum(orders.n_row) - orders.n_row  # [G]
        lstm = NeighbourListLSTM(cfg.max_atomic_number, cfg.embedding_dim, cfg.atom_features,
                                 cfg.crystal_features, cfg.head_features, cfg.centre_factor, name="lstm")
        numbers, distances = neighbour_arrays(graphs, cfg.num_neighbours)
        z = graphs.nodes["atomic_numbers"]
        if cfg.average_settings and not train:
            # Every stored setting is a sequence: S = G * NUM_SETTINGS_MAX, the unused ones empty.
            lengths = jnp.where(jnp.arange(NUM_SETTINGS_MAX) < num_settings[:, None], n_node[:, None], 0)
            y = lstm(z, numbers, distances, atoms, lengths.reshape(-1)).reshape(g, NUM_SETTINGS_MAX)
            return y.sum(1) / jnp.maximum(num_settings, 1), None
        setting = jnp.zeros(g, jnp.int32)
        if cfg.augment and train:
            draw = jax.random.uniform(self.make_rng("dropout"), (g,))
            setting = jnp.minimum(jnp.floor(draw * num_settings).astype(jnp.int32), jnp.maximum(num_settings - 1, 0))
        # One sequence per graph, laid out like the nodes: place p of graph g is row
        # row_start[g] + setting[g] * n_node[g] + (p - first node of g).
        node_graph = jnp.repeat(jnp.arange(g), graphs.n_node, total_repeat_length=n)  # [N]
        local = jnp.arange(n) - (jnp.cumsum(graphs.n_node) - graphs.n_node)[node_graph]
        rows = row_start[node_graph] + setting[node_graph] * graphs.n_node[node_graph] + local
        sequence = jnp.take(atoms, rows, mode="clip")  # [N]; padding places clipped, never read
        return lstm(z, numbers, distances, sequence, n_node), None
