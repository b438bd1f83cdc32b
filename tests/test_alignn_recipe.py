"""ALIGNN's reference training recipe (zoo-reference.md §1.10): the one-cycle schedule, AdamW with
the reference's parameter groups, the configs that select them, and a tiny run through the
trainer. The PyTorch numbers are tests/fixtures/alignn/optimizer.npz, made once by
experiments/make_onecycle_fixture.py in the reference environment."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scannet_jax import optim
from scannet_jax.configs import mp as mp_config
from scannet_jax.configs import qm9 as qm9_config

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "alignn" / "optimizer.npz"
RTOL = 1e-6  # float32 against PyTorch's float64 schedule and float32 AdamW
NUM_MP = 16  # MP e_form crystals of the training test: 12 train, 2 validation, 2 test

# The fixture's torch parameters -> our Flax paths (Linear weight [out, in] is a kernel [in, out]).
FLAX_PATHS = {
    "atom_embedding.layer.0.weight": ("atom_embedding", "linear", "kernel"),
    "atom_embedding.layer.0.bias": ("atom_embedding", "linear", "bias"),
    "atom_embedding.layer.1.weight": ("atom_embedding", "norm", "scale"),
    "atom_embedding.layer.1.bias": ("atom_embedding", "norm", "bias"),
    "bn_nodes.weight": ("bn_nodes", "scale"),
    "bn_nodes.bias": ("bn_nodes", "bias"),
    "fc.weight": ("fc", "kernel"),
    "fc.bias": ("fc", "bias"),
}


@pytest.fixture(scope="module")
def torch_numbers():
    return np.load(FIXTURE)


def _flax(name: str, array: np.ndarray) -> np.ndarray:
    return array.T if name.endswith("weight") and array.ndim == 2 else array


def _tree(values: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in values.items():
        *parents, leaf = FLAX_PATHS[name]
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(value)
    return tree


def _leaf(tree: dict, name: str) -> np.ndarray:
    for key in FLAX_PATHS[name]:
        tree = tree[key]
    return np.asarray(tree)


@pytest.mark.parametrize("case", ["recipe", "fractional", "short"])
def test_onecycle_matches_torch(torch_numbers, case):
    max_lr, epochs, steps_per_epoch, pct_start = torch_numbers[f"{case}.args"]
    cycle = optim.OneCycle(total_steps=int(epochs) * int(steps_per_epoch), pct_start=float(pct_start))
    steps = jnp.arange(cycle.total_steps)
    lr = np.float32(max_lr) * np.asarray(cycle.lr_factor(steps))
    np.testing.assert_allclose(lr, torch_numbers[f"{case}.lr"], rtol=RTOL, atol=0)
    np.testing.assert_allclose(np.asarray(cycle.momentum(steps)), torch_numbers[f"{case}.beta1"], rtol=RTOL, atol=0)


def test_onecycle_shape_and_floor():
    cycle = optim.OneCycle(total_steps=300)
    assert cycle.warmup_end == pytest.approx(89.0)
    factor = np.asarray(cycle.lr_factor(jnp.arange(302)))
    assert factor[0] == pytest.approx(1 / 25, rel=1e-7) and factor[89] == pytest.approx(1.0, rel=1e-7)
    assert factor[299] == pytest.approx(1 / 25 / 1e4, rel=1e-6)
    assert np.argmax(factor) == 89 and (np.diff(factor[:90]) > 0).all() and (np.diff(factor[89:300]) < 0).all()
    assert factor[300] == factor[301] == factor[299]  # past the cycle: the floor (torch raises)
    beta1 = np.asarray(cycle.momentum(jnp.array([0, 89, 299])))
    np.testing.assert_allclose(beta1, [0.95, 0.85, 0.95], rtol=1e-7)


def test_onecycle_rejects_a_zero_length_phase():
    with pytest.raises(ValueError, match="zero length"):
        optim.OneCycle(total_steps=10, pct_start=0.1)
    with pytest.raises(ValueError, match="total_steps >= 1"):
        optim.OneCycle(total_steps=0)


def _fixture_optimizer(torch_numbers, **overrides):
    """The ALIGNN recipe's optimiser with the fixture's rate, decay and cycle length."""
    max_lr, epochs, steps_per_epoch, pct_start, weight_decay = torch_numbers["adamw.args"]
    opt = qm9_config.get_config("homo,alignn").optimizer
    opt.lr, opt.weight_decay = float(max_lr), float(weight_decay)
    opt.onecycle_epochs, opt.onecycle_pct_start = int(epochs), float(pct_start)
    opt.update(overrides)
    return optim.create_optimizer(opt, int(steps_per_epoch))


def _run(tx, torch_numbers):
    """Feeds the fixture's gradients; returns the parameters and β1 of every step."""
    names = torch_numbers["adamw.names"].tolist()
    params = _tree({n: _flax(n, torch_numbers[f"adamw.init.{n}"]) for n in names})
    state = tx.init(params)
    update = jax.jit(tx.update)
    num_steps = torch_numbers["adamw.lr"].shape[0]
    history, betas, rates = [], [], []
    for step in range(num_steps):
        grads = _tree({n: _flax(n, torch_numbers[f"adamw.grads.{n}"][step]) for n in names})
        updates, state = update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        history.append(params)
        betas.append(float(state.hyperparams["b1"]))
        rates.append(float(state.hyperparams["learning_rate"]))
    return names, history, np.array(betas), np.array(rates)


