"""The original's loss (RMSE + L2), its gradient against TensorFlow's, metric sums, one Adam step."""

from __future__ import annotations

import functools

import flax
import jax
import optax
import jax.numpy as jnp
import numpy as np
import pytest

from scannet_jax import convert, losses, models

from test_models import FIXTURES, load_variant


def setup(variant: str):
    """(forward data, config, model, params, graphs, graph mask) for one forward fixture."""
    data, model, params, graphs = load_variant(variant)
    graph_mask = np.arange(len(graphs.n_node)) < len(data["target"])
    return data, model.config, model, params, graphs, graph_mask


@functools.cache
def loss_fn(variant: str, l2: float = 1e-4):
    """Jitted params → (total, aux) for one fixture batch."""
    _, _, model, _, graphs, graph_mask = setup(variant)

    @jax.jit
    def loss(params):
        predictions, _ = model.apply({"params": params}, graphs)
        return losses.original_loss(params, predictions, graphs.globals["target"], graph_mask, l2)

    return loss


@functools.cache
def value_and_grad_fn(variant: str):
    return jax.jit(jax.value_and_grad(loss_fn(variant), has_aux=True))


def test_penalised_kernels_are_the_originals():
    config = models.default_model_config()
    config.update(n_attention=2, local_dim=16, num_head=2, global_dim=16, dense_out=16, embedding_dim=8, use_ring=True)
    names = [w.name for w in convert.keras_weight_layout(config) if losses.is_l2_penalised(w.path)]
    assert names == [
        "local_attention/query/kernel:0", "local_attention/key/kernel:0",
        "local_attention/filter_geo/kernel:0", "dense/kernel:0", "dense_1/kernel:0",
        "local_attention_1/query/kernel:0", "local_attention_1/key/kernel:0",
        "local_attention_1/filter_geo/kernel:0", "dense_2/kernel:0", "dense_3/kernel:0",
        "after_Lc/kernel:0", "global_attention/query/kernel:0", "global_attention/key/kernel:0",
        "bf_property/kernel:0",
    ]


def test_l2_penalty_by_hand():
    params = {
        "after_Lc": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.ones(3)},
        "local_attention_12": {"key": {"kernel": jnp.ones((4, 1))}, "layer_norm": {"scale": jnp.ones(5)}},
        "dense_embed": {"kernel": jnp.ones((7, 7))},
        "predict_property": {"kernel": jnp.ones((3, 1))},
    }
    assert float(losses.l2_penalty(params, coeff=0.5)) == pytest.approx(0.5 * (6 * 4.0 + 4))


@pytest.mark.parametrize("variant", ("scannplus", "scann", "scannplus_ring"))
def test_loss_matches_original(variant):
    data, _, _, params, _, _ = setup(variant)
    total, aux = loss_fn(variant)(params)
    assert float(aux["rmse"]) == pytest.approx(float(data["loss_rmse"]), rel=1e-5)
    assert float(aux["l2"]) == pytest.approx(float(data["loss_l2"]), rel=1e-5)
    assert float(total) == pytest.approx(float(data["loss_total"]), rel=1e-5)


@pytest.mark.parametrize("variant", ("scannplus", "scann"))
def test_gradient_matches_tensorflow(variant):
    grads_ref = np.load(FIXTURES / f"grad_{variant}_seed0.npz")
    _, config, _, params, _, _ = setup(variant)
    _, grads = value_and_grad_fn(variant)(params)
    ours = convert.keras_arrays_from_params(grads, config)
    weights = convert.keras_arrays_from_params(params, config)
    penalised = {w.name for w in convert.keras_weight_layout(config) if losses.is_l2_penalised(w.path)}
    assert set(ours) == {str(n) for n in grads_ref["weight_names"]}
    for name, value in ours.items():
        # Without the L2 term: d(1e-4·Σw²)/dw = 2e-4·w on the penalised kernels only.
        rmse_only = value - 2e-4 * weights[name] if name in penalised else value
        for prefix, ours_value in (("grad/", value), ("grad_rmse_only/", rmse_only)):
            expected = grads_ref[prefix + name]
            np.testing.assert_allclose(
                ours_value, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=prefix + name
            )


