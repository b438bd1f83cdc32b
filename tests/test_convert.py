"""Reading the original's weights (.npz fixtures, Keras-2 HDF5) and padded batches."""

from __future__ import annotations

import json
from pathlib import Path

import flax
import h5py
import jax
import numpy as np
import pytest
import yaml

from scannet_jax import convert, models

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "original"
VARIANTS = ("scannplus", "scann", "scannplus_ring")


def fixture(variant: str) -> Path:
    return FIXTURES / f"forward_{variant}_seed0.npz"


def original_weights(variant: str) -> tuple[list[str], dict[str, np.ndarray], dict]:
    data = np.load(fixture(variant))
    names = [str(n) for n in data["weight_names"]]
    return names, {n: data["weight/" + n] for n in names}, json.loads(str(data["config_json"]))


def write_npz(path: Path, names: list[str], weights: dict[str, np.ndarray], config: dict) -> Path:
    arrays = {"weight/" + n: w for n, w in weights.items()}
    np.savez(path, weight_names=np.array(names), config_json=json.dumps(config), **arrays)
    return path


def write_keras_h5(path: Path, names: list[str], weights: dict[str, np.ndarray], full_model: bool) -> Path:
    """Writes weights the way Keras 2 ``save_weights`` (or ``save`` when ``full_model``) does.

    One group per layer in model order (weightless layers too), each with a ``weight_names``
    attribute and a dataset per variable at its full name. The feed-forward ``dense_N`` variables
    belong to the ``residual_norm`` layer that follows them.
    """
    groups: list[tuple[str, list[str]]] = [("atomic", []), ("atom_mask", [])]
    pending: list[str] = []
    for name in names:
        layer = name.split("/")[0]
        if layer.startswith("dense") and layer != "dense_embed":
            pending.append(name)
            continue
        if groups[-1][0] != layer:
            if groups[-1][0] == "dense_embed":
                groups.append(("dropout", []))
            groups.append((layer, []))
        if layer.startswith("residual_norm"):
            groups[-1][1].extend(pending)
            pending = []
        groups[-1][1].append(name)
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if full_model else f
        if full_model:
            f.attrs["model_config"] = json.dumps({"class_name": "Functional"})
        root.attrs["layer_names"] = [g.encode() for g, _ in groups]
        root.attrs["backend"] = b"tensorflow"
        root.attrs["keras_version"] = b"2.15.0"
        for layer, layer_names in groups:
            group = root.create_group(layer)
            group.attrs["weight_names"] = [n.encode() for n in layer_names]
            for n in layer_names:
                group.create_dataset(n, data=weights[n])
    return path


def assert_same_params(a, b):
    flat_a, flat_b = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=str(key))


@pytest.mark.parametrize("variant", VARIANTS)
def test_npz_weights_fill_every_param_of_the_model(variant):
    config, params = convert.load_original_weights(fixture(variant))
    original = json.loads(str(np.load(fixture(variant))["config_json"]))["model"]
    for key in ("n_atoms", "embedding_dim", "n_attention", "local_dim", "num_head", "g_update", "use_ring"):
        assert config[key] == original[key], key
    assert config.relu_output is False
    graphs = convert.graphs_from_original_batch(
        {k.removeprefix("input/"): v for k, v in np.load(fixture(variant)).items() if k.startswith("input/")}
    )
    shapes = jax.eval_shape(models.build_model(config).init, jax.random.key(0), graphs)["params"]
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, params)


@pytest.mark.parametrize("full_model", (False, True))
def test_keras_h5_matches_npz(tmp_path, full_model):
    names, weights, original_config = original_weights("scannplus")
    _, npz_params = convert.load_original_weights(fixture("scannplus"))
    if full_model:  # model.save: models/model_homo.h5 with config.yaml one directory up
        (tmp_path / "models").mkdir()
        h5_path = write_keras_h5(tmp_path / "models" / "model_homo.h5", names, weights, True)
    else:
        h5_path = write_keras_h5(tmp_path / "weights.h5", names, weights, False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(original_config))
    config, params = convert.load_original_weights(h5_path)
    for key, value in original_config["model"].items():
        if key not in ("scale", "feature"):
            assert config[key] == value, key
    assert_same_params(params, npz_params)


