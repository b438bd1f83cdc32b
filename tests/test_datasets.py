"""The one on-disk path of every data set: `featurize.featurized_store` and the registry's loaders."""

import numpy as np
import pytest

from scannet_jax import datasets
from scannet_jax.datasets import featurize, mp
from scannet_jax.graphs import GraphStore
from scannet_jax.neighbors import FeaturizerSettings
from scannet_jax.structures import molecule

WATER = molecule(np.array([8, 1, 1]), np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
METHANE = molecule(np.array([6, 1, 1, 1, 1]), np.array(
    [[0.0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]]))


def test_featurized_store_reads_only_to_build(tmp_path):
    reads = []

    def read():
        reads.append(1)
        return [WATER, METHANE], {"energy": np.array([-1.5, np.nan])}

    settings = FeaturizerSettings()
    store = featurize.featurized_store("toy", read, settings, ring=True, cache_dir=tmp_path, num_workers=1)
    assert reads == [1] and store.n_node.tolist() == [3, 5] and store.index.tolist() == [0, 1]
    np.testing.assert_array_equal(store.targets["energy"], [-1.5, np.nan])
    want = featurize.featurize_one(METHANE, settings, ring=True)
    np.testing.assert_array_equal(store.graph(1).edges["solid_angles"], want.solid_angles)
    path = featurize.cache_path(tmp_path, "toy", settings, ring=True) / "graphs"
    assert GraphStore.load(path, expect=featurize.cache_metadata("toy", settings, ring=True)).num_structures == 2
    again = featurize.featurized_store("toy", read, settings, ring=True, cache_dir=tmp_path, num_workers=1)
    assert reads == [1]
    np.testing.assert_array_equal(again.distances, store.distances)


def test_featurized_store_names_the_failing_structure(tmp_path, monkeypatch):
    def fail_on_carbon(structure, settings, ring):
        if 6 in structure.numbers:
            raise ValueError("no Voronoi cell")
        return featurize.Featurized(*(np.zeros(0, dt) for dt in ("i4", "i4", "f4", "f4", "f4")), None)

    monkeypatch.setattr(featurize, "featurize_one", fail_on_carbon)
    with pytest.raises(featurize.FeaturizationError, match="methane #1: ValueError: no Voronoi cell") as err:
        featurize.featurized_store("toy", lambda: ([WATER, METHANE], {}), FeaturizerSettings(),
                                   cache_dir=tmp_path, num_workers=1, describe=lambda k: f"methane #{k}")
    assert err.value.position == 1
    assert not (featurize.cache_path(tmp_path, "toy", FeaturizerSettings(), ring=False) / "graphs").exists()


def test_mp_loader_names_the_crystal_that_failed(tmp_path, monkeypatch):
    atoms, _ = mp.read("gap")
    calls = []

    def fail_on_third(structure, settings, ring):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("no Voronoi cell")
        return featurize.Featurized(*(np.zeros(0, dt) for dt in ("i4", "i4", "f4", "f4", "f4")), None)

    monkeypatch.setattr(featurize, "featurize_one", fail_on_third)
    with pytest.raises(featurize.FeaturizationError, match=f"gap crystal 2 \\({atoms[2].info['material_id']}\\)"):
        datasets.load("mp_gap", featurizer=FeaturizerSettings(cutoff=6.0), cache_dir=tmp_path, num_workers=1)
