"""Tests of scannet_jax.datasets.md: group-aware splits and the MD data set loader."""

import dataclasses
import json
import math

import numpy as np
import pytest

from scannet_jax.datasets import featurize, md, xyz


def sources(counts):
    """(file, frame) pairs for files C60_T<500·k>K_r0.xyz.gz with the given frame counts."""
    return [(f"/d/C60_T{500 * (k + 1):04d}K_r0.xyz.gz", f) for k, n in enumerate(counts) for f in range(n)]


def test_group_labels():
    src = [("/d/C60_T0500K_r0.xyz.gz", 0), ("/d/C70_T3000K_r1.xyz.gz", 4)]
    assert md.group_labels(src, "trajectory") == ["/d/C60_T0500K_r0.xyz.gz", "/d/C70_T3000K_r1.xyz.gz"]
    assert md.group_labels(src, "temperature") == ["500K", "3000K"]
    assert md.group_labels(src, "structure") == ["/d/C60_T0500K_r0.xyz.gz#0", "/d/C70_T3000K_r1.xyz.gz#4"]
    with pytest.raises(ValueError, match=r"/d/mine.xyz: no temperature .* split by trajectory"):
        md.group_labels([("/d/mine.xyz", 0)], "temperature")
    with pytest.raises(ValueError, match="unknown grouping 'random'"):
        md.group_labels(src, "random")


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_by_group_never_cuts_a_group(seed):
    groups = md.group_labels(sources([90] * 24), "trajectory")
    splits = md.split_by_group(groups, seed)
    everything = np.concatenate([splits[s] for s in md.SPLITS])
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(groups)))  # a partition
    owner = {}
    for name in md.SPLITS:
        for g in {groups[i] for i in splits[name]}:
            assert owner.setdefault(g, name) == name, f"group {g} in two splits"
    # 24 equal groups: 80 % -> 20 groups (first to reach 0.8), then 2 more to reach 0.9, 2 left.
    assert [len({groups[i] for i in splits[s]}) for s in md.SPLITS] == [20, 2, 2]
    again = md.split_by_group(groups, seed)
    for name in md.SPLITS:
        np.testing.assert_array_equal(splits[name], again[name])


def test_split_by_group_small_and_degenerate():
    groups = md.group_labels(sources([10, 10, 10]), "temperature")
    splits = md.split_by_group(groups, 0)
    assert sorted(len(splits[s]) for s in md.SPLITS) == [10, 10, 10]  # one group each
    with pytest.raises(ValueError, match=r"2 group\(s\) \(1000K, 500K\): need at least 3"):
        md.split_by_group(md.group_labels(sources([10, 10]), "temperature"), 0)


def test_read_function_formats(tmp_path):
    path = tmp_path / "m.xyz"
    path.write_text("1\n2.5 -1.0\nH 0 0 0\n")
    data = md.read_function("property_xyz", ["a", "b"])(path)
    np.testing.assert_array_equal(data.targets["b"], [-1.0])
    with pytest.raises(ValueError, match="unknown file format 'cif'"):
        md.read_function("cif", ["a"])


def test_generated_files_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown generated data set 'qm9'"):
        md.generated_files("qm9")
    with pytest.raises(ValueError, match="no \\*.xyz.gz chunk files"):
        md.generated_files("fullerene", tmp_path)


def test_load_structure_files_builds_store_and_group_splits(tmp_path):
    from scannet_jax import neighbors
    frame = "3\n{e} 0.5\nO 0.0 0.0 {z}\nH 0.0 0.76 -0.47\nH 0.0 -0.76 -0.47\n"
    paths = []
    for k in range(3):
        path = tmp_path / f"w_T{300 * (k + 1)}K_r0.xyz"
        path.write_text("".join(frame.format(e=-k - 0.1 * f, z=0.1 + 0.01 * f) for f in range(2)))
        paths.append(path)
    reader = md.read_function("property_xyz", ["energy", "gap"])
    store, splits = md.load_structure_files("water", paths, reader, neighbors.FeaturizerSettings(),
                                            group_by="temperature", cache_dir=tmp_path / "cache",
                                            num_workers=1)
    np.testing.assert_allclose(store.targets["energy"], [0.0, -0.1, -1.0, -1.1, -2.0, -2.1])
    assert sorted(len(splits[s]) for s in md.SPLITS) == [2, 2, 2]
    for name in md.SPLITS:  # the two frames of one file stay together
        assert splits[name][1] == splits[name][0] + 1 and splits[name][0] % 2 == 0
    assert store.n_node.tolist() == [3] * 6