def test_keras_h5_needs_a_config(tmp_path):
    names, weights, original_config = original_weights("scann")
    h5_path = write_keras_h5(tmp_path / "weights.h5", names, weights, False)
    with pytest.raises(ValueError, match="no config given"):
        convert.load_original_weights(h5_path)
    config, params = convert.load_original_weights(h5_path, config=original_config)
    assert not config.g_update
    _, npz_params = convert.load_original_weights(fixture("scann"))
    assert_same_params(params, npz_params)


def test_other_keras_counters_still_load(tmp_path):
    """A model built after others in the same Keras session has shifted global counters."""
    names, weights, config = original_weights("scann")
    shift = {"dense": 10, "layer_normalization": 7}

    def renamed(name: str) -> str:
        parts = name.split("/")
        for i, part in enumerate(parts):
            base, _, number = part.rpartition("_")
            stem, n = (base, int(number)) if number.isdigit() else (part, 0)
            if stem in shift:
                parts[i] = f"{stem}_{n + shift[stem]}"
        return "/".join(parts)

    new_names = [renamed(n) for n in names]
    assert "dense_10/kernel:0" in new_names
    path = write_npz(tmp_path / "w.npz", new_names, {renamed(n): w for n, w in weights.items()}, config)
    _, params = convert.load_original_weights(path)
    assert_same_params(params, convert.load_original_weights(fixture("scann"))[1])


def test_missing_extra_and_misshaped_weights_are_named(tmp_path):
    names, weights, config = original_weights("scannplus")

    missing = [n for n in names if n != "local_attention_1/key/bias:0"]
    path = write_npz(tmp_path / "missing.npz", missing, {n: weights[n] for n in missing}, config)
    with pytest.raises(ValueError, match=r"'local_attention_1/key/bias:0'"):
        convert.load_original_weights(path)

    last = names[:-1]
    path = write_npz(tmp_path / "last.npz", last, {n: weights[n] for n in last}, config)
    with pytest.raises(ValueError, match=r"missing weight\(s\) \['predict_property/bias:0'\]"):
        convert.load_original_weights(path)

    extra = names + ["predict_property_1/kernel:0"]
    path = write_npz(tmp_path / "extra.npz", extra, {**weights, extra[-1]: np.zeros((16, 1))}, config)
    with pytest.raises(ValueError, match=r"extra weight\(s\) \['predict_property_1/kernel:0'\]"):
        convert.load_original_weights(path)

    name = "local_attention/filter_geo/kernel:0"
    rows, cols = weights[name].shape
    bad = dict(weights, **{name: np.zeros((rows + 1, cols), np.float32)})
    path = write_npz(tmp_path / "shape.npz", names, bad, config)
    with pytest.raises(ValueError, match=rf"'{name}' has shape \({rows + 1}, {cols}\), expected \({rows}, {cols}\)"):
        convert.load_original_weights(path)

    # A SCANN file read with a SCANN+ config: the first missing layer is named.
    scann_names, scann_weights, _ = original_weights("scann")
    path = write_npz(tmp_path / "variant.npz", scann_names, scann_weights, config)
    with pytest.raises(ValueError, match=r"expected 'neighbor_d/kernel:0'"):
        convert.load_original_weights(path)


def test_original_config_translation():
    config = convert.model_config_from_original(
        {"model": {"n_atoms": 95, "scale": 0.5, "feature": "atomic", "g_update": False}, "hyper": {"target": "e_b"}}
    )
    assert config.n_atoms == 95 and not config.g_update and config.relu_output
    assert models.build_model(config).config.relu_output
    with pytest.raises(ValueError, match="feature='cgcnn'"):
        convert.model_config_from_original({"model": {"feature": "cgcnn"}})
    with pytest.raises(ValueError, match=r"unknown model key\(s\) \['n_layers'\]"):
        convert.model_config_from_original({"n_layers": 3})


