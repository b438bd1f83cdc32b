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
   (UNSPECIFIED in the source): atoms are padded at the end of each structure and the LSTM stops
   at the last real atom (`seq_lengths`), so padding never reaches the result.
5. "a fully connected layer gives the result": sizes and activations UNSPECIFIED:
   `head_features` = (64,) with ReLU, then a linear output. The output is in the units the
   trainer standardises the target to, like the project's other models.

The input is a dense [G, A, 20] sequence per atom: that IS this model (an LSTM reads an ordered
sequence, not a set of edges), so unlike the graph models it does not use segment ops; the
sequence runs over the 19 neighbours of each of the A (padded) atoms, never over atom pairs.
Neighbour places beyond a molecule's atom count carry Z = 0 and end the first LSTM's sequence.

The source is a text description with no code, so every size above is a choice, not a
reproduction. The model is invariant to rotation and to the order in which the atoms are given,
but not to the crystal's setting (the atom order of step 4 depends on it), as the source notes,
nor to the choice of origin; see `neighbor_lists.equivalent_settings` for the augmentation and
`neighbor_lists.average_over_settings` for test-time averaging. Batches come from
`neighbor_lists.pad_sequences`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MAX_ATOMIC_NUMBER = 94


class NeighbourListLSTM(nn.Module):
    """Per-atom LSTM over distance-sorted neighbours, then an LSTM over the atoms, then a dense head.

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
                 neighbour_distances: jax.Array, atom_mask: jax.Array) -> jax.Array:
        """Predicts one value per structure.

        Args:
          atomic_numbers: [G, A] int, Z of each atom in the source's order (fractional x, y, z
            ascending), real atoms first; 0 on padding.
          neighbour_numbers: [G, A, K] int, Z of the K nearest neighbours, distance-sorted; 0 on
            fill (places after the last neighbour) and padding.
          neighbour_distances: [G, A, K] float, Å (> 0 where the Z is non-zero).
          atom_mask: [G, A] bool, True on real atoms (a prefix of each row).

        Returns:
          [G] float32 predictions; 0 for structures without atoms (padding graphs).
        """
        g, a, k = neighbour_numbers.shape
        valid = neighbour_numbers > 0  # [G, A, K]
        factors = jnp.where(valid, 1.0 / jnp.where(valid, neighbour_distances, 1.0), 0.0)
        factors = jnp.concatenate([jnp.full((g, a, 1), self.centre_factor, factors.dtype), factors], -1)
        numbers = jnp.concatenate([atomic_numbers[..., None], neighbour_numbers], -1)  # [G, A, K+1]
        vectors = nn.Embed(self.max_atomic_number + 1, self.embedding_dim, name="embedding")(numbers)
        vectors = vectors * factors[..., None].astype(vectors.dtype)  # [G, A, K+1, D_E]
        list_lengths = 1 + valid.sum(-1).reshape(g * a)  # [G*A], centre + its neighbours
        (_, atom_vectors), _ = nn.RNN(nn.LSTMCell(self.atom_features, name="atom_lstm"), return_carry=True)(
            vectors.reshape(g * a, k + 1, self.embedding_dim), seq_lengths=list_lengths)
        num_atoms = atom_mask.sum(-1)  # [G]
        (_, crystal_vectors), _ = nn.RNN(nn.LSTMCell(self.crystal_features, name="crystal_lstm"),
                                         return_carry=True)(
            atom_vectors.reshape(g, a, self.atom_features), seq_lengths=jnp.maximum(num_atoms, 1))
        x = crystal_vectors  # [G, H_2]
        for i, width in enumerate(self.head_features):
            x = nn.relu(nn.Dense(width, name=f"head_{i}")(x))
        y = nn.Dense(1, name="output")(x)[:, 0]
        return jnp.where(num_atoms > 0, y, 0.0)
