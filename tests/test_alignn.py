"""ALIGNN in Flax against the reference package (tests/fixtures/alignn), and its invariances."""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle
import zipfile
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from scannet_jax.alignn import ALIGNN, AlignnConfig, MaskedBatchNorm, cgcnn_table, num_parameters, rbf_expansion
from scannet_jax.knn import knn_from_arrays
from scannet_jax.line_graph import alignn_graphs, pad_alignn_batch
from scannet_jax.torch_weights import (alignn_variables_from_state_dict, load_alignn_state_dict, read_state_dict,
                                       torch_names)

FIXTURES = Path(__file__).parent / "fixtures" / "alignn"
META = json.loads((FIXTURES / "meta.json").read_text())
GRAPHS = np.load(FIXTURES / "graphs.npz")
OUTPUTS = np.load(FIXTURES / "outputs.npz")
NAMES = META["structures"]
SMALL = AlignnConfig(**{k: v for k, v in META["small_config"].items() if k != "name"})
TOL = dict(rtol=1e-5, atol=1e-5)


@functools.cache
def small_variables():
    return load_alignn_state_dict(FIXTURES / "weights.pt", SMALL)


@functools.cache
def apply_fn(config: AlignnConfig, train: bool):
    model = ALIGNN(config)
    if train:
        return jax.jit(lambda v, g, lg: model.apply(v, g, lg, train=True, mutable=["batch_stats"]))
    return jax.jit(lambda v, g, lg: model.apply(v, g, lg, train=False, mutable=["intermediates"]))


def reference_pairs(names):
    """The reference's own graphs of `names` as (graph, line) single-structure GraphsTuples."""
    pairs = []
    for n in names:
        num_bonds = len(GRAPHS[f"{n}.src"])
        graph = jraph.GraphsTuple(nodes={"atomic_numbers": GRAPHS[f"{n}.numbers"]}, edges={"vectors": GRAPHS[f"{n}.r"]},
                                  senders=GRAPHS[f"{n}.src"], receivers=GRAPHS[f"{n}.dst"],
                                  n_node=np.array([len(GRAPHS[f"{n}.numbers"])]), n_edge=np.array([num_bonds]),
                                  globals=None)
        line = jraph.GraphsTuple(nodes=None, edges={"cosines": GRAPHS[f"{n}.cosines"]},
                                 senders=GRAPHS[f"{n}.lg_src"], receivers=GRAPHS[f"{n}.lg_dst"],
                                 n_node=np.array([num_bonds]), n_edge=np.array([len(GRAPHS[f"{n}.lg_src"])]),
                                 globals=None)
        pairs.append((graph, line))
    return pairs


def our_pairs(names, positions=None):
    return [alignn_graphs(GRAPHS[f"{n}.numbers"],
                          knn_from_arrays(GRAPHS[f"{n}.positions"] if positions is None else positions,
                                          GRAPHS[f"{n}.cell"], True)) for n in names]


# Budgets (atoms, bonds, triplets, graphs): one structure (the largest fixture has 12 atoms, 150
# bonds, 1,878 triplets) and all seven (29, 472, 8,434), so that few shapes are compiled.
SINGLE = (16, 160, 2000, 2)
ALL = (40, 512, 8704, 9)


def padded(pairs, bucket=None):
    """Batch padded to `bucket`, or to its totals plus one atom, bond and graph."""
    if bucket is None:
        bucket = (sum(int(g.n_node[0]) for g, _ in pairs) + 1, sum(int(g.n_edge[0]) for g, _ in pairs) + 1,
                  sum(int(lg.n_edge[0]) for _, lg in pairs), len(pairs) + 1)
    return pad_alignn_batch(pairs, n_node=bucket[0], n_edge=bucket[1], n_triplet=bucket[2], n_graph=bucket[3])


def test_cgcnn_table_and_features_match_reference():
    np.testing.assert_array_equal(cgcnn_table(), GRAPHS["cgcnn_table"])
    for n in NAMES:
        np.testing.assert_array_equal(cgcnn_table()[GRAPHS[f"{n}.numbers"]], GRAPHS[f"{n}.atom_features"])


