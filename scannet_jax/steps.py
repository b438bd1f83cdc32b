"""The pure steps of training, evaluation and prediction, and the state they carry.

Steps run under ``jax.shard_map`` over the ``('data',)`` mesh (``parallel.py``): the batch
argument holds one padded GraphsTuple per device (a `batching.Batch` of it and its extra sets when
the store has them), stacked on a leading axis. The loss
(``losses.LOSSES``: the original's RMSE, or MSE) is computed over the *global* batch (sums and
counts combined with ``psum`` first) plus the network's regulariser, so any number of devices
computes the gradient of one device holding the whole batch. Graphs with a NaN target are masked
out of loss and metrics. A step whose loss or gradient is not finite is not applied (the state
stays at the last good step). Nothing here is specific to one network: `models.get_spec` says
how to regularise it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
import optax
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from scannet_jax import batching, losses, models, optim, parallel


class TrainState(train_state.TrainState):
    """Parameters, optimiser state and everything else a resumed run needs on device.

    Attributes:
      target_mean: float32 [], mean of the training targets (target units).
      target_std: float32 [], their population std; predictions are y·std + mean.
      rng: uint32 [2], base key; step t uses ``fold_in(rng, t)`` for dropout.
      model_state: the network's non-parameter variables (e.g. ``{"batch_stats": ...}``), updated
        by every training step; ``{}`` for networks without any.
    """

    target_mean: jax.Array
    target_std: jax.Array
    rng: jax.Array
    model_state: Any = dataclasses.field(default_factory=dict)

    def variables(self, params: Any = None) -> dict[str, Any]:
        """The variables to ``apply`` the network with (``params`` replacing the state's)."""
        return {"params": self.params if params is None else params, **self.model_state}


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       example: jraph.GraphsTuple | batching.Batch,
                       target_mean: float, target_std: float, seed: int) -> TrainState:
    """Initialises ``model`` on ``example`` (one unstacked padded batch) from ``PRNGKey(seed)``."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = jax.jit(lambda k, g: {c: v for c, v in model.init(k, g).items() if c != "intermediates"}
                        )(init_key, example)
    params = variables.pop("params")
    model_state = dict(variables)
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, target_mean=jnp.float32(target_mean),
                             target_std=jnp.float32(target_std), rng=rng, model_state=model_state)


def atom_graphs(batch: jraph.GraphsTuple | batching.Batch) -> jraph.GraphsTuple:
    """The atom graph of a batch: the batch itself, or ``batch.graphs`` of a `batching.Batch` (a
    store with extra sets, e.g. ALIGNN's triplets). Targets, masks and graph counts come from it;
    the network gets the whole batch."""
    return batch.graphs if isinstance(batch, batching.Batch) else batch


# Inside shard_map, every array of `batch` has a leading device axis of size 1.
def _targets_and_mask(state: TrainState, graphs: jraph.GraphsTuple) -> tuple[jax.Array, jax.Array]:
    """Standardised targets [G] (0 where masked) and the mask [G] of real graphs with a target."""
    target = graphs.globals["target"]
    mask = jraph.get_graph_padding_mask(graphs) & jnp.isfinite(target)
    scaled = (jnp.where(mask, target, state.target_mean) - state.target_mean) / state.target_std
    return scaled, mask


def _psum(tree: Any) -> Any:
    return jax.lax.psum(tree, parallel.AXIS)


def _error_metrics(sums: dict[str, jax.Array], std: jax.Array) -> dict[str, jax.Array]:
    """Summed errors in target units (from standardised sums) and the count."""
    return {"abs_err": sums["abs_error_sum"] * std, "sq_err": sums["squared_error_sum"] * std**2,
            "count": sums["count"]}


def train_step(state: TrainState, batch: jraph.GraphsTuple | batching.Batch, *, loss: Callable[[jax.Array, jax.Array], jax.Array],
               regularizer: Callable[[Any, float], jax.Array], coeff: float) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on the global batch (runs under ``make_steps``' shard_map).

    Args:
      state: replicated train state.
      batch: this device's padded GraphsTuple (or `batching.Batch`), every leaf with a leading
        axis of size 1.
      loss: ``losses.LOSSES`` entry: (summed squared error, count) of the global batch -> loss.
      regularizer: the network's ``(params, coeff) -> penalty``.
      coeff: its coefficient.

    Returns:
      (new state, metrics): metrics are sums over the global batch — ``abs_err``, ``sq_err``
      (target units), ``count`` (graphs with a target) — plus ``loss``/``rmse`` of the step,
      ``steps`` (1) and ``nonfinite`` (1 if the update was skipped). The dropout key is
      ``fold_in(fold_in(rng, step), device)``.
    """
    graphs = parallel.unstack_local(batch)
    scaled, mask = _targets_and_mask(state, atom_graphs(graphs))
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(parallel.AXIS))
    mutable = list(state.model_state)

    def loss_fn(params):
        outputs = state.apply_fn(state.variables(params), graphs, train=True, rngs={"dropout": key},
                                 mutable=mutable or False)
        (predictions, _), model_state = outputs if mutable else (outputs, {})
        sums = _psum(losses.metric_sums(predictions, scaled, mask))
        value = loss(sums["squared_error_sum"], sums["count"])
        return value + regularizer(params, coeff), (value, sums, model_state)

    (total, (value, sums, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    finite = jax.tree.reduce(lambda ok, g: ok & jnp.isfinite(g).all(), grads, jnp.isfinite(total))
    averaged = jax.lax.pmean(dict(model_state), parallel.AXIS)

    def apply(_):
        updated = state.apply_gradients(grads=grads)
        return updated.params, updated.opt_state, averaged

    # A conditional, not a per-leaf select: XLA copies a scalar predicate's chain of per-leaf
    # checks into every leaf's select fusion: ALIGNN's train step compiled in 77 s instead of 10 s
    # (docs/performance.md, "Compile time").
    params, opt_state, new_model_state = jax.lax.cond(
        finite, apply, lambda _: (state.params, state.opt_state, state.model_state), None)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=new_model_state)
    metrics = {"loss": jnp.where(finite, total, 0.0), "rmse": jnp.where(finite, value, 0.0),
               **_error_metrics(sums, state.target_std), "steps": jnp.float32(1.0),
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return new_state, metrics


def model_outputs(apply_fn: Callable, variables: Any, graphs: jraph.GraphsTuple | batching.Batch, target_mean: jax.Array,
                  target_std: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """The network in inference mode: (predictions [G] in target units, node scores [N] or None).

    The one inference path: evaluation, ``predict_step`` and the `predict.Predictor` use it.
    """
    predictions, node_scores = apply_fn(variables, graphs, train=False)
    return predictions * target_std + target_mean, node_scores


def eval_step(state: TrainState, batch: jraph.GraphsTuple | batching.Batch) -> dict[str, jax.Array]:
    """Sums ``abs_err``, ``sq_err`` (target units) and ``count`` over the global batch."""
    graphs = parallel.unstack_local(batch)
    scaled, mask = _targets_and_mask(state, atom_graphs(graphs))
    predictions, _ = model_outputs(state.apply_fn, state.variables(), graphs, 0.0, 1.0)
    return _error_metrics(_psum(losses.metric_sums(predictions, scaled, mask)), state.target_std)


def predict_step(state: TrainState, batch: jraph.GraphsTuple | batching.Batch) -> jax.Array:
    """Predictions in target units, [1, G] per device ([D, G] globally)."""
    graphs = parallel.unstack_local(batch)
    predictions, _ = model_outputs(state.apply_fn, state.variables(), graphs, state.target_mean, state.target_std)
    return predictions[None]


class TraceCounter:
    """Counts how often a function is traced: under ``jax.jit`` once per new input shape, i.e.
    the number of compilations."""

    def __init__(self, fn: Callable):
        self.fn, self.count = fn, 0
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        return self.fn(*args, **kwargs)


@dataclasses.dataclass
class Steps:
    """The jitted steps of one mesh; each compiles once per bucket shape.

    ``train(state, batch) -> (state, metrics)``, ``eval(state, batch) -> metrics`` (sums and
    counts in target units, divided on the host) and ``predict(state, batch) -> [D, G]``
    predictions in target units. ``state`` is donated to ``train``.
    """

    train: Callable
    eval: Callable
    predict: Callable
    traces: dict[str, TraceCounter]

    def compile_counts(self) -> dict[str, int]:
        return {name: counter.count for name, counter in self.traces.items()}


def compiler_options(ynn: bool) -> dict[str, str] | None:
    """XLA options of a jitted step: on the CPU backend without YNNPACK fusions unless ``ynn``.

    jaxlib 0.10's CPU backend hands dots and their fused neighbours to YNNPACK by default. On
    this project's CPU that made SCANN+'s steps 11-27 % and the LSTM's forward pass 40 % slower,
    but MEGNet's forward pass faster (docs/performance.md), so the choice is per network and
    step (`models.ModelSpec.train_with_ynn`, ``forward_with_ynn``). Numbers agree to float32
    rounding either way. Other backends get no options.
    """
    if ynn or jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


def make_steps(mesh: jax.sharding.Mesh, model_config: Any, loss: str, coeff: float,
               ynn: bool | None = None) -> Steps:
    """``train_step``, ``eval_step`` and ``predict_step`` for ``mesh``, with the loss
    (``losses.LOSSES`` name) and the regulariser of the network ``model_config`` names.

    ``ynn`` None compiles each step as the network's `models.ModelSpec` chooses
    (``train_with_ynn``, ``forward_with_ynn``); True or False sets all three steps alike
    (benchmarks: experiments/bench_compiler_options.py)."""
    if loss not in losses.LOSSES:
        raise ValueError(f"config.loss={loss!r}: unknown; known: {', '.join(losses.LOSSES)}")
    spec = models.get_spec(model_config)
    regularizer = spec.regularizer
    traces = {"train": TraceCounter(functools.partial(train_step, loss=losses.LOSSES[loss],
                                                      regularizer=regularizer, coeff=coeff)),
              "eval": TraceCounter(eval_step), "predict": TraceCounter(predict_step)}
    data = (P(), P(parallel.AXIS))
    train = parallel.data_parallel(traces["train"], mesh, data, (P(), P()))
    evaluate = parallel.data_parallel(traces["eval"], mesh, data, P())
    predict = parallel.data_parallel(traces["predict"], mesh, data, P(parallel.AXIS))
    forward = compiler_options(spec.forward_with_ynn if ynn is None else ynn)
    train_options = compiler_options(spec.train_with_ynn if ynn is None else ynn)
    return Steps(train=jax.jit(train, donate_argnums=0, compiler_options=train_options),
                 eval=jax.jit(evaluate, compiler_options=forward), predict=jax.jit(predict, compiler_options=forward),
                 traces=traces)


def set_learning_rate(state: TrainState, lr: float, mesh: jax.sharding.Mesh) -> TrainState:
    """Returns ``state`` with the injected learning rate set to ``lr`` (replicated on ``mesh``)."""
    return state.replace(opt_state=optim.set_learning_rate(state.opt_state, lr,
                                                           lambda x: parallel.replicate(x, mesh)))

