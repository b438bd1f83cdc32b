"""Pre-built models shipped in the package: their cards, what they predict, the command line,
fine-tuning from a name, and configs addressed by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk

REPO = Path(__file__).resolve().parents[1]
CARD_KEYS = ("description", "training", "commands", "hardware", "time", "paper_test_mae", "target", "units",
             "structures", "best_epoch", "mae", "config", "code_version")
# Materials Project PBE formation energies per atom (eV/atom), rounded: the elements are 0 by
# definition; NaCl and MgO as in the MP database (mp-22862, mp-1265).
MP_FORMATION_ENERGY = {"ClNa": -2.10, "MgO": -3.05, "Si2": 0.0, "Cu": 0.0}


def crystals():
    return [bulk("NaCl", "rocksalt", a=5.64), bulk("MgO", "rocksalt", a=4.21), bulk("Si", "diamond", a=5.43),
            bulk("Cu", "fcc", a=3.61)]


def test_every_shipped_model_has_a_complete_card_and_a_best_checkpoint():
    from scannet_jax import checkpoints, pretrained

    names = pretrained.names()
    assert {"scannplus-mp-e_form", "scannplus-mp-gap", "scannplus-qm9-gap", "scannplus-qm9-homo",
            "scannplus-qm9-lumo"} <= set(names)
    for name in names:
        folder = pretrained.path(name)
        card = pretrained.card(name)
        assert card["name"] == name and all(card.get(k) not in (None, "") for k in CARD_KEYS), name
        assert np.isfinite(card["mae"]["test"]) and card["structures"]["test"] > 0
        assert card["time"]["wall_h"] > 0 and card["time"]["cpu_h"] > 0
        text = (folder / pretrained.CARD_TEXT).read_text()
        assert card["commands"] in text and f"{card['mae']['test']:.4g}" in text
        for f in pretrained.WORKDIR_FILES:
            assert (folder / f).is_file()
        steps = [p.name for p in (folder / checkpoints.BEST_DIR).iterdir()]
        assert steps == [str(card["best_epoch"])]
        assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 8 * 2**20  # compact


def test_formation_energy_model_predicts_known_crystals():
    from scannet_jax import predict

    predictor = predict.Predictor.pretrained("scannplus-mp-e_form")
    results = predictor(crystals())
    for atoms, result in zip(crystals(), results):
        reference = MP_FORMATION_ENERGY[atoms.get_chemical_formula()]
        assert abs(result.value - reference) < 0.2, (atoms.get_chemical_formula(), result.value)
        assert result.ga_scores.shape == (len(atoms),) and np.isclose(result.ga_scores.sum(), 1.0)
    # The shipped weights and the featuriser path, pinned (float32 through XLA).
    np.testing.assert_allclose([r.value for r in results], [-2.00212, -2.929496, 0.023218, 0.058569], atol=2e-5)
    # A crystal is the same crystal in a supercell.
    assert abs(predictor(crystals()[0].repeat((2, 1, 1))).value - results[0].value) < 1e-3


def test_band_gap_model_is_pinned():
    from scannet_jax import predict

    results = predict.Predictor.pretrained("scannplus-mp-gap")(crystals())
    np.testing.assert_allclose([r.value for r in results], [3.267585, 2.592173, 1.905811, 0.724878], atol=2e-5)


def test_qm9_orbital_models_are_pinned_and_order_the_orbitals():
    from ase.build import molecule

    from scannet_jax import predict

    molecules = [molecule(name) for name in ("C6H6", "H2O", "CH3CH2OH", "HCN")]
    homo = [r.value for r in predict.Predictor.pretrained("scannplus-qm9-homo")(molecules)]
    lumo = [r.value for r in predict.Predictor.pretrained("scannplus-qm9-lumo")(molecules)]
    np.testing.assert_allclose(homo, [-6.199852, -8.091148, -7.170643, -9.940467], atol=2e-5)
    np.testing.assert_allclose(lumo, [-0.125944, 1.918497, 2.030339, 0.404035], atol=2e-5)
    assert all(h < l for h, l in zip(homo, lumo))  # the HOMO lies below the LUMO
    gap = [r.value for r in predict.Predictor.pretrained("scannplus-qm9-gap")(molecules)]
    np.testing.assert_allclose(gap, [6.722422, 9.189469, 9.110997, 9.770474], atol=2e-5)
    # three separately trained models agree: gap ≈ LUMO − HOMO (ASE's geometries, not QM9's)
    np.testing.assert_allclose(gap, np.subtract(lumo, homo), atol=1.0)
    card = predict.Predictor.pretrained("scannplus-qm9-homo")
    assert card.domain.periodic is False and card.units == "eV"


def test_unknown_model_name_lists_the_available_ones():
    from scannet_jax import predict, pretrained

    with pytest.raises(ValueError, match=r"no pre-built model 'homo'; available: .*scannplus-mp-e_form"):
        predict.Predictor.pretrained("homo")
    assert pretrained.resolve("scannplus-mp-gap") == str(pretrained.path("scannplus-mp-gap"))
    assert pretrained.resolve("runs/some_workdir") == "runs/some_workdir"  # not a name: left to the caller


def test_export_writes_a_model_that_predicts_like_its_workdir(tmp_path):
    """A pre-built model is a workdir's best checkpoint and files: export one from the shipped
    one (used as a workdir) and compare."""
    from scannet_jax import predict, pretrained

    source = pretrained.path("scannplus-mp-e_form")
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    card = pretrained.card("scannplus-mp-e_form")
    results = {"target": card["target"], "num_structures": card["structures"], "best_epoch": card["best_epoch"],
               "epochs_run": card["epochs_run"], "mae": card["mae"], "config": card["config"]}
    with pytest.raises(FileNotFoundError, match="missing: results.json"):
        pretrained.export(workdir, "mine", {}, root=tmp_path / "models")
    (workdir / "results.json").write_text(json.dumps(results))
    out = pretrained.export(workdir, "mine", {"description": "a test"}, root=tmp_path / "models")
    assert pretrained.names(tmp_path / "models") == ["mine"] and not list((tmp_path / "models").glob(".mine-*"))
    assert pretrained.card("mine", tmp_path / "models")["mae"] == card["mae"]
    a = predict.Predictor.from_workdir(out)(crystals()[:2])
    b = predict.Predictor.pretrained("scannplus-mp-e_form")(crystals()[:2])
    assert [x.value for x in a] == [y.value for y in b]


def test_fine_tuning_starts_from_a_pre_built_model_by_name(tmp_path):
    import jax

    from scannet_jax import checkpoints, pretrained, train
    from scannet_jax.configs import mp

    config = mp.get_config("gap")
    config.data.data_dir = str(tmp_path)
    config.init_from = "scannplus-mp-gap"
    config.batch_size = config.eval_batch_size = 8
    config.num_buckets = 1
    data = train.get_datasets(config)
    data.splits = {k: v[:16] for k, v in data.splits.items()}
    state = train.setup(config, data).state
    shipped = checkpoints.load_pretrained(pretrained.path("scannplus-mp-gap")).params
    assert jax.tree.structure(shipped) == jax.tree.structure(state.params)
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(shipped), jax.tree.leaves(state.params)))


def test_command_line_lists_models_and_predicts_with_one(tmp_path):
    cif = tmp_path / "nacl.cif"
    crystals()[0].write(cif)
    table = tmp_path / "table.json"
    listing = subprocess.run(["scannet-jax", "predict", "--list-models"], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "scannplus-mp-e_form" in listing.stdout and "formation_energy_per_atom" in listing.stdout
    run = subprocess.run(["scannet-jax", "predict", "--model=scannplus-mp-e_form", str(cif), f"--json={table}"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = json.loads(table.read_text())["structures"]
    assert len(rows) == 1 and abs(rows[0]["prediction"] - (-2.00212)) < 1e-4
    bad = subprocess.run(["scannet-jax", "predict", "--model=nope", str(cif)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode != 0 and "available: " in bad.stderr and "Traceback" not in bad.stderr


def test_configs_are_addressed_by_name_or_path():
    from scannet_jax import cli, configs

    assert {"qm9", "mp", "files", "fullerene", "pt_graphene"} <= set(configs.names())
    assert configs.resolve("qm9:homo,tiny") == f"{configs.CONFIG_DIR / 'qm9'}.py:homo,tiny"
    assert configs.resolve("configs/qm9.py:homo") == "configs/qm9.py:homo"  # a path, relative to the checkout
    assert cli.resolve_config_flag(["prog", "--config", "mp:gap", "--workdir=x"])[2] == \
        f"{configs.CONFIG_DIR / 'mp'}.py:gap"
    with pytest.raises(ValueError, match="'qm10' is neither a config file nor a packaged config's name"):
        configs.resolve("qm10:homo")
    # The checkout's entry-point files give the packaged configs.
    sys.path.insert(0, str(REPO))
    import configs.qm9 as shim  # noqa: E402

    from scannet_jax.configs import qm9

    assert shim.get_config("lumo").to_dict() == qm9.get_config("lumo").to_dict()