def batch_inputs(variant: str = "scannplus") -> dict[str, np.ndarray]:
    data = np.load(fixture(variant))
    return {k.removeprefix("input/"): data[k] for k in data.files if k.startswith("input/")}


def test_graphs_round_trip_to_the_padded_batch():
    inputs = batch_inputs("scannplus_ring")
    graphs = convert.graphs_from_original_batch(inputs, targets=np.arange(float(len(inputs["atomic"]))))
    atom_mask = inputs["atom_mask"][..., 0]
    slot_mask = inputs["neighbor_mask"] & atom_mask[..., None]
    num = len(atom_mask)
    np.testing.assert_array_equal(graphs.n_node, list(atom_mask.sum(axis=1)) + [1])
    np.testing.assert_array_equal(graphs.n_edge, list(slot_mask.sum(axis=(1, 2))) + [0])
    np.testing.assert_array_equal(graphs.nodes["atomic_numbers"], list(inputs["atomic"][atom_mask]) + [0])
    np.testing.assert_array_equal(graphs.nodes["ring_aromatic"][:-1], inputs["ring_aromatic"][atom_mask])
    np.testing.assert_array_equal(graphs.globals["index"], list(range(num)) + [-1])
    np.testing.assert_array_equal(graphs.globals["target"][:num], np.arange(num))

    # Rebuild the slots: edges come structure by structure, atom by atom, slot by slot.
    starts = np.concatenate([[0], np.cumsum(graphs.n_node)])
    edge = 0
    for b, i, slot in zip(*np.nonzero(slot_mask)):
        assert graphs.receivers[edge] == starts[b] + i
        assert graphs.senders[edge] == starts[b] + inputs["neighbors"][b, i, slot]
        assert graphs.edges["distances"][edge] == inputs["neighbor_distance"][b, i, slot]
        assert graphs.edges["solid_angles"][edge] == inputs["neighbor_weight"][b, i, slot]
        edge += 1
    assert edge == len(graphs.senders)


def test_relative_weights_rebuilt_from_solid_angles():
    neighbours = np.load(FIXTURES / "neighbours.npz")
    # ρ = Ω / max over i's edges equals the original's ρ wherever i's largest facet is an edge.
    omega, rho, centre = (neighbours[k] for k in ("edge_solid_angle", "edge_rel_weight", "edge_center"))
    structure = np.repeat(np.arange(len(neighbours["edge_ptr"]) - 1), np.diff(neighbours["edge_ptr"]))
    key = structure * 1000 + centre
    largest = {k: omega[key == k].max() for k in np.unique(key)}
    rebuilt = omega / np.array([largest[k] for k in key])
    has_top_edge = {k: np.isclose(rho[key == k], 1.0).any() for k in largest}
    covered = np.array([has_top_edge[k] for k in key])
    assert covered.mean() > 0.9
    np.testing.assert_allclose(rebuilt[covered], rho[covered], rtol=1e-6)

    inputs = batch_inputs("scannplus")
    graphs = convert.graphs_from_original_batch(inputs)
    omega, rho = graphs.edges["solid_angles"], graphs.edges["relative_weights"]
    largest = np.zeros(graphs.n_node.sum(), np.float32)
    np.maximum.at(largest, graphs.receivers, omega)
    np.testing.assert_allclose(rho, omega / largest[graphs.receivers], rtol=1e-6)
    largest_rho = np.zeros_like(largest)
    np.maximum.at(largest_rho, graphs.receivers, rho)
    np.testing.assert_array_equal(largest_rho[np.unique(graphs.receivers)], 1.0)


