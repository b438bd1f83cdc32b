"""ALIGNN through the one trainer: the knn_line_graph store (k-NN bonds + triplets as an extra set),
`batching.Batch` through the steps, the registry entry, training, checkpoints and evaluation, and
parity of the store path with the fixture path (tests/fixtures/alignn)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ase.io
import jax
import numpy as np
import pytest

from mp_subset import train_on_mp_subset  # tests/mp_subset.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIXTURES = REPO / "tests" / "fixtures" / "alignn"


def fixture_structures():
    from scannet_jax.structures import Structure

    graphs = np.load(FIXTURES / "graphs.npz")
    names = json.loads((FIXTURES / "meta.json").read_text())["structures"]
    return names, [Structure(graphs[f"{n}.numbers"], graphs[f"{n}.positions"], graphs[f"{n}.cell"],
                             np.ones(3, bool)) for n in names]


def test_store_holds_the_knn_bonds_and_their_triplets():
    from scannet_jax.datasets import featurize
    from scannet_jax.knn import knn_from_arrays
    from scannet_jax.line_graph import line_graph

    names, structures = fixture_structures()
    settings = featurize.graph_settings("knn_line_graph", {"cutoff": 8.0, "max_neighbors": 12})
    assert settings.key() == "knn1-k12-d8-lg1"
    store = featurize.build_store(structures, settings, num_workers=1, progress=False)
    triplets = store.extras["triplets"]
    assert dict(triplets.refers) == {"senders": "edges", "receivers": "edges"}
    for s, structure in enumerate(structures):
        bonds = knn_from_arrays(structure.positions, structure.cell, True)
        lg = line_graph(bonds.senders, bonds.receivers, bonds.vectors)
        e = slice(store.edge_ptr[s], store.edge_ptr[s + 1])
        t = slice(triplets.ptr[s], triplets.ptr[s + 1])
        np.testing.assert_array_equal(store.senders[e], bonds.senders)
        np.testing.assert_array_equal(store.receivers[e], bonds.receivers)
        np.testing.assert_array_equal(store.distances[e], bonds.distances.astype(np.float32))
        np.testing.assert_array_equal(triplets.fields["senders"][t], lg.senders)
        np.testing.assert_array_equal(triplets.fields["receivers"][t], lg.receivers)
        np.testing.assert_array_equal(triplets.fields["cosines"][t], lg.cosines.astype(np.float32))
    assert names[3] == "nacl" and (store.n_edge[3], triplets.counts[3]) == (60, 1752)  # zoo-reference §1.1


def test_store_with_triplets_is_cached_and_reloaded(tmp_path):
    from scannet_jax.datasets import featurize

    names, structures = fixture_structures()
    settings = featurize.KnnLineGraphSettings()
    reads = []

    def read():
        reads.append(1)
        return structures, {"y": np.arange(len(names), dtype=float)}

    built = featurize.featurized_store("fixture_alignn", read, settings, cache_dir=tmp_path, num_workers=1)
    loaded = featurize.featurized_store("fixture_alignn", read, settings, cache_dir=tmp_path, num_workers=1)
    assert len(reads) == 1
    assert featurize.cache_path(tmp_path, "fixture_alignn", settings, False).name.startswith("knn1-k12-d8-lg1-")
    a, b = built.extras["triplets"], loaded.extras["triplets"]
    assert dict(b.refers) == dict(a.refers)
    np.testing.assert_array_equal(a.ptr, b.ptr)
    for field in a.fields:
        np.testing.assert_array_equal(a.fields[field], b.fields[field])
    np.testing.assert_array_equal(built.distances, loaded.distances)


def test_trainer_path_gives_the_fixture_path_predictions():
    """store -> BatchPlan -> Batch -> registered AlignnNet equals ALIGNN on pad_alignn_batch of the
    same structures with the reference's small weights, to 1e-6."""
    from scannet_jax import batching, models, parallel, steps
    from scannet_jax.alignn import ALIGNN, AlignnConfig
    from scannet_jax.datasets import featurize
    from scannet_jax.knn import knn_from_arrays
    from scannet_jax.line_graph import alignn_graphs, pad_alignn_batch
    from scannet_jax.torch_weights import load_alignn_state_dict

    names, structures = fixture_structures()
    meta = json.loads((FIXTURES / "meta.json").read_text())
    small = {k: v for k, v in meta["small_config"].items() if k != "name"}
    variables = load_alignn_state_dict(FIXTURES / "weights.pt", AlignnConfig(**small))
    store = featurize.build_store(structures, featurize.KnnLineGraphSettings(), targets={"y": np.zeros(len(names))},
                                  num_workers=1, progress=False)
    mesh = parallel.make_mesh()
    plan = batching.make_plan(store, np.arange(len(names)), "y", len(names), 1, mesh)
    stacked = plan.batch(np.arange(len(names)))
    batch = jax.tree.map(lambda x: x[0], stacked)
    assert isinstance(batch, batching.Batch) and steps.atom_graphs(batch) is batch.graphs
    net = models.build_model({"name": "alignn", **small})
    wrapped = {"params": {"alignn": variables["params"]}, "batch_stats": {"alignn": variables["batch_stats"]}}
    ours, scores = net.apply(wrapped, batch, train=False)
    assert scores is None
    bucket = plan.buckets[0]
    pairs = [alignn_graphs(s.numbers, knn_from_arrays(s.positions, s.cell, True)) for s in structures]
    graph, line = pad_alignn_batch(pairs, n_node=bucket.n_node, n_edge=bucket.n_edge,
                                   n_triplet=bucket.size("triplets"), n_graph=bucket.n_graph)
    reference = ALIGNN(AlignnConfig(**small)).apply(variables, graph, line, train=False)
    np.testing.assert_allclose(np.asarray(ours)[:len(names)], np.asarray(reference)[:len(names)], rtol=0, atol=1e-6)
    outputs = np.load(FIXTURES / "outputs.npz")
    np.testing.assert_allclose(np.asarray(ours)[:len(names)], outputs["prediction_single"], rtol=1e-5, atol=1e-5)
    # the trainer's predict step (shard_map over the mesh) gives the same numbers
    state = steps.create_train_state(net, __import__("optax").sgd(0.0), batch, 0.0, 1.0, 0)
    state = state.replace(params=wrapped["params"], model_state={"batch_stats": wrapped["batch_stats"]})
    made = steps.make_steps(mesh, {"name": "alignn", **small}, "mse", 0.0)
    predicted = made.predict(parallel.replicate(state, mesh), parallel.shard_batch(stacked, mesh))
    np.testing.assert_allclose(np.asarray(predicted)[0, :len(names)], np.asarray(ours)[:len(names)], atol=1e-6)