@pytest.mark.parametrize("variant", ("scannplus", "scann"))
def test_one_legacy_adam_step_matches_keras(variant):
    """One Keras-2 legacy Adam step (lr 5e-4, decay 1e-5, epsilon 1e-7) on the fixture batch.

    Keras-2 legacy Adam updates w ← w − lr_t·m / (sqrt(v) + ε) with
    lr_t = lr/(1 + decay·t)·sqrt(1 − β2^(t+1))/(1 − β1^(t+1)): ε is added to the root of the
    *uncorrected* v (``optim.scale_by_keras_adam``); at the first step the decay is still 1.
    """
    from scannet_jax import optim

    data, _, model, params, graphs, _ = setup(variant)
    loss = loss_fn(variant)
    (total, _), grads = value_and_grad_fn(variant)(params)
    assert float(total) == pytest.approx(float(data["train_step_loss_reported"]), rel=1e-5)
    optimizer = optax.chain(optim.scale_by_keras_adam(b1=0.9, b2=0.999, eps=1e-7), optax.scale(-5e-4))
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    new_params = optax.apply_updates(params, updates)
    predictions, _ = jax.jit(model.apply)({"params": new_params}, graphs)
    num = len(data["target"])
    np.testing.assert_allclose(predictions[:num], data["prediction_after_step"][:, 0], rtol=1e-5, atol=1e-6)
    assert float(loss(new_params)[0]) == pytest.approx(float(data["loss_total_after_step"]), rel=1e-5)


def test_keras_adam_follows_the_keras_update_rule_over_many_steps():
    """Keras-2's ResourceApplyAdam written out in float64 NumPy: m, v uncorrected, ε added to
    sqrt(v), the bias corrections folded into the rate. Gradients span 1e-9..1 so that the place
    of ε matters (optax's Adam differs by up to 25 % on the small ones)."""
    from scannet_jax import optim

    rng = np.random.default_rng(0)
    grads = rng.normal(size=(30, 6)) * np.array([1e-9, 1e-7, 1e-6, 1e-4, 1e-2, 1.0])
    b1, b2, eps = 0.9, 0.999, 1e-7
    m = v = np.zeros(6)
    expected = []
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        expected.append(np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps))
    adam = optim.scale_by_keras_adam(b1, b2, eps)
    state = adam.init(jnp.zeros(6))
    got = []
    for g in grads:
        direction, state = jax.jit(adam.update)(jnp.asarray(g, jnp.float32), state)
        got.append(np.asarray(direction))
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-12)
    optax_direction = optax.scale_by_adam(b1, b2, eps)
    first, _ = optax_direction.update(jnp.asarray(grads[0], jnp.float32), optax_direction.init(jnp.zeros(6)))
    assert not np.allclose(first, expected[0], rtol=1e-3)  # the test can tell the two apart


def test_masked_loss_ignores_padding_and_nan_targets():
    params = {"after_Lc": {"kernel": jnp.ones((1, 1))}}
    predictions = jnp.array([1.0, 3.0, 123.0, 7.0])
    targets = jnp.array([0.0, 1.0, jnp.nan, jnp.nan])
    mask = jnp.array([True, True, False, False])
    total, aux = losses.original_loss(params, predictions, targets, mask, l2=1e-4)
    assert float(aux["rmse"]) == pytest.approx(np.sqrt((1 + 4) / 2))
    assert float(total) == pytest.approx(np.sqrt(2.5) + 1e-4)
    grad = jax.grad(lambda p: losses.original_loss(params, p, targets, mask)[0])(predictions)
    np.testing.assert_allclose(grad, [1 / (2 * np.sqrt(2.5)), 2 / (2 * np.sqrt(2.5)), 0, 0], rtol=1e-6)
    sums = losses.metric_sums(predictions, targets, mask)
    assert {k: float(v) for k, v in sums.items()} == {
        "squared_error_sum": 5.0, "abs_error_sum": 3.0, "count": 2.0,
    }


def test_rmse_gradient_finite_at_perfect_fit_and_empty_mask():
    params = {"bf_property": {"kernel": jnp.ones((2, 2))}}
    y = jnp.array([0.5, -1.0])
    for mask in (jnp.array([True, True]), jnp.array([False, False])):
        grad = jax.grad(lambda p: losses.original_loss(params, p, y, mask)[0])(y)
        assert np.all(np.isfinite(grad))
    grad_params = jax.grad(lambda p: losses.original_loss(p, y, y, jnp.array([True, True]))[0])(params)
    flat = flax.traverse_util.flatten_dict(grad_params)
    np.testing.assert_allclose(flat[("bf_property", "kernel")], 2e-4 * np.ones((2, 2)), rtol=1e-6)