def test_relative_weight_batches_and_bad_batches():
    inputs = batch_inputs("scann")
    graphs = convert.graphs_from_original_batch(inputs, weight="relative_weight")
    assert np.isnan(graphs.edges["solid_angles"]).all()
    np.testing.assert_array_equal(
        graphs.edges["relative_weights"], inputs["neighbor_weight"][inputs["neighbor_mask"]]
    )
    n_atoms = inputs["atom_mask"][..., 0].sum(axis=1)
    b, last = int(np.argmin(n_atoms)), inputs["atomic"].shape[1] - 1
    assert n_atoms[b] <= last and inputs["neighbor_mask"][b, 0, 0]
    bad = dict(inputs, neighbors=inputs["neighbors"].copy())
    bad["neighbors"][b, 0, 0] = last  # a padded atom of the smallest structure
    with pytest.raises(ValueError, match=f"structure {b}, atom 0, slot 0 points at padded atom {last}"):
        convert.graphs_from_original_batch(bad, weight="relative_weight")
    with pytest.raises(ValueError, match=r"missing array\(s\) \['neighbor_distance'\]"):
        convert.graphs_from_original_batch({k: v for k, v in inputs.items() if k != "neighbor_distance"})
    with pytest.raises(ValueError, match="weight must be"):
        convert.graphs_from_original_batch(inputs, weight="omega")


@pytest.mark.parametrize(
    "switches",
    ({}, {"g_update": False}, {"use_ring": True}, {"use_attn_norm": False}, {"g_update": False, "use_attn_norm": False}),
)
def test_keras_layout_covers_exactly_the_model_params(switches):
    config = models.default_model_config()
    config.update(n_attention=3, local_dim=16, num_head=2, global_dim=8, dense_out=12, embedding_dim=6, **switches)
    graph = convert.graphs_from_original_batch(
        {
            "atomic": np.array([[6, 1]]), "neighbors": np.array([[[1], [0]]]),
            "neighbor_mask": np.ones((1, 2, 1), bool), "neighbor_weight": np.ones((1, 2, 1)),
            "neighbor_distance": np.ones((1, 2, 1)), "ring_aromatic": np.zeros((1, 2, 2)),
        }
    )
    shapes = jax.eval_shape(models.build_model(config).init, jax.random.key(0), graph)["params"]
    flat = {k: v.shape for k, v in flax.traverse_util.flatten_dict(shapes).items()}
    layout = convert.keras_weight_layout(config)
    assert {w.path: w.shape for w in layout} == flat
    assert len({w.name for w in layout}) == len(layout)


def test_keras_h5_refuses_huge_declarations_and_external_storage(tmp_path):
    """A small file declaring a 6e8-element weight is refused before anything is allocated; a
    weight whose data lives in another local file (HDF5 external storage) is refused too."""
    names, weights, original_config = original_weights("scannplus")
    first = names[0]

    def rewrite(path: Path, make) -> Path:
        write_keras_h5(path, names, weights, False)
        with h5py.File(path, "r+") as f:
            group = next(f[layer] for layer in f.attrs["layer_names"] if first in f[layer])
            del group[first]
            make(group, first)
        return path

    huge = rewrite(tmp_path / "huge.h5", lambda g, n: g.create_dataset(n, shape=(600_000_000,), dtype="f4",
                                                                      chunks=(1024,)))
    assert huge.stat().st_size < 1 << 20
    with pytest.raises(ValueError, match=rf"weight '{first}' declares shape \(600000000,\) .* refused before reading"):
        convert.load_original_weights(huge, config=original_config)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(weights[first].size, dtype=weights[first].dtype).tobytes())
    external = rewrite(tmp_path / "external.h5", lambda g, n: g.create_dataset(
        n, shape=weights[n].shape, dtype=weights[n].dtype, external=[(str(secret), 0, secret.stat().st_size)]))
    with pytest.raises(ValueError, match=rf"weight '{first}' keeps its data in another file \({secret}\); refused"):
        convert.load_original_weights(external, config=original_config)
