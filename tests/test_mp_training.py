"""The Materials Project sets through the one data set path: featurised as crystals, the stored
split, training with configs/mp.py, and a crystal model's domain in predict."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ase
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def gap_run(tmp_path_factory):
    from scannet_jax.configs import mp
    from scannet_jax import train

    config = mp.get_config("gap,tiny")
    config.data.data_dir = str(tmp_path_factory.mktemp("cache"))
    config.num_epochs = 1
    config.batch_size = 64
    config.num_buckets = 1
    config.checkpoint_every_steps = 0
    data = train.get_datasets(config)
    workdir = tmp_path_factory.mktemp("mp_gap")
    results = train.train_and_evaluate(config, str(workdir), data=data)
    return config, data, workdir, results


def test_recipe_is_the_originals_mp2018():
    from scannet_jax.configs import mp

    config = mp.get_config("e_form")
    assert (config.data.dataset, config.data.target, config.data.units) == (
        "mp_e_form", "formation_energy_per_atom", "eV/atom")
    assert (config.data.featurizer.cutoff, config.model.gaussian_d, config.model.n_atoms) == (6.0, 6.0, 95)
    assert not config.data.standardize and config.model.use_ga_norm and config.model.name == "scannplus"
    assert mp.get_config("gap,scann").model.name == "scann"
    with pytest.raises(ValueError, match="unknown set 'egap'"):
        mp.get_config("egap")


def test_gap_set_is_featurised_as_crystals_with_the_stored_split(gap_run):
    import ase

    from scannet_jax import neighbors
    from scannet_jax.datasets import mp

    config, data, _, _ = gap_run
    atoms, splits = mp.read("gap")
    assert len(data.store) == len(atoms) == 1056
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(data.indices(name), splits[name])
    np.testing.assert_array_equal(data.store.targets["band_gap"], [a.info["band_gap"] for a in atoms])
    assert (data.mean, data.std) == (0.0, 1.0)  # not standardised
    k = int(splits["test"][0])
    f = config.data.featurizer
    expected = neighbors.voronoi_neighbors(atoms[k], cutoff=f.cutoff, min_solid_angle=f.min_solid_angle,
                                           min_relative_weight=f.min_relative_weight, mode=f.mode)
    graph = data.store.graph(k)
    np.testing.assert_array_equal(graph.senders, expected.senders)
    np.testing.assert_allclose(graph.edges["solid_angles"], expected.solid_angles, rtol=1e-6)
    assert isinstance(atoms[k], ase.Atoms) and atoms[k].pbc.all()


def test_gap_trains_and_its_model_refuses_molecules(gap_run):
    from ase.build import bulk, molecule

    from scannet_jax import predict

    _, data, workdir, results = gap_run
    assert results["num_structures"] == {"train": 845, "validation": 106, "test": 105}
    assert np.isfinite(results["test_mae"]) and results["units"] == "eV"
    domain = json.loads((workdir / "domain.json").read_text())
    assert domain["periodic"] is True and domain["max_atoms"] == int(data.store.n_node.max())
    predictor = predict.Predictor.from_workdir(workdir, num_workers=1)
    silicon = predictor(bulk("Si", "diamond", a=5.43))
    assert np.isfinite(silicon.value) and silicon.ga_scores.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(predict.StructureError, match="a non-periodic structure given to a crystal model"):
        predictor(molecule("H2O"))


def test_oxides_only_keeps_each_splits_oxides():
    from scannet_jax.datasets import mp

    atoms, splits = mp.read("gap")
    oxides, oxide_splits = mp.oxides(atoms, splits)
    assert len(oxides) == 218 and {k: len(v) for k, v in oxide_splits.items()} == {
        "train": 174, "validation": 20, "test": 24}
    assert all(8 in a.numbers and len(set(a.numbers)) > 1 for a in oxides)
    for split, index in splits.items():  # the same crystals, split by split
        expected = [atoms[k].info["material_id"] for k in index if mp.is_oxide(atoms[k])]
        assert [oxides[k].info["material_id"] for k in oxide_splits[split]] == expected
    assert not mp.is_oxide(ase.Atoms("O2", cell=np.eye(3) * 4, pbc=True))  # oxygen alone is no oxide


def test_megnet_and_amdnet_recipes_build_their_networks():
    from scannet_jax import models
    from scannet_jax.configs import mp as mp_config

    for arg, builder in (("gap,amdnet", "motif_dual"), ("gap,megnet,oxides", "radius"),
                         ("e_form,amdnet,tiny", "motif_dual")):
        config = mp_config.get_config(arg)
        assert config.data.graph_builder == builder and config.data.oxides_only
        assert (config.optimizer.name, config.loss, config.patience) == ("adam", "mse", 100)
        models.build_model(config.model)  # every key is one of the network's hyper-parameters
    assert mp_config.get_config("gap,tiny,amdnet").optimizer.lr == 1e-2
    assert mp_config.get_config("gap,amdnet").optimizer.lr == 5e-5
    assert mp_config.get_config("gap").data.oxides_only is False


def test_a_config_saved_before_oxides_only_still_reads():
    import ml_collections

    from scannet_jax import train
    from scannet_jax.configs import mp as mp_config

    saved = mp_config.get_config("gap").to_dict()
    del saved["data"]["oxides_only"]
    assert train.data_source(ml_collections.ConfigDict(saved).data).oxides_only is False