def test_adamw_with_parameter_groups_matches_torch(torch_numbers):
    names, history, betas, rates = _run(_fixture_optimizer(torch_numbers), torch_numbers)
    np.testing.assert_allclose(betas, torch_numbers["adamw.beta1"], rtol=RTOL)
    assert (rates == np.float32(torch_numbers["adamw.args"][0])).all()  # the peak, scaled per step inside
    decayed = dict(zip(names, torch_numbers["adamw.decayed"].tolist()))
    mask = optim.decay_mask(("bias", "bn"))(history[0])
    assert {n: bool(_leaf(mask, n)) for n in names} == decayed
    for step, params in enumerate(history):
        for n in names:
            np.testing.assert_allclose(_leaf(params, n), _flax(n, torch_numbers[f"adamw.params.{n}"][step]),
                                       rtol=RTOL, atol=RTOL, err_msg=f"{n} after step {step}")


def test_wrong_parameter_groups_are_detected(torch_numbers):
    """Decaying every parameter (no groups) moves the reference's undecayed ones well past the
    tolerance: the fixture does see the groups."""
    names, history, _, _ = _run(_fixture_optimizer(torch_numbers, no_decay=()), torch_numbers)
    final = {n: _leaf(history[-1], n) for n in names}
    for n, decayed in zip(names, torch_numbers["adamw.decayed"].tolist()):
        expected = _flax(n, torch_numbers[f"adamw.params.{n}"][-1])
        error = np.abs(final[n] - expected).max() / np.abs(expected).max()
        assert (error < RTOL) if decayed else (error > 100 * RTOL), (n, error)


def test_decay_mask_is_the_reference_rule_on_every_alignn_parameter():
    """On the default ALIGNN, `decay_mask(("bias", "bn"))` of our names equals
    `alignn.utils.group_decay`'s rule ("bias", "bn" or "norm" in the torch name: no decay)."""
    import flax

    from scannet_jax.torch_weights import torch_names

    names = {path: name for name, (collection, path, _) in torch_names().items() if collection == "params"}
    params = flax.traverse_util.unflatten_dict({path: np.zeros(1) for path in names})
    ours = flax.traverse_util.flatten_dict(optim.decay_mask(("bias", "bn"))({"alignn": params})["alignn"])
    reference = {path: not any(s in name for s in ("bias", "bn", "norm")) for path, name in names.items()}
    assert ours == reference
    # decayed: the 5 MLPLayer Linear kernels and their 5 BatchNorm scales (named layer.1), the 5
    # EGGC kernels of each of the 8 + 4 convolutions, fc's kernel
    assert sum(reference.values()) == 5 + 5 + 12 * 5 + 1