def test_rbf_widths():
    """§1.4: γ = 1/spacing: 9.875 Å⁻² for 80 bins on [0, 8] Å, 19.5 for 40 bins on [-1, 1]."""
    d = jnp.array([0.0, 2.5])
    np.testing.assert_allclose(rbf_expansion(d, 0.0, 8.0, 80)[:, 30],
                               np.exp(-9.875 * (np.array([0.0, 2.5]) - 30 * 8 / 79) ** 2), rtol=1e-5, atol=1e-30)
    c = jnp.array([0.3])
    np.testing.assert_allclose(rbf_expansion(c, -1.0, 1.0, 40)[0, 10], np.exp(-19.5 * (0.3 - (-1 + 20 / 39)) ** 2),
                               rtol=1e-5)


def test_every_layer_matches_reference():
    graph, line = padded(reference_pairs(NAMES), ALL)
    pred, state = apply_fn(SMALL, False)(small_variables(), graph, line)
    inter = state["intermediates"]
    layer_keys = [k for k in OUTPUTS.files if not k.startswith(("train", "prediction"))]
    assert len(layer_keys) == 3 + 3 * SMALL.alignn_layers + 2 * SMALL.gcn_layers + 1
    for key in layer_keys:
        ref = OUTPUTS[key]
        np.testing.assert_allclose(np.asarray(inter[key][0])[:len(ref)], ref, **TOL, err_msg=key)
    np.testing.assert_allclose(pred[:len(NAMES)], OUTPUTS["prediction"], **TOL)


def test_train_mode_matches_reference():
    """Batch statistics over the real rows only, running statistics updated as PyTorch does."""
    graph, line = padded(reference_pairs(NAMES), ALL)
    pred, updated = apply_fn(SMALL, True)(small_variables(), graph, line)
    np.testing.assert_allclose(pred[:len(NAMES)], OUTPUTS["train.prediction"], **TOL)
    stats = flax.traverse_util.flatten_dict(updated["batch_stats"])
    checked = 0
    for name, (collection, path, _) in torch_names(SMALL).items():
        if collection == "batch_stats":
            np.testing.assert_allclose(stats[path], OUTPUTS[f"train.{name}"], **TOL, err_msg=name)
            checked += 1
    assert checked == 2 * (5 + 2 * 2 * SMALL.alignn_layers + 2 * SMALL.gcn_layers)


def test_our_graphs_give_reference_predictions():
    """k-NN builder + line graph + model end to end, one structure at a time and batched."""
    variables = small_variables()
    singles = [float(apply_fn(SMALL, False)(variables, *padded([pair], SINGLE))[0][0]) for pair in our_pairs(NAMES)]
    np.testing.assert_allclose(singles, OUTPUTS["prediction_single"], **TOL)
    batched = apply_fn(SMALL, False)(variables, *padded(our_pairs(NAMES), ALL))[0]
    np.testing.assert_allclose(batched[:len(NAMES)], OUTPUTS["prediction_single"], **TOL)


def formula_state_dict(layout):
    """`formula_weights` of tests/fixtures/alignn/make_fixtures.py, in NumPy."""
    out = {}
    for p, (name, shape, _dtype) in enumerate(layout):
        if name.endswith(("num_batches_tracked", "centers")):
            continue
        i = np.arange(int(np.prod(shape)), dtype=np.float64)
        fan_in = shape[1] if len(shape) == 2 else 16.0
        w = np.sin(0.7 * i + 1.3 * p) * np.cos(0.11 * i) / np.sqrt(fan_in)
        if name.endswith("running_var"):
            w = 1.0 + 0.5 * np.abs(w)
        elif ".layer.1.weight" in name or name.endswith(("bn_nodes.weight", "bn_edges.weight")):
            w = 1.0 + 0.25 * w
        out[name] = w.reshape(shape).astype(np.float32)
    return out