@pytest.fixture(scope="module")
def mp_run(tmp_path_factory):
    from scannet_jax.configs import mp as mp_config

    config = mp_config.get_config("e_form,tiny,alignn")
    config.num_epochs = 4
    config.batch_size = 8
    config.eval_batch_size = 8
    workdir = tmp_path_factory.mktemp("mp_alignn")
    data, results = train_on_mp_subset(config, workdir)
    return config, data, workdir, results


def test_tiny_alignn_trains_on_mp_crystals(mp_run):
    config, data, workdir, results = mp_run
    assert config.model.name == "alignn" and config.data.graph_builder == "knn_line_graph"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "val_mae" in r]
    assert len(epochs) == config.num_epochs
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert results["num_structures"] == {"train": 24, "validation": 8, "test": 8}
    for split in ("train", "validation", "test"):
        assert np.isfinite(results["mae"][split]) and np.isfinite(results["rmse"][split])
    assert results["compile_counts"]["train"] == 1


def test_alignn_checkpoint_restores_with_batch_stats(mp_run):
    from scannet_jax import batching, checkpoints, models, parallel, steps

    config, data, workdir, results = mp_run
    pretrained = checkpoints.load_pretrained(workdir)
    assert "batch_stats" in pretrained.model_state
    means = jax.tree.leaves(pretrained.model_state["batch_stats"])
    assert any(np.abs(np.asarray(m)).max() > 0 for m in means)  # the running statistics were trained
    mesh = parallel.make_mesh()
    plan = batching.make_plan(data.store, data.indices("test"), data.target, 8, 1, mesh)
    net = models.build_model(config.model)
    batch = jax.tree.map(lambda x: x[0], plan.batch(data.indices("test")))
    variables = {"params": pretrained.params, **pretrained.model_state}
    predictions, _ = steps.model_outputs(net.apply, variables, batch, pretrained.scaler["mean"],
                                         pretrained.scaler["std"])
    predictions = np.asarray(predictions)[:8]
    targets = data.store.targets[data.target][data.indices("test")]
    assert np.isfinite(predictions).all()
    # best/ holds the best-validation epoch; its test MAE is the one reported
    assert np.abs(predictions - targets).mean() == pytest.approx(results["mae"]["test"], rel=1e-4, abs=1e-6)