@pytest.mark.parametrize("module, arg", [
    ("fullerene", "lumo,split=temperature"),
    ("pt_graphene", "energy"),
    ("files", "gap,paths=a/*.xyz;b.xyz,format=property_xyz,columns=homo:gap,split=structure"),
])
def test_configs_map_onto_md_load(module, arg):
    import importlib

    config_module = importlib.import_module(f"scannet_jax.configs.{module}")
    config = config_module.get_config(arg)
    data = config.data
    assert data.dataset in ("fullerene", "pt_graphene", "files")
    assert data.group_by in md.GROUPINGS
    assert data.molecules is True
    from scannet_jax.configs import qm9

    assert set(data.keys()) == set(qm9.get_config("homo").data.keys())  # one schema for every data set
    assert data.limit == 0  # QM9 only
    if data.dataset == "files":
        assert data.paths == "a/*.xyz,b.xyz" and data.columns.split(":") == ["homo", "gap"]
        md.read_function(data.file_format, data.columns.split(":"))  # a known format
    else:
        names = {"fullerene": xyz.FULLERENE_PROPERTIES,
                 "pt_graphene": xyz.PT_GRAPHENE_PROPERTIES + ("energy",)}[data.dataset]
        assert set(config_module.TARGET_UNITS) == set(names)  # the targets the reader returns
    assert config.model.use_ga_norm is (module != "fullerene")
    assert config.data.featurizer.min_solid_angle == (0.2 if module == "pt_graphene" else 0.4)


def test_files_config_errors():
    from scannet_jax.configs import files

    with pytest.raises(ValueError, match="name the target"):
        files.get_config("paths=x.xyz")
    with pytest.raises(ValueError, match="target 'gap' is not among columns"):
        files.get_config("gap,paths=x.xyz,columns=homo:lumo")
    with pytest.raises(ValueError, match="unknown format 'cif'"):
        files.get_config("gap,paths=x.cif,format=cif")


@dataclasses.dataclass(frozen=True)
class FakeSettings:
    """Stands in for neighbors.FeaturizerSettings (registered with `fake_builder`; `key()` names caches)."""

    cutoff: float = 2.0

    def key(self) -> str:
        return f"fake-cutoff{self.cutoff}"


def pairs_within_cutoff(structure, settings, ring):
    """A stand-in for the Voronoi featuriser: every ordered pair closer than the cutoff."""
    d = np.linalg.norm(structure.positions[:, None] - structure.positions[None], axis=-1)
    receivers, senders = np.nonzero((d < settings.cutoff) & (d > 0))
    if structure.positions[0, 2] > 5.0:
        raise RuntimeError("atom 0 floats away")
    ones = np.ones(len(receivers), np.float32)
    return featurize.Featurized(receivers.astype(np.int32), senders.astype(np.int32),
                                d[receivers, senders].astype(np.float32), ones, ones, None)


@pytest.fixture
def fake_builder(monkeypatch):
    """Registers `pairs_within_cutoff` as the graph builder of `FakeSettings` for one test."""
    def build(structure, settings):
        return pairs_within_cutoff(structure, settings, False)

    builder = featurize.GraphBuilder(FakeSettings, build)
    monkeypatch.setitem(featurize.GRAPH_BUILDERS, "fake_pairs", builder)


def water_files(tmp_path, z=0.1):
    frame = "3\n{e} 0.5\nO 0.0 0.0 {z}\nH 0.0 0.76 -0.47\nH 0.0 -0.76 -0.47\n"
    paths = []
    for k in range(3):
        path = tmp_path / f"w_T{300 * (k + 1)}K_r0.xyz"
        path.write_text("".join(frame.format(e=-k - 0.1 * f, z=z + 0.01 * f) for f in range(2)))
        paths.append(path)
    return paths


