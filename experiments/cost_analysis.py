"""XLA's cost analysis of a jitted step, and this machine's measured peaks, for a fraction of peak.

    from experiments.cost_analysis import step_cost, measure_peaks, fraction_of_peak
    cost = step_cost(steps.train, state, batch)      # {"flops", "bytes_accessed", ...} per call
    peaks = measure_peaks()                          # {"flops_per_s", "bytes_per_s"} (float32)
    fraction_of_peak(cost, seconds_per_step, peaks)  # {"flops_per_s", "bytes_per_s", "flops_fraction", ...}

``step_cost`` compiles the function for the given arguments (nothing is executed, donated
arguments are not consumed). The peaks are measured, not taken from a data sheet: a large float32
matmul for FLOP/s and the sum of a large array for memory read bytes/s, on all of this process's
threads.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def step_cost(jitted: Callable, *args: Any, **kwargs: Any) -> dict[str, float]:
    """FLOPs, transcendentals and bytes accessed of one call of ``jitted(*args, **kwargs)``.

    Args:
      jitted: a ``jax.jit``-wrapped function.
      *args, **kwargs: example arguments (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      {"flops", "transcendentals", "bytes_accessed"} as XLA's cost model counts them for the
      optimised HLO (bytes: every operand read and result written by each fused op).
    """
    analysis = jitted.lower(*args, **kwargs).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0]
    return {key: float(analysis.get(name, 0.0))
            for key, name in (("flops", "flops"), ("transcendentals", "transcendentals"),
                              ("bytes_accessed", "bytes accessed"))}


def _best_seconds(fn: Callable, *args: Any, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peaks(matmul_size: int = 2048, stream_mib: int = 256, repeats: int = 5) -> dict[str, float]:
    """Measured float32 FLOP/s (square matmul) and memory read bytes/s (sum of a large array).

    Returns:
      {"flops_per_s", "bytes_per_s"}: the best of ``repeats`` timed runs.
    """
    a = jnp.ones((matmul_size, matmul_size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    flops = 2.0 * matmul_size**3 / _best_seconds(matmul, a, repeats=repeats)
    x = jnp.ones((stream_mib << 20) // 4, jnp.float32)
    bytes_per_s = x.nbytes / _best_seconds(jax.jit(jnp.sum), x, repeats=repeats)  # one read pass
    return {"flops_per_s": flops, "bytes_per_s": bytes_per_s}


def fraction_of_peak(cost: dict[str, float], seconds: float, peaks: dict[str, float]) -> dict[str, float]:
    """Achieved FLOP/s and bytes/s of a step that took ``seconds``, and their fractions of ``peaks``."""
    flops_per_s = cost["flops"] / seconds
    bytes_per_s = cost["bytes_accessed"] / seconds
    return {"flops_per_s": flops_per_s, "bytes_per_s": bytes_per_s,
            "flops_fraction": flops_per_s / peaks["flops_per_s"],
            "bytes_fraction": bytes_per_s / peaks["bytes_per_s"],
            "arithmetic_intensity": cost["flops"] / max(cost["bytes_accessed"], 1.0)}
