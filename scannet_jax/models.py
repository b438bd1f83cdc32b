"""The network registry, and SCANN, SCANN+ and GAMNet as one Flax Linen module.

``MODELS`` maps a network name (``config.model.name``) to a `ModelSpec`: how to build the
module from the model config, its regulariser and whether it scores atoms. Training,
evaluation, prediction, checkpoints and fine-tuning go through `get_spec` / `build_model` only,
so a new network plugs in with one `register` call (docs/architecture.md). Every registered
module follows one contract: ``module.apply(variables, graphs, train=..., rngs=...)`` returns
``(predictions [G], node_scores [N] or None)``, predictions in standardised target units.

``build_model(model_config)`` is the only place that reads a model config (an ml-collections
``ConfigDict`` or a plain dict); SCANN's module itself takes a frozen ``ScannConfig``.
Reference: ``shared/docs/scann-reference.md`` §2.

Input contract (docs/architecture.md): a GraphsTuple padded with ``jraph.pad_with_graphs``
(real graphs first, then one graph holding every padding node and edge, then empty graphs) with
``nodes["atomic_numbers"]`` int [N] (0 only on padding), optionally ``nodes["ring_aromatic"]``
[N, 2], ``edges["distances"]`` [E] (Å) and the edge weight picked by ``g_update``:
``edges["solid_angles"]`` (Ω, sr; SCANN+) or ``edges["relative_weights"]`` (ρ; SCANN).
``receivers`` are centre atoms i, ``senders`` their neighbours j. The last graph of the input is
always taken as padding, so an unpadded GraphsTuple loses its last structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import ml_collections
import numpy as np

from scannet_jax import alignn, layers, losses, lstm

# Activations sown as one dict, ``intermediates["activations"][0]``, named as the fixture's
# ``act/…`` arrays; per block b also ``block{b}_`` + each of BLOCK_ACTIVATIONS. Node arrays are
# [N, ·], edge arrays [E, ·] (``local_attn`` [E, H]), graph arrays [G, ·].
ACTIVATIONS = (
    "embed_atom",
    "extra_embed",
    "dense_embed",
    "geometry_features_init",
    "ga_score",
    "after_Lc",
    "ga_context",
    "bf_property",
    "prediction",
)
BLOCK_ACTIVATIONS = ("local_attn", "la_context", "geometry", "residual_norm_out")


@dataclasses.dataclass(frozen=True)
class ScannConfig:
    """Hyper-parameters of the network (names of the original's ``model`` config where it has one).

    Attributes:
      n_atoms: rows of the embedding table, indexed directly by Z (95 covers Z = 1..94; the
        original's QM9 models use 10). Z ≥ n_atoms gives a NaN embedding, hence a NaN prediction.
      embedding_dim: size of the atom embedding.
      n_attention: number of local attention blocks L.
      local_dim: feature size D of the local blocks.
      num_head: attention heads H.
      global_dim: size of ``after_Lc`` and of the global-attention Q/K.
      dense_out: size of ``bf_property``.
      use_attn_norm: residual feed-forward after every block.
      use_ga_norm: normalise the global-attention scores per structure.
      use_ring: read ``nodes["ring_aromatic"]`` through ``extra_embed`` (Dense 10).
      g_update: SCANN+ (True) or SCANN / GAMNet (False).
      gaussian_d: last distance-Gaussian centre, Å.
      num_gaussians: centres per Gaussian basis.
      gaussian_width: Gaussian width (Å for distances, sr for solid angles).
      use_drop: dropout on the local attention weights.
      embed_dropout: dropout after ``dense_embed``.
      ffn_dropout: dropout in the residual feed-forward.
      attention_dropout: rate used when ``use_drop``.
      relu_output: ReLU on the prediction with an identity gradient (the original's ``e_b`` head).
      ga_norm_eps: floor of the GA score norm (departure from the original, see GlobalAttention).
      dtype: compute dtype name, "float32" or "bfloat16" (parameters, softmax and LayerNorm stay
        float32).
    """

    n_atoms: int = 95
    embedding_dim: int = 48
    n_attention: int = 7
    local_dim: int = 128
    num_head: int = 8
    global_dim: int = 128
    dense_out: int = 128
    use_attn_norm: bool = True
    use_ga_norm: bool = True
    use_ring: bool = False
    g_update: bool = True
    gaussian_d: float = 4.0
    num_gaussians: int = 20
    gaussian_width: float = 0.5
    use_drop: bool = False
    embed_dropout: float = 0.1
    ffn_dropout: float = 0.1
    attention_dropout: float = 0.05
    relu_output: bool = False
    ga_norm_eps: float = 1e-12
    dtype: str = "float32"

    def __post_init__(self):
        if self.local_dim % self.num_head:
            raise ValueError(
                f"model config: local_dim={self.local_dim} is not divisible by num_head={self.num_head}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model config: dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


class ModelSpec(NamedTuple):
    """What the trainer and the predictor need to know of one registered network.

    Attributes:
      build: model config (a dict with its ``name``) -> Flax module following the contract of
        the module docstring.
      default_config: the network's default model config (without ``name``).
      regularizer: ``(params, coeff) -> float32 scalar`` added to the loss (e.g. SCANN's L2 on
        the original's kernels).
      node_scores: name of the per-atom output (``"ga_score"``), or None if the network has none.
      num_elements: model config -> number of embedding rows (atoms with Z >= this cannot be
        predicted).
      train_with_ynn, forward_with_ynn: whether the jitted train step, and the evaluation and
        prediction steps, keep XLA CPU's YNNPACK fusions (on by default in jaxlib 0.10;
        `steps.compiler_options`; measured per network by experiments/bench_compiler_options.py).
    """

    build: Callable[[dict[str, Any]], nn.Module]
    default_config: Callable[[], dict[str, Any]]
    regularizer: Callable[[Any, float], jax.Array]
    node_scores: str | None
    num_elements: Callable[[dict[str, Any]], int]
    train_with_ynn: bool = True
    forward_with_ynn: bool = True


MODELS: dict[str, ModelSpec] = {}


def register(name: str, spec: ModelSpec) -> None:
    """Adds a network to ``MODELS`` under ``name`` (``config.model.name``)."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = spec


def model_name(model_config: Mapping[str, Any] | ml_collections.ConfigDict) -> str:
    """The network a model config names. Configs saved before the registry existed have no
    ``name`` and are SCANN+ or SCANN by their ``g_update``."""
    values = _as_dict(model_config)
    if "name" in values:
        return str(values["name"])
    return "scannplus" if values.get("g_update", True) else "scann"


def get_spec(model_config: Mapping[str, Any] | ml_collections.ConfigDict | str) -> ModelSpec:
    """The `ModelSpec` of a model config (or of a network name).

    Raises:
      ValueError: for an unknown name, listing the registered ones.
    """
    name = model_config if isinstance(model_config, str) else model_name(model_config)
    if name not in MODELS:
        raise ValueError(f"config.model.name={name!r}: unknown network; registered: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _as_dict(model_config: Any) -> dict[str, Any]:
    if isinstance(model_config, ml_collections.ConfigDict):
        return model_config.to_dict()
    if dataclasses.is_dataclass(model_config):
        return dataclasses.asdict(model_config)
    return dict(model_config)


def default_model_config(name: str = "scannplus") -> ml_collections.ConfigDict:
    """The default model config of network ``name``, with its ``name`` key (for SCANN: the
    QM9 configuration of the original, reference §2, with a 95-row embedding table)."""
    return ml_collections.ConfigDict({"name": name, **get_spec(name).default_config()})


def scann_config(model_config: Mapping[str, Any] | ml_collections.ConfigDict) -> ScannConfig:
    """Turns a SCANN model config (ConfigDict or dict, with or without ``name``) into a ``ScannConfig``.

    Raises:
      ValueError: for a key that is not a ``ScannConfig`` field.
    """
    if isinstance(model_config, ScannConfig):
        return model_config
    return ScannConfig(**hyperparameters(ScannConfig, _as_dict(model_config)))


def hyperparameters(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """A model config's values (without ``name``) as keyword arguments of the dataclass or Flax
    module ``cls``.

    Raises:
      ValueError: for a key that is not one of its fields (a Flax module's ``parent`` and ``name``
        are not hyper-parameters).
    """
    values = {k: v for k, v in values.items() if k != "name"}
    known = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"model config: unknown key(s) {unknown}; known keys are {sorted(known)}")
    return values


def check_name(model_config: Mapping[str, Any] | ml_collections.ConfigDict) -> None:
    """Raises ValueError if a run's model config names a SCANN variant its ``g_update``
    contradicts (``scannplus`` has the geometry update, ``scann`` has not), or an unknown network."""
    values = _as_dict(model_config)
    name = model_name(values)
    get_spec(name)
    if name in _SCANN_G_UPDATE and "g_update" in values and values["g_update"] != _SCANN_G_UPDATE[name]:
        raise ValueError(f"config.model: name={name!r} needs g_update={_SCANN_G_UPDATE[name]}, "
                         f"got g_update={values['g_update']}")


def build_model(model_config: Mapping[str, Any] | ml_collections.ConfigDict | ScannConfig) -> nn.Module:
    """Builds the network a model config describes (``name`` picks it from ``MODELS``)."""
    if isinstance(model_config, ScannConfig):
        return Scann(config=model_config)
    values = _as_dict(model_config)
    values.setdefault("name", model_name(values))
    return get_spec(values).build(values)


def _identity_grad_relu(x: jax.Array) -> jax.Array:
    """max(x, 0) whose gradient is the identity (the original's ``mrelu`` for target e_b)."""
    return x + jax.lax.stop_gradient(jnp.maximum(x, 0) - x)


class Scann(nn.Module):
    """SCANN / SCANN+ (reference §2) on a padded GraphsTuple.

    ``apply({"params": p}, graphs)`` (inference) or ``apply(..., graphs, train=True,
    rngs={"dropout": key})`` returns ``(predictions [G] float32, ga_scores [N] float32)``:
    predictions in the units the model was trained on (before any target de-standardisation),
    GA scores 0 on padding nodes and summing to 1 over each real graph. With
    ``mutable=["intermediates"]`` the activations named in ``ACTIVATIONS`` /
    ``BLOCK_ACTIVATIONS`` are sown as one dict under ``"activations"``.
    """

    config: ScannConfig

    @nn.compact
    def __call__(self, graphs: jraph.GraphsTuple, train: bool = False) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
        deterministic = not train
        # jraph's padding masks index n_node with a traced value, which fails on NumPy arrays.
        graphs = jax.tree.map(jnp.asarray, graphs)
        z = graphs.nodes["atomic_numbers"]
        num_nodes = z.shape[0]
        num_graphs = graphs.n_node.shape[0]
        node_mask = jraph.get_node_padding_mask(graphs)
        edge_mask = jraph.get_edge_padding_mask(graphs)
        node_graph = jnp.repeat(
            jnp.arange(num_graphs), graphs.n_node, total_repeat_length=num_nodes
        )  # [N]
        senders, receivers = graphs.senders, graphs.receivers
        acts: dict[str, jax.Array] = {}  # sown at the end, see ACTIVATIONS

        # Embedding (§2): h = Dropout(swish(Dense_D([Emb(Z) ‖ Dense_10(ring flags)]))).
        # jnp.take's default "fill" mode turns Z >= n_atoms into a NaN row, so such an atom gives a
        # NaN prediction instead of silently reusing the last row.
        embedded = nn.Embed(
            cfg.n_atoms, cfg.embedding_dim, embedding_init=keras_embedding_init, name="embed_atom"
        )(z)  # [N, embedding_dim]
        acts["embed_atom"] = embedded
        if cfg.use_ring:
            if "ring_aromatic" not in graphs.nodes:
                raise ValueError("model config use_ring=True but graphs.nodes has no 'ring_aromatic'")
            ring = layers.keras_dense(10, "extra_embed", dtype)(
                graphs.nodes["ring_aromatic"].astype(jnp.float32)
            )
            acts["extra_embed"] = ring
            embedded = jnp.concatenate([embedded.astype(ring.dtype), ring], axis=-1)
        h = nn.swish(layers.keras_dense(cfg.local_dim, "dense_embed", dtype)(embedded))
        acts["dense_embed"] = h
        h = nn.Dropout(cfg.embed_dropout)(h, deterministic=deterministic)

        # Edge geometry (§2): Gaussians of d (and Ω for SCANN+).
        distance_basis = layers.gaussian_expansion(
            graphs.edges["distances"],
            np.linspace(0.0, cfg.gaussian_d, cfg.num_gaussians, dtype=np.float32),
            cfg.gaussian_width,
        )  # [E, K]
        edge_weights = None
        if cfg.g_update:
            angle_basis = layers.gaussian_expansion(
                graphs.edges["solid_angles"],
                np.linspace(0.0, 2 * np.pi, cfg.num_gaussians, dtype=np.float32),
                cfg.gaussian_width,
            )
            geometry = nn.swish(layers.keras_dense(cfg.local_dim, "neighbor_d", dtype)(distance_basis))
            geometry = geometry * nn.swish(
                layers.keras_dense(cfg.local_dim, "neighbor_w", dtype)(angle_basis)
            )
            acts["geometry_features_init"] = geometry
        else:
            geometry = distance_basis
            edge_weights = graphs.edges["relative_weights"]

        for b in range(cfg.n_attention):
            h, block_geometry, attention = layers.LocalAttention(
                dim=cfg.local_dim,
                num_head=cfg.num_head,
                g_update=cfg.g_update,
                attention_dropout=cfg.attention_dropout if cfg.use_drop else 0.0,
                dtype=dtype,
                name=f"local_attention_{b}",
            )(h, geometry, senders, receivers, edge_mask, edge_weights, deterministic)
            if cfg.g_update:
                geometry = block_geometry  # carried to the next block
            acts[f"block{b}_local_attn"] = attention
            acts[f"block{b}_la_context"] = h
            acts[f"block{b}_geometry"] = block_geometry
            if cfg.use_attn_norm:
                h = layers.ResidualNorm(
                    cfg.local_dim, cfg.ffn_dropout, dtype, name=f"residual_norm_{b}"
                )(h, deterministic)
            acts[f"block{b}_residual_norm_out"] = h

        # Readout (§2).
        c = nn.swish(layers.keras_dense(cfg.global_dim, "after_Lc", dtype)(h))
        acts["after_Lc"] = c
        ga_scores, context = layers.GlobalAttention(
            cfg.global_dim, cfg.use_ga_norm, cfg.ga_norm_eps, dtype, name="global_attention"
        )(c, node_graph, node_mask, num_graphs)
        acts["ga_score"] = ga_scores
        acts["ga_context"] = context
        y = nn.swish(layers.keras_dense(cfg.dense_out, "bf_property", dtype)(context))
        acts["bf_property"] = y
        y = layers.keras_dense(1, "predict_property", dtype)(y)[:, 0].astype(jnp.float32)
        if cfg.relu_output:
            y = _identity_grad_relu(y)
        acts["prediction"] = y
        self.sow("intermediates", "activations", acts)
        return y, ga_scores


def keras_embedding_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Keras ``Embedding`` default: uniform on [-0.05, 0.05]."""
    return jax.random.uniform(key, shape, dtype, -0.05, 0.05)


# SCANN+ updates the edge geometry in every block (Ω weights); SCANN / GAMNet does not (ρ weights).
_SCANN_G_UPDATE = {"scannplus": True, "scann": False}


def _scann_spec(g_update: bool) -> ModelSpec:
    return ModelSpec(
        build=lambda values: Scann(config=scann_config({"g_update": g_update, **values})),
        default_config=lambda: dataclasses.asdict(ScannConfig(g_update=g_update)),
        regularizer=losses.l2_penalty,
        node_scores="ga_score",
        num_elements=lambda values: int(values.get("n_atoms", ScannConfig.n_atoms)),
        train_with_ynn=False,
        forward_with_ynn=False,
    )


for _name, _g_update in _SCANN_G_UPDATE.items():
    register(_name, _scann_spec(_g_update))


# ALIGNN (zoo-reference.md §1): defaults of §1.9. No loss regulariser: the reference's weight decay
# (AdamW, 1e-5, on alignn.utils.group_decay's parameter groups) belongs to the optimiser
# (optim.create_optimizer with optimizer.name = "adamw"; configs/qm9.py's alignn_recipe).
register("alignn", ModelSpec(
    build=lambda values: alignn.AlignnNet(
        config=alignn.AlignnConfig(**hyperparameters(alignn.AlignnConfig, values))),
    default_config=lambda: dataclasses.asdict(alignn.AlignnConfig()),
    regularizer=lambda params, coeff: jnp.float32(0.0),
    node_scores=None,
    num_elements=lambda values: int(alignn.cgcnn_table().shape[0]),
    train_with_ynn=False,
    forward_with_ynn=False,
))


# The LSTM neighbour-list model (zoo-reference.md §3) on a ``neighbour_list`` store; the source
# states no regulariser.
register("lstm", ModelSpec(
    build=lambda values: lstm.LstmNet(config=lstm.LstmConfig(**hyperparameters(lstm.LstmConfig, values))),
    # head_features as a list: what a config holds after its JSON round trip in a workdir
    default_config=lambda: {**dataclasses.asdict(lstm.LstmConfig()),
                            "head_features": list(lstm.LstmConfig.head_features)},
    regularizer=lambda params, coeff: jnp.float32(0.0),
    node_scores=None,
    num_elements=lambda values: int(values.get("max_atomic_number", lstm.MAX_ATOMIC_NUMBER)) + 1,
    forward_with_ynn=False,
))


# The MEGNet-family networks (zoo-reference.md §2.6, `scannet_jax.megnet`). Imported here, after
# `keras_embedding_init`, which megnet.py imports from this module.
from scannet_jax import megnet  # noqa: E402


def _module_defaults(module: type[nn.Module]) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(module) if f.name not in ("parent", "name")}


# MEGNet alone on the ``radius`` atom graph, and AMDNet on the ``motif_dual`` store (atom graph and
# motif graph): the released code's architecture and ReLU; no regulariser (no L2 in the recipe, §2.7).
register("megnet", ModelSpec(
    build=lambda values: megnet.MegnetNet(megnet.MEGNet(**hyperparameters(megnet.MEGNet, values))),
    default_config=lambda: _module_defaults(megnet.MEGNet),
    regularizer=lambda params, coeff: jnp.float32(0.0),
    node_scores=None,
    num_elements=lambda values: int(values.get("num_species", megnet.NUM_SPECIES)),
))
register("amdnet", ModelSpec(
    build=lambda values: megnet.AmdnetNet(megnet.AMDNet(**hyperparameters(megnet.AMDNet, values))),
    default_config=lambda: _module_defaults(megnet.AMDNet),
    regularizer=lambda params, coeff: jnp.float32(0.0),
    node_scores=None,
    num_elements=lambda values: int(values.get("num_species", megnet.NUM_SPECIES)),
))