def test_load_structure_files_store_splits_and_cache(tmp_path, monkeypatch, fake_builder):
    calls = []
    monkeypatch.setattr(featurize, "featurize_one", lambda *a: calls.append(1) or pairs_within_cutoff(*a))
    paths = water_files(tmp_path)
    reader = md.read_function("property_xyz", ["energy", "gap"])
    kwargs = dict(group_by="temperature", cache_dir=tmp_path / "cache", num_workers=1)
    store, splits = md.load_structure_files("water", paths, reader, FakeSettings(), **kwargs)
    np.testing.assert_allclose(store.targets["energy"], [0.0, -0.1, -1.0, -1.1, -2.0, -2.1])
    np.testing.assert_array_equal(store.index, np.arange(6))
    np.testing.assert_array_equal(store.n_node, [3] * 6)
    np.testing.assert_array_equal(store.n_edge, [6] * 6)  # all ordered pairs are within 2 Å
    assert sorted(len(splits[s]) for s in md.SPLITS) == [2, 2, 2]
    for name in md.SPLITS:  # the two frames of one file stay together
        assert splits[name][1] == splits[name][0] + 1 and splits[name][0] % 2 == 0
    assert len(calls) == 6

    again, _ = md.load_structure_files("water", paths, reader, FakeSettings(), **kwargs)
    assert len(calls) == 6  # served from the cache
    np.testing.assert_array_equal(again.targets["energy"], store.targets["energy"])

    paths[1].write_text(paths[1].read_text().replace("-1.1 0.5", "-1.25 0.5"))
    changed, _ = md.load_structure_files("water", paths, reader, FakeSettings(), **kwargs)
    assert len(calls) == 12  # a changed file is featurised again
    assert changed.targets["energy"][3] == -1.25


def test_featurisation_error_names_file_and_frame(tmp_path, monkeypatch):
    monkeypatch.setattr(featurize, "featurize_one", pairs_within_cutoff)
    paths = water_files(tmp_path, z=4.995)  # frame 1 of each file has z = 5.005
    reader = md.read_function("property_xyz", ["energy", "gap"])
    with pytest.raises(featurize.FeaturizationError,
                       match=rf"{paths[0]}: frame 1 \(0-based\): RuntimeError: atom 0 floats away"):
        md.load_structure_files("water", paths, reader, FakeSettings(), cache_dir=tmp_path / "c",
                                num_workers=1)


def md_load_from_config(config, settings, **data_overrides):
    """``train.get_datasets`` of ``config`` with ``FakeSettings`` in place of the featuriser's."""
    from scannet_jax import train

    config = config.copy_and_resolve_references()
    config.data.update(data_overrides)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("scannet_jax.datasets.featurize.graph_settings", lambda *_: settings)
        data = train.get_datasets(config)
    return data.store, data.splits


def test_configs_load_through_md_load(tmp_path, monkeypatch, fake_builder):
    from scannet_jax.configs import files, fullerene

    monkeypatch.setattr(featurize, "featurize_one", pairs_within_cutoff)
    water_files(tmp_path)
    config = files.get_config(f"gap,paths={tmp_path}/w_T*K_r0.xyz,columns=energy:gap,split=temperature")
    store, splits = md_load_from_config(config, FakeSettings(), data_dir=str(tmp_path / "cache"),
                                        num_workers=1)
    assert len(store.targets["gap"]) == 6 and sorted(len(v) for v in splits.values()) == [2, 2, 2]

    # The shipped fullerene chunks: whole trajectories per split, every frame present.
    config = fullerene.get_config("homo")
    store, splits = md_load_from_config(config, FakeSettings(cutoff=1.9), data_dir=str(tmp_path / "cache"),
                                        num_workers=1)
    assert sum(len(v) for v in splits.values()) == len(store.targets["homo"])
    assert np.median(store.n_edge / store.n_node) == 3.0  # cages: three bonds per carbon
    with pytest.raises(ValueError, match="unknown MD/file data set 'qm9'"):
        md.load("qm9", FakeSettings())


# --------------------------------------------------------------------------------------------
# Training on the MD data sets through train.get_datasets / train.train_and_evaluate.