def test_recipe_configs_choose_adamw_with_the_one_cycle():
    from scannet_jax import train

    for config in (mp_config.get_config("e_form,alignn"), mp_config.get_config("gap,alignn"),
                   qm9_config.get_config("homo,alignn")):
        opt = config.optimizer
        assert (opt.name, opt.schedule, opt.lr, opt.weight_decay, opt.no_decay) == (
            "adamw", "onecycle", 1e-3, 1e-5, ("bias", "bn"))
        assert (opt.onecycle_pct_start, opt.onecycle_div_factor, opt.onecycle_final_div_factor) == (0.3, 25.0, 1e4)
        assert (opt.b2, opt.eps, opt.l2, opt.legacy_decay, opt.onecycle_cycle_momentum) == (0.999, 1e-8, 0.0, 0.0, True)
        assert (config.loss, config.batch_size, config.num_epochs, opt.onecycle_epochs) == ("mse", 64, 300, 300)
        assert config.patience == 300 and config.model.name == "alignn"
        assert config.data.graph_builder == "knn_line_graph"
        assert config.keep_freed_host_memory  # its 88 MiB triplet arrays (host_memory.py)
        tx = train.create_optimizer(config, steps_per_epoch=10)
        state = tx.init({"w": jnp.ones(2), "bias": jnp.ones(2)})
        assert set(state.hyperparams) == {"learning_rate", "b1"}
        assert float(state.hyperparams["b1"]) == pytest.approx(0.95)
        config.num_epochs = 30  # an override of the epochs moves the cycle and the patience with it
        assert (config.optimizer.onecycle_epochs, config.patience) == (30, 30)
    qm9 = qm9_config.get_config("homo,alignn")
    assert qm9.data.featurizer.to_dict() == {"cutoff": 5.0, "max_neighbors": 12}
    assert qm9.data.dataset == "qm9" and qm9.data.standardize
    tiny = mp_config.get_config("e_form,tiny,alignn")
    assert (tiny.optimizer.name, tiny.optimizer.schedule, tiny.batch_size) == ("adamw", "onecycle", 16)
    assert tiny.num_epochs == tiny.optimizer.onecycle_epochs == qm9_config.get_config("homo,tiny").num_epochs
    for other in (qm9_config.get_config("homo"), mp_config.get_config("e_form")):
        assert (other.optimizer.name, other.optimizer.schedule) == ("adam", "sgdr")
        assert not other.keep_freed_host_memory  # no speed-up there, more peak RSS


def test_unknown_optimizer_is_rejected():
    opt = qm9_config.get_config("homo").optimizer
    opt.name = "lamb"
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        optim.create_optimizer(opt, 10)


def test_tiny_alignn_trains_with_the_recipe():
    """Tiny ALIGNN on MP crystals through the trainer's jitted step with AdamW + one-cycle, the rate
    set per epoch as the loop does: β1 follows the cycle step by step, the first update has the
    cycle's initial rate lr/25 (Adam's first direction is ±1 per element), and the loss falls
    (tests/test_alignn_training.py runs the whole loop with it)."""
    from scannet_jax import batching, train
    from scannet_jax.datasets import featurize, mp, splits
    from scannet_jax.steps import set_learning_rate
    from scannet_jax.structures import from_atoms

    config = mp_config.get_config("e_form,tiny,alignn")
    config.num_epochs = 4
    config.batch_size = 4
    config.num_buckets = 1
    # one ALIGNN layer, no GCN layer: half the compilation (test_alignn_training trains the tiny
    # config itself with this recipe through the whole loop)
    config.model.gcn_layers = 0
    atoms, _ = mp.read("e_form")
    atoms = atoms[:NUM_MP]
    settings = featurize.graph_settings(config.data.graph_builder, config.data.featurizer.to_dict())
    target = config.data.target
    store = featurize.build_store([from_atoms(a) for a in atoms], settings,
                                  targets={target: [a.info[target] for a in atoms]}, num_workers=1, progress=False)
    split = {"train": np.arange(12), "validation": np.arange(12, 14), "test": np.arange(14, NUM_MP)}
    trainer = train.setup(config, splits.make_datasets(store, split, target, config.data.standardize))
    steps_per_epoch = trainer.train_plan.num_batches()
    assert steps_per_epoch == 3
    cycle = optim.OneCycle(total_steps=config.num_epochs * steps_per_epoch)
    state, initial = trainer.state, jax.device_get(trainer.state.params)
    losses, betas = [], []
    for epoch in range(config.num_epochs):
        state = set_learning_rate(state, config.optimizer.lr, trainer.mesh)
        for batch in batching.device_batches(trainer.train_plan, trainer.mesh, config.seed, epoch, 0, 0):
            state, metrics = trainer.steps.train(state, batch)
            losses.append(float(metrics["loss"]))
            betas.append(float(state.opt_state.hyperparams["b1"]))
            if len(losses) == 1:
                first = jax.device_get(state.params)
    np.testing.assert_allclose(betas, np.asarray(cycle.momentum(jnp.arange(cycle.total_steps))), rtol=1e-6)
    assert int(state.opt_state.count) == cycle.total_steps
    for leaf in ("bias", "kernel"):  # the decay (η·1e-5·θ) is below this resolution
        moved = first["alignn"]["fc"][leaf] - initial["alignn"]["fc"][leaf]
        np.testing.assert_allclose(np.abs(moved), 1e-3 / 25, rtol=1e-3)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-steps_per_epoch:]) < np.mean(losses[:steps_per_epoch])