def test_default_model_parameters_layout_and_prediction():
    layout = META["default_state_dict"]
    expected = {name: tuple(shape) for name, shape, _ in layout
                if not name.endswith(("num_batches_tracked", "centers"))}
    names = torch_names(AlignnConfig())
    assert set(names) == set(expected)
    assert all(tuple(s if c == "batch_stats" or p[-1] != "kernel" else s[::-1]) == expected[n]
               for n, (c, p, s) in names.items())
    variables = alignn_variables_from_state_dict(formula_state_dict(layout))
    assert num_parameters(variables["params"]) == META["default_num_parameters"] == 4_026_753
    graph, line = padded(reference_pairs(NAMES), ALL)
    pred, state = apply_fn(AlignnConfig(), False)(variables, graph, line)
    default = np.load(FIXTURES / "default.npz")
    np.testing.assert_allclose(np.asarray(state["intermediates"]["readout"][0])[:len(NAMES)], default["readout"], **TOL)
    np.testing.assert_allclose(pred[:len(NAMES)], default["prediction"], **TOL)


def test_fresh_init_has_reference_parameter_count():
    graph, line = padded(reference_pairs(["cu_fcc"]), SINGLE)
    shapes = jax.eval_shape(lambda: ALIGNN().init(jax.random.PRNGKey(0), graph, line, train=False))
    assert num_parameters(shapes["params"]) == 4_026_753


def test_pt_loader_round_trip():
    arrays = read_state_dict(FIXTURES / "weights.pt")
    npz = np.load(FIXTURES / "weights.npz")
    assert list(arrays) == list(npz.files)
    for k in npz.files:
        assert arrays[k].dtype == npz[k].dtype and arrays[k].shape == npz[k].shape, k
        np.testing.assert_array_equal(arrays[k], npz[k], err_msg=k)
    flat = flax.traverse_util.flatten_dict(small_variables()["params"])
    np.testing.assert_array_equal(flat[("alignn_layers_1", "edge_update", "dst_gate", "kernel")],
                                  npz["alignn_layers.1.edge_update.dst_gate.weight"].T)


def test_loader_names_bad_keys():
    state = dict(np.load(FIXTURES / "weights.npz"))
    del state["gcn_layers.1.bn_edges.running_var"]
    state["fc.extra"] = np.zeros(1)
    state["fc.weight"] = np.zeros((2, 16), np.float32)
    with pytest.raises(ValueError) as err:
        alignn_variables_from_state_dict(state, SMALL)
    message = str(err.value)
    assert "missing: gcn_layers.1.bn_edges.running_var" in message
    assert "unexpected: fc.extra" in message
    assert "shape of fc.weight: (2, 16), expected (1, 16)" in message
    with pytest.raises(ValueError, match="missing: alignn_layers.2.node_update.src_gate.weight"):
        alignn_variables_from_state_dict(dict(np.load(FIXTURES / "weights.npz")), AlignnConfig())


class _Evil:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_loader_refuses_arbitrary_globals(tmp_path):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"x": _Evil()}, protocol=4))
        archive.writestr("evil/byteorder", "little")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global builtins.eval"):
        read_state_dict(path)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="not a zip-format torch file"):
        read_state_dict(legacy)


def test_rotation_and_atom_order_invariance():
    variables = small_variables()
    pos, cell = GRAPHS["triclinic.positions"], GRAPHS["triclinic.cell"]
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    rotated = alignn_graphs(GRAPHS["triclinic.numbers"], knn_from_arrays(pos @ q.T, cell @ q.T, True))
    perm = np.array([3, 1, 0, 2])
    permuted = alignn_graphs(GRAPHS["triclinic.numbers"][perm], knn_from_arrays(pos[perm], cell, True))
    base = apply_fn(SMALL, False)(variables, *padded(our_pairs(["triclinic"]), SINGLE))[0][0]
    for pair in (rotated, permuted):
        np.testing.assert_allclose(apply_fn(SMALL, False)(variables, *padded([pair], SINGLE))[0][0], base, rtol=1e-5)