def chunk_slice(dataset, dest, chunks, frames):
    """The first ``frames`` frames of the first ``chunks`` shipped chunk files, copied to ``dest``."""
    import gzip

    dest.mkdir()
    for path in md.generated_files(dataset)[:chunks]:
        lines = gzip.open(path, "rt").read().splitlines(keepends=True)
        n_atoms = int(lines[0])
        with gzip.open(dest / path.name, "wt") as f:
            f.writelines(lines[:frames * (n_atoms + 2)])
    return dest


def tiny_md_run(config, tmp_path):
    """``config`` cut down to a few steps on CPU; cache and workdir under ``tmp_path``."""
    config.data.data_dir = str(tmp_path / "cache")
    config.data.num_workers = 1
    config.num_epochs = 2
    config.batch_size = 8
    config.num_buckets = 1
    config.checkpoint_every_steps = 0
    config.log_every_steps = 2
    return config


def assert_trains(config, tmp_path, datasets):
    from scannet_jax import train

    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["num_structures"] == {name: len(datasets.split(name)) for name in train.SPLITS}
    assert saved["steps_run"] == 2 * math.ceil(len(datasets.train) / config.batch_size)
    assert np.isfinite(saved["test_mae"]) and saved["test_mae"] == results["test_mae"]
    assert saved["target_scaler"]["mean"] == pytest.approx(datasets.mean)


@pytest.mark.parametrize("module, arg, chunks, frames", [
    ("fullerene", "homo,tiny", 4, 5),
    ("pt_graphene", "energy,tiny", 3, 4),
])
def test_generated_data_set_trains(module, arg, chunks, frames, tmp_path):
    import importlib

    import ase

    from scannet_jax import neighbors, train

    config = importlib.import_module(f"scannet_jax.configs.{module}").get_config(arg)
    config = tiny_md_run(config, tmp_path)
    config.data.source_dir = str(chunk_slice(config.data.dataset, tmp_path / "chunks", chunks, frames))
    datasets = train.get_datasets(config)
    assert sum(len(datasets.split(s)) for s in train.SPLITS) == chunks * frames
    for name in train.SPLITS:  # whole trajectories: each split holds multiples of `frames`
        assert len(datasets.split(name)) % frames == 0 and len(datasets.split(name)) > 0
    # targets as the reader gives them, standardised with the training split as for QM9
    reader = {"fullerene": xyz.read_fullerene, "pt_graphene": xyz.read_pt_graphene}[module]
    raw = xyz.read_files(sorted((tmp_path / "chunks").glob("*.xyz.gz")), reader)
    target = config.data.target
    train_values = raw.targets[target][datasets.train.index]
    np.testing.assert_array_equal(datasets.train.targets[target], train_values)
    assert (datasets.mean, datasets.std) == pytest.approx((train_values.mean(), train_values.std()))
    # featurised as molecules (no cell, no periodic images), with the config's featuriser settings
    first = raw.structures[int(datasets.test.index[0])]
    assert not first.pbc.any()
    f = config.data.featurizer
    expected = neighbors.voronoi_neighbors(ase.Atoms(numbers=first.numbers, positions=first.positions),
                                           cutoff=f.cutoff, min_solid_angle=f.min_solid_angle,
                                           min_relative_weight=f.min_relative_weight, mode=f.mode)
    lo, hi = datasets.test.edge_ptr[:2]
    np.testing.assert_allclose(datasets.test.distances[lo:hi], expected.distances, rtol=1e-6)
    np.testing.assert_array_equal(datasets.test.senders[lo:hi], expected.senders)
    assert_trains(config, tmp_path, datasets)
    # the workdir records what the model was trained on; predict refuses anything else
    from ase.build import bulk, molecule

    from scannet_jax import predict

    domain = json.loads((tmp_path / "run" / "domain.json").read_text())
    assert domain == {"elements": {"fullerene": [6], "pt_graphene": [1, 6, 78]}[module], "periodic": False,
                      "max_atoms": max(len(s.numbers) for s in raw.structures)}
    predictor = predict.Predictor.from_workdir(tmp_path / "run", num_workers=1)
    assert np.isfinite(predictor(ase.Atoms(first.numbers, first.positions)).value)
    with pytest.raises(predict.StructureError, match=r"element\(s\) O \(first: atom 0\) never seen in training"):
        predictor(molecule("CO"))
    with pytest.raises(predict.StructureError, match="a periodic structure .* given to a molecule model"):
        predictor(bulk("C", "diamond", a=3.57))


