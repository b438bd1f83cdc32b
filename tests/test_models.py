"""SCANN / SCANN+ forward pass: parity with the original's fixtures, invariances, padding."""

from __future__ import annotations

from pathlib import Path

import functools

import jax
import jax.extend
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from scannet_jax import convert, models

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "original"
VARIANTS = ("scannplus", "scann", "scannplus_ring")



@functools.cache
def load_variant(variant: str):
    """(npz data, model, params, padded graphs) for one forward fixture."""
    path = FIXTURES / f"forward_{variant}_seed0.npz"
    data = np.load(path)
    config, params = convert.load_original_weights(path)
    inputs = {k.removeprefix("input/"): data[k] for k in data.files if k.startswith("input/")}
    graphs = convert.graphs_from_original_batch(
        inputs, weight="solid_angle" if config.g_update else "relative_weight", targets=data["target"]
    )
    return data, models.build_model(config), params, graphs


def split_graphs(graphs: jraph.GraphsTuple) -> list[jraph.GraphsTuple]:
    """The real graphs of a padded GraphsTuple (one padding graph at the end), one by one."""
    # On a copy: jraph.unbatch_np shifts the indices of its input in place.
    return jraph.unbatch_np(jax.tree.map(np.array, graphs))[:-1]


@functools.cache
def budget() -> tuple[int, int, int]:
    """One padding budget for (almost) every batch here, so each model compiles once.

    Large enough for the whole fixture batch plus spare padding graphs, nodes and edges.
    """
    n_node, n_edge, n_graph = 64, 192, 6
    graphs = load_variant("scannplus")[3]
    n_node = max(n_node, 64 * (int(graphs.n_node.sum()) // 64 + 1))
    n_edge = max(n_edge, 64 * (len(graphs.senders) // 64 + 1))
    n_graph = max(n_graph, len(graphs.n_node) + 2)
    return n_node, n_edge, n_graph


def pad(graphs: list[jraph.GraphsTuple], n_node: int | None = None, n_edge: int | None = None, n_graph: int | None = None):
    default = budget()
    return jraph.pad_with_graphs(
        jraph.batch_np(graphs), n_node or default[0], n_edge or default[1], n_graph or default[2]
    )


@functools.cache
def jitted_apply(model: models.Scann):
    return jax.jit(lambda params, graphs: model.apply({"params": params}, graphs))


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_original_forward(variant):
    data, model, params, graphs = load_variant(variant)
    (predictions, ga_scores), state = model.apply(
        {"params": params}, graphs, mutable=["intermediates"]
    )
    acts = state["intermediates"]["activations"][0]
    atom_mask = data["input/atom_mask"][..., 0]
    slot_mask = data["input/neighbor_mask"] & atom_mask[..., None]
    num_structures = atom_mask.shape[0]

    np.testing.assert_allclose(predictions[:num_structures], data["prediction"][:, 0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ga_scores[:-1], data["ga_score"][..., 0][atom_mask], rtol=1e-5, atol=1e-7)
    assert float(ga_scores[-1]) == 0.0  # the padding node

    compared = []
    for key in data.files:
        if not key.startswith("act/"):
            continue
        name = key.removeprefix("act/")
        expected, ours = data[key], np.asarray(acts[name])
        if name.endswith("local_attn"):  # [B, H, M, Nb] → edges [E, H]
            expected = np.moveaxis(expected, 1, -1)[slot_mask]
        elif expected.ndim == 4:  # [B, M, Nb, D] → edges [E, D]
            expected = expected[slot_mask]
        elif expected.shape[:2] == atom_mask.shape:  # [B, M, ·] → real nodes
            expected, ours = expected[atom_mask].reshape(ours[:-1].shape), ours[:-1]
        else:  # [B, ·] → real graphs
            expected, ours = expected.reshape(ours[:num_structures].shape), ours[:num_structures]
        scale = np.abs(expected).max()
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
        compared.append(name)
    assert len(compared) >= 14


def test_atom_without_neighbours_gets_layer_norm_of_query():
    # Such atoms occur in the original's lists (benzene's H 9, reference §1.1); make atom 0 one.
    path = FIXTURES / "forward_scannplus_seed0.npz"
    config, params = convert.load_original_weights(path)
    data = np.load(path)
    inputs = {k.removeprefix("input/"): data[k] for k in data.files if k.startswith("input/")}
    inputs["neighbor_mask"] = inputs["neighbor_mask"].copy()
    inputs["neighbor_mask"][0, 0] = False
    graphs = convert.graphs_from_original_batch(inputs)
    assert 0 not in graphs.receivers
    _, state = models.build_model(config).apply({"params": params}, graphs, mutable=["intermediates"])
    acts = state["intermediates"]["activations"][0]
    block = params["local_attention_0"]
    query = acts["dense_embed"][0] @ block["query"]["kernel"] + block["query"]["bias"]
    normed = (query - query.mean()) / jnp.sqrt(query.var() + 1e-6)
    expected = normed * block["layer_norm"]["scale"] + block["layer_norm"]["bias"]
    np.testing.assert_allclose(acts["block0_la_context"][0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ("scannplus", "scann"))
def test_invariant_to_atom_and_edge_permutation(variant):
    _, model, params, graphs = load_variant(variant)
    apply = jitted_apply(model)
    predictions, ga_scores = apply(params, pad(split_graphs(graphs)))
    rng = np.random.default_rng(0)
    permuted, inverse = [], []
    for g in split_graphs(graphs):
        n = int(g.n_node[0])
        perm = rng.permutation(n)  # new node k is old node perm[k]
        new_index = np.argsort(perm)
        edge_perm = rng.permutation(int(g.n_edge[0]))
        permuted.append(
            g._replace(
                nodes={k: v[perm] for k, v in g.nodes.items()},
                edges={k: v[edge_perm] for k, v in g.edges.items()},
                senders=new_index[g.senders[edge_perm]].astype(np.int32),
                receivers=new_index[g.receivers[edge_perm]].astype(np.int32),
            )
        )
        inverse.append(perm)
    p2, ga2 = apply(params, pad(permuted))
    num = len(inverse)
    np.testing.assert_allclose(p2[:num], predictions[:num], rtol=1e-5, atol=1e-6)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in inverse])])
    for s, perm in enumerate(inverse):
        np.testing.assert_allclose(
            ga2[offsets[s]:offsets[s + 1]], ga_scores[offsets[s] + perm], rtol=1e-5, atol=1e-7
        )


def test_invariant_to_batch_company_and_padding():
    _, model, params, graphs = load_variant("scannplus")
    apply = jitted_apply(model)
    predictions, ga_scores = model.apply({"params": params}, graphs)  # minimal padding
    singles = split_graphs(graphs)
    offsets = np.concatenate([[0], np.cumsum([int(g.n_node[0]) for g in singles])])
    # Each structure alone with much padding (several padding graphs, nodes and edges).
    for s, g in enumerate(singles):
        p, ga = apply(params, pad([g]))
        n = offsets[s + 1] - offsets[s]
        np.testing.assert_allclose(p[0], predictions[s], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ga[:n], ga_scores[offsets[s]:offsets[s + 1]], rtol=1e-5, atol=1e-7)
        assert np.all(np.asarray(ga[n:]) == 0.0)
    # The batch reversed, and two structures next to a copy of themselves.
    num = len(singles)
    p, _ = apply(params, pad(singles[::-1]))
    np.testing.assert_allclose(p[:num], predictions[:num][::-1], rtol=1e-5, atol=1e-6)
    p, _ = apply(params, pad([singles[1], singles[2], singles[1]]))
    np.testing.assert_allclose(p[:3], np.asarray(predictions)[[1, 2, 1]], rtol=1e-5, atol=1e-6)


def molecule_graph(positions: np.ndarray, z: np.ndarray, cutoff: float = 2.0) -> jraph.GraphsTuple:
    """A single graph from coordinates: every ordered pair closer than ``cutoff`` is an edge.

    Stand-in weights that depend only on the geometry: Ω = 4π·exp(-d), ρ = Ω / max over i's edges.
    """
    vectors = positions[None, :, :] - positions[:, None, :]
    distances = np.linalg.norm(vectors, axis=-1)
    receivers, senders = np.nonzero((distances < cutoff) & ~np.eye(len(z), dtype=bool))
    d = distances[receivers, senders]
    omega = 4 * np.pi * np.exp(-d)
    largest = np.zeros(len(z))
    np.maximum.at(largest, receivers, omega)
    return jraph.GraphsTuple(
        nodes={"atomic_numbers": z.astype(np.int32)},
        edges={
            "distances": d.astype(np.float32),
            "solid_angles": omega.astype(np.float32),
            "relative_weights": (omega / largest[receivers]).astype(np.float32),
        },
        senders=senders.astype(np.int32),
        receivers=receivers.astype(np.int32),
        n_node=np.array([len(z)], np.int32),
        n_edge=np.array([len(d)], np.int32),
        globals=None,
    )


# Methanol-like geometry (Å).
METHANOL_Z = np.array([6, 8, 1, 1, 1, 1])
METHANOL_POS = np.array(
    [[-0.0467, 0.6636, 0.0], [-0.0467, -0.7568, 0.0], [-1.0863, 0.9534, 0.0],
     [0.4343, 1.0857, 0.8924], [0.4343, 1.0857, -0.8924], [0.8585, -1.0830, 0.0]]
)


@pytest.mark.parametrize("variant", ("scannplus", "scann"))
def test_invariant_to_rotation_and_translation(variant):
    _, model, params, _ = load_variant(variant)
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    moved = METHANOL_POS @ rotation.T + np.array([3.0, -7.5, 12.25])
    apply = jitted_apply(model)
    p1, ga1 = apply(params, pad([molecule_graph(METHANOL_POS, METHANOL_Z)]))
    p2, ga2 = apply(params, pad([molecule_graph(moved, METHANOL_Z)]))
    np.testing.assert_allclose(p2[0], p1[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ga2, ga1, rtol=1e-5, atol=1e-6)


def single_atom_graph(z: int) -> jraph.GraphsTuple:
    empty = np.zeros(0, np.float32)
    return jraph.GraphsTuple(
        nodes={"atomic_numbers": np.array([z], np.int32)},
        edges={"distances": empty, "solid_angles": empty, "relative_weights": empty},
        senders=np.zeros(0, np.int32), receivers=np.zeros(0, np.int32),
        n_node=np.array([1], np.int32), n_edge=np.array([0], np.int32), globals=None,
    )


@pytest.mark.parametrize("variant", ("scannplus", "scann"))
def test_one_atom_structure_is_finite_with_score_one(variant):
    _, model, params, _ = load_variant(variant)
    batch = pad([single_atom_graph(6), molecule_graph(METHANOL_POS, METHANOL_Z)])
    apply = jitted_apply(model)

    def loss(p):
        predictions, _ = apply(p, batch)
        return jnp.sum(predictions[:2] ** 2)

    predictions, ga_scores = apply(params, batch)
    assert np.all(np.isfinite(predictions)) and np.all(np.isfinite(ga_scores))
    assert float(ga_scores[0]) == pytest.approx(1.0)
    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads))


def test_ga_scores_sum_to_one_per_graph_and_vanish_on_padding():
    _, model, params, graphs = load_variant("scannplus_ring")
    num = len(graphs.n_node) - 1
    padded = pad(split_graphs(graphs))
    _, ga_scores = jitted_apply(model)(params, padded)
    node_graph = np.repeat(np.arange(len(padded.n_node)), padded.n_node)
    sums = np.bincount(node_graph, weights=np.asarray(ga_scores), minlength=len(padded.n_node))
    np.testing.assert_allclose(sums[:num], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(sums[num:], 0.0)
    assert np.all(np.asarray(ga_scores) >= 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_close_to_float32(variant):
    _, model, params, graphs = load_variant(variant)
    bf16 = models.Scann(config=model.config.__class__(**{**vars(model.config), "dtype": "bfloat16"}))
    p32, ga32 = model.apply({"params": params}, graphs)
    p16, ga16 = bf16.apply({"params": params}, graphs)
    assert p16.dtype == jnp.float32 and ga16.dtype == jnp.float32
    scale = np.abs(p32[:-1]).max()
    np.testing.assert_allclose(p16[:-1], p32[:-1], rtol=1e-2, atol=1e-2 * scale)
    np.testing.assert_allclose(ga16, ga32, rtol=5e-2, atol=5e-3)


def test_qm9_parameter_count():
    graphs = pad([molecule_graph(METHANOL_POS, METHANOL_Z)])
    config = models.default_model_config()

    def count(n_atoms: int) -> int:
        config.n_atoms = n_atoms
        shapes = jax.eval_shape(models.build_model(config).init, jax.random.key(0), graphs)
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))

    assert count(10) == 890_977  # the original's QM9 model (reference §2)
    assert count(95) == 890_977 + 85 * 48


def test_no_pair_or_dense_neighbour_tensors():
    """No intermediate has a node×node or node×neighbour-slot shape (edges and segments only)."""
    z = np.array([6, 8, 1, 1, 1, 1, 7, 9, 6, 1, 1], np.int32)
    pos = np.random.default_rng(2).normal(scale=1.2, size=(len(z), 3))
    graphs = pad([molecule_graph(pos, z, cutoff=2.2)], n_node=13, n_edge=80, n_graph=3)
    num_nodes = graphs.n_node.sum()
    config = models.default_model_config()
    config.update(n_attention=1, local_dim=16, num_head=2, global_dim=24, dense_out=24, embedding_dim=12)
    model = models.build_model(config)
    params = jax.eval_shape(model.init, jax.random.key(0), graphs)
    jaxpr = jax.make_jaxpr(lambda p, g: model.apply(p, g, train=True, rngs={"dropout": jax.random.key(1)}))(
        params, graphs
    )
    max_in_degree = np.bincount(graphs.receivers[: graphs.n_edge[0]]).max()
    sizes = {1, 2, 8, 10, 12, 16, 20, 24, 3 * 16, num_nodes}
    assert max_in_degree not in sizes and num_nodes not in sizes - {num_nodes}

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield getattr(var.aval, "shape", ())
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from shapes(sub)

    for shape in shapes(jaxpr.jaxpr):
        assert list(shape).count(num_nodes) <= 1, shape
        assert not (num_nodes in shape and max_in_degree in shape and len(shape) >= 2), shape


def test_dropout_only_in_training():
    _, model, params, graphs = load_variant("scannplus")
    model = models.Scann(config=model.config.__class__(**{**vars(model.config), "use_drop": True}))
    p_eval, _ = model.apply({"params": params}, graphs)
    p_eval2, _ = model.apply({"params": params}, graphs, train=False)
    a, _ = model.apply({"params": params}, graphs, train=True, rngs={"dropout": jax.random.key(0)})
    b, _ = model.apply({"params": params}, graphs, train=True, rngs={"dropout": jax.random.key(0)})
    c, _ = model.apply({"params": params}, graphs, train=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(p_eval, p_eval2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[:-1], p_eval[:-1]) and not np.allclose(a[:-1], c[:-1])


def test_unknown_element_gives_nan_only_for_its_structure():
    _, model, params, graphs = load_variant("scannplus")  # 10-row table: Z <= 9
    z = np.array(graphs.nodes["atomic_numbers"])
    z[0] = 11  # an atom of the first structure
    predictions, _ = model.apply({"params": params}, graphs._replace(nodes={"atomic_numbers": z}))
    assert np.isnan(predictions[0]) and np.all(np.isfinite(predictions[1:]))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown key.*'hidden'"):
        models.build_model({"hidden": 3})
    with pytest.raises(ValueError, match="not divisible"):
        models.build_model({"local_dim": 30, "num_head": 8})
    with pytest.raises(ValueError, match="dtype"):
        models.build_model({"dtype": "float16"})


SMALL = dict(n_attention=2, local_dim=16, num_head=4, global_dim=8, dense_out=12, embedding_dim=6, n_atoms=10)


@pytest.mark.parametrize(
    "switches",
    (
        {"use_ga_norm": False, "use_attn_norm": False},
        {"g_update": False, "use_attn_norm": False, "use_ring": True},
        {"use_drop": True, "relu_output": True},
    ),
)
def test_config_switches_run_and_keep_ga_normalised(switches):
    config = models.default_model_config()
    config.update(SMALL, **switches)
    graph = molecule_graph(METHANOL_POS, METHANOL_Z)
    graph = graph._replace(nodes={**graph.nodes, "ring_aromatic": np.zeros((6, 2), np.float32)})
    batch = pad([graph, single_atom_graph(8)._replace(
        nodes={"atomic_numbers": np.array([8], np.int32), "ring_aromatic": np.ones((1, 2), np.float32)}
    )])
    model = models.build_model(config)
    params = model.init(jax.random.key(0), batch)["params"]
    assert ("residual_norm_0" in params) == config.use_attn_norm
    assert ("extra_embed" in params) == config.use_ring
    assert ("neighbor_w" in params) == config.g_update
    predictions, ga_scores = model.apply(
        {"params": params}, batch, train=True, rngs={"dropout": jax.random.key(1)}
    )
    assert np.all(np.isfinite(predictions))
    np.testing.assert_allclose([ga_scores[:6].sum(), ga_scores[6]], 1.0, rtol=1e-6)
    if config.relu_output:
        assert np.all(np.asarray(predictions) >= 0)


def test_relu_output_has_identity_gradient():
    x = jnp.array([-2.0, 0.5])
    np.testing.assert_array_equal(models._identity_grad_relu(x), [0.0, 0.5])
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(3.0 * models._identity_grad_relu(v)))(x), [3.0, 3.0])