def test_alignn_config_and_registry():
    from scannet_jax.configs import mp as mp_config
    from scannet_jax import models

    config = mp_config.get_config("e_form,alignn")
    assert config.data.featurizer.to_dict() == {"cutoff": 8.0, "max_neighbors": 12}
    spec = models.get_spec("alignn")
    assert spec.node_scores is None and spec.num_elements(config.model.to_dict()) == 104
    defaults = spec.default_config()
    assert (defaults["alignn_layers"], defaults["gcn_layers"], defaults["hidden_features"],
            defaults["embedding_features"], defaults["edge_input_features"],
            defaults["triplet_input_features"]) == (4, 4, 256, 64, 80, 40)
    assert float(spec.regularizer({}, 1.0)) == 0.0
    with pytest.raises(ValueError, match="unknown key"):
        models.build_model({"name": "alignn", "hidden": 3})


def test_predictor_and_command_line_apply_an_alignn_workdir(mp_run, tmp_path, capsys):
    """`Predictor` builds the triplets the network needs from the workdir's graph builder; its
    predictions on the test crystals give the trainer's test MAE, batched or one at a time."""
    from scannet_jax import cli_predict, predict
    from scannet_jax.datasets import mp

    config, data, workdir, results = mp_run
    atoms, _ = mp.read("e_form")
    test = [atoms[int(i)] for i in data.indices("test")]
    predictor = predict.Predictor.from_workdir(workdir, batch_size=4, num_workers=1)
    batched = predictor(test, allow_unseen_elements=True)  # 24 training crystals miss some elements
    values = np.array([p.value for p in batched])
    targets = data.store.targets[data.target][data.indices("test")]
    assert np.abs(values - targets).mean() == pytest.approx(results["mae"]["test"], rel=1e-4, abs=1e-6)
    assert all(p.ga_scores is None for p in batched)
    np.testing.assert_allclose([predictor(a, allow_unseen_elements=True).value for a in test[:2]], values[:2], rtol=1e-5, atol=1e-6)
    predictor.close()

    path = tmp_path / "test.extxyz"
    ase.io.write(path, test[:3], format="extxyz")
    table = tmp_path / "table.json"
    assert cli_predict.main(["--workdir", str(workdir), str(path), "--json", str(table), "--num-workers", "1",
                             "--allow-unseen-elements"]) == 0
    assert "this network scores no atoms" in capsys.readouterr().err
    rows = json.loads(table.read_text())["structures"]
    np.testing.assert_allclose([r["prediction"] for r in rows], values[:3], rtol=1e-5, atol=1e-6)
    assert all(r["ga_scores"] is None and r["top_atoms"] == [] for r in rows)