def test_files_config_featurises_periodic_extxyz_and_trains(tmp_path):
    """One atom per simple cubic cell: only its periodic images are neighbours (6 faces, d = a)."""
    from scannet_jax.configs import files

    from scannet_jax import train

    lattice = np.linspace(2.8, 3.4, 12)
    path = tmp_path / "sc.extxyz"
    path.write_text("".join(f'1\nLattice="{a} 0 0 0 {a} 0 0 0 {a}" pbc="T T T" energy={-a ** 2:.6f}\n'
                            f"Po 0.1 0.2 0.3\n" for a in lattice))
    config = files.get_config(f"energy,paths={path},format=extxyz,split=structure,periodic,tiny")
    assert config.data.molecules is False
    config = tiny_md_run(config, tmp_path)
    datasets = train.get_datasets(config)
    everything = [datasets.split(s) for s in train.SPLITS]
    index = np.concatenate([d.index for d in everything])
    np.testing.assert_array_equal(np.sort(index), np.arange(12))
    for store in everything:
        np.testing.assert_array_equal(store.n_edge, 6)
        np.testing.assert_array_equal(store.senders, 0)
        np.testing.assert_allclose(store.distances, np.repeat(lattice[store.index], 6), rtol=1e-6)
        np.testing.assert_allclose(store.solid_angles, 4 * np.pi / 6, rtol=1e-5)
        np.testing.assert_allclose(store.targets["energy"], -lattice[store.index] ** 2, atol=1e-6)
    assert_trains(config, tmp_path, datasets)
    # files keep their own periodicity: every structure read was a crystal, so the model is a
    # crystal model (recorded when the store was featurised) and refuses a molecule
    from ase import Atoms
    from ase.build import bulk

    from scannet_jax import predict

    assert datasets.store.metadata["periodic"] is True
    domain = json.loads((tmp_path / "run" / "domain.json").read_text())
    assert domain == {"elements": [84], "periodic": True, "max_atoms": 1}
    predictor = predict.Predictor.from_workdir(tmp_path / "run", num_workers=1)
    assert np.isfinite(predictor(bulk("Po", "sc", a=3.1)).value)
    with pytest.raises(predict.StructureError, match="a non-periodic structure given to a crystal model"):
        predictor(Atoms("Po2", positions=[[0, 0, 0], [0, 0, 3.1]]))


def test_files_of_mixed_periodicity_record_none(tmp_path):
    """A data set mixing crystals and molecules gives a model of unknown periodicity (not checked)."""
    from scannet_jax.datasets import featurize
    from scannet_jax.structures import Structure

    crystal = Structure(np.array([84]), np.zeros((1, 3)), 3.1 * np.eye(3), np.ones(3, bool))
    molecule = Structure(np.array([1, 1]), np.array([[0.0, 0, 0], [0, 0, 0.74]]))
    assert featurize.periodicity([crystal, crystal]) is True
    assert featurize.periodicity([molecule]) is False
    assert featurize.periodicity([crystal, molecule]) is None
    settings = featurize.graph_settings("voronoi", {})
    store = featurize.featurized_store("mixed", lambda: ([crystal, molecule], {"y": [1.0, 2.0]}), settings,
                                       cache_dir=tmp_path, num_workers=1)
    again = featurize.featurized_store("mixed", lambda: pytest.fail("the cache should be used"), settings,
                                       cache_dir=tmp_path, num_workers=1)
    assert store.metadata["periodic"] is None and again.metadata["periodic"] is None


def test_unknown_data_set_names_the_known_ones():
    from scannet_jax.configs import fullerene

    from scannet_jax import train

    config = fullerene.get_config("homo")
    config.data.dataset = "fulerene"
    with pytest.raises(ValueError, match=r"dataset='fulerene': unknown data set; known: files, fullerene, "
                                         r"mp_e_form, mp_gap, pt_graphene, qm9"):
        train.get_datasets(config)