def test_padding_amount_changes_nothing_in_train_mode():
    """BatchNorm masking: the seven structures padded by one row (the least jraph allows) and by
    hundreds of atoms, bonds and triplets give the same predictions and running statistics in
    train mode (eval mode: the single/batched test above pads each structure differently)."""
    pairs = our_pairs(NAMES)
    tight, loose = padded(pairs), padded(pairs, ALL)
    assert loose[1].n_edge[-2] > 200  # hundreds of padding triplets
    (a, sa), (b, sb) = (apply_fn(SMALL, True)(small_variables(), *batch) for batch in (tight, loose))
    np.testing.assert_allclose(a[:len(NAMES)], b[:len(NAMES)], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a[:len(NAMES)], OUTPUTS["train.prediction"], **TOL)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                           sa["batch_stats"], sb["batch_stats"])


def test_masked_batchnorm_statistics():
    """Hand-computed: the padded rows (huge values) are ignored; running var uses n/(n-1)."""
    x = jnp.array([[1.0], [2.0], [4.0], [1e6], [-1e6]])
    mask = jnp.array([True, True, True, False, False])
    bn = MaskedBatchNorm()
    variables = bn.init(jax.random.PRNGKey(0), x, mask, train=True)
    y, updated = bn.apply(variables, x, mask, train=True, mutable=["batch_stats"])
    mean, var = 7 / 3, ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3
    np.testing.assert_allclose(y[:3, 0], (np.array([1, 2, 4]) - mean) / np.sqrt(var + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(updated["batch_stats"]["mean"], [0.1 * mean], rtol=1e-6)
    np.testing.assert_allclose(updated["batch_stats"]["var"], [0.9 + 0.1 * var * 3 / 2], rtol=1e-6)


def test_loader_keeps_offsets_strides_and_dtypes():
    """views.pt: two views of one float64 storage (a slice with an offset, a transpose) and int64."""
    arrays = read_state_dict(FIXTURES / "views.pt")
    base = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(arrays["a"], base[:, 1:3])
    np.testing.assert_array_equal(arrays["b"], base.T)
    np.testing.assert_array_equal(arrays["c"], [-3, 5])
    assert arrays["a"].dtype == np.float64 and arrays["c"].dtype == np.int64


def test_links():
    """link "log": exp of the linear output, bias initialised to log(0.7); "logit": sigmoid."""
    graph, line = padded(our_pairs(["cu_fcc"]), SINGLE)
    head = AlignnConfig(alignn_layers=0, gcn_layers=0, embedding_features=2, hidden_features=2)  # only the head
    variables = jax.jit(functools.partial(ALIGNN(dataclasses.replace(head, link="log")).init, train=False))(
        jax.random.PRNGKey(0), graph, line)
    np.testing.assert_allclose(variables["params"]["fc"]["bias"], [np.log(0.7)], rtol=1e-6)
    linear = np.asarray(apply_fn(head, False)(variables, graph, line)[0])
    for link, fn in (("log", np.exp), ("logit", lambda v: 1 / (1 + np.exp(-v)))):
        config = dataclasses.replace(head, link=link)
        np.testing.assert_allclose(apply_fn(config, False)(variables, graph, line)[0], fn(linear), rtol=1e-6)
    with pytest.raises(ValueError, match="link must be one of"):
        AlignnConfig(link="relu")


def test_train_gradients_finite_and_blind_to_padding():
    """Loss gradients (train mode) are finite and the same for two paddings of one structure."""
    pair = our_pairs(["srtio3"])[0]
    model = ALIGNN(AlignnConfig(alignn_layers=1, gcn_layers=1, embedding_features=4, hidden_features=8))
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), *padded([pair]))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(0.5 * rng.normal(size=x.shape), jnp.float32),
                                    shapes["params"])
    batch_stats = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape), shapes["batch_stats"])  # unused in train mode

    def loss(params, graph, line):
        pred, _ = model.apply({"params": params, "batch_stats": batch_stats}, graph, line,
                              train=True, mutable=["batch_stats"])
        return (pred[0] - 1.0) ** 2

    grad = jax.jit(jax.grad(loss))
    a, b = grad(params, *padded([pair], SINGLE)), grad(params, *padded([pair]))
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(a))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)
