"""Data parallelism: several devices, or several processes, give the one-device step.

The multi-device cases run this file as a script in subprocesses (``XLA_FLAGS`` must be set
before JAX starts), each doing one ``train_step`` on the same global batch built from the
structures of ``tests/fixtures/original/neighbours*.npz`` and writing the new parameters to a file.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "original"
REPO = Path(__file__).resolve().parents[1]


class _FixtureNeighbors:
    def __init__(self, d, lo, hi):
        self.receivers = d["edge_center"][lo:hi].astype(np.int64)
        self.senders = d["edge_neighbor"][lo:hi].astype(np.int64)
        self.distances = d["edge_distance"][lo:hi]
        self.solid_angles = d["edge_solid_angle"][lo:hi]
        self.weights = d["edge_rel_weight"][lo:hi]


def fixture_store():
    """The 28 structures of the neighbour fixtures as a GraphStore with a synthetic target.

    The target (a smooth function of composition, arbitrary units) makes the loss non-trivial;
    structure 3 gets NaN to exercise masking.
    """
    from scannet_jax.graphs import GraphStore

    numbers, neighbors = [], []
    for name in ("neighbours.npz", "neighbours_extra.npz"):
        d = np.load(FIXTURES / name)
        for s in range(len(d["names"])):
            a, b = d["atom_ptr"][s], d["atom_ptr"][s + 1]
            numbers.append(d["Z"][a:b])
            neighbors.append(_FixtureNeighbors(d, d["edge_ptr"][s], d["edge_ptr"][s + 1]))
    target = np.array([0.3 * len(z) - 0.05 * z.sum() + 0.1 * (z == 8).sum() for z in numbers])
    target[3] = np.nan
    return GraphStore.from_structures(numbers, neighbors, targets={"y": target})


def tiny_config():
    """A small SCANN+ config without dropout (so that devices can agree exactly)."""
    sys.path.insert(0, str(REPO))
    from scannet_jax.configs import qm9

    config = qm9.get_config("homo,tiny")
    config.model.update(n_atoms=40, n_attention=1, embedding_dim=8, local_dim=16, num_head=2, global_dim=16,
                        dense_out=16)  # small: these tests are dominated by compilation
    config.model.embed_dropout = 0.0
    config.model.ffn_dropout = 0.0
    config.optimizer.lr = 1e-2  # a visible step
    return config


def one_step(out: str) -> None:
    """One train_step on all fixture structures as one global batch; params to ``out`` (.npz)."""
    import jax

    from scannet_jax import parallel, train
    from scannet_jax.datasets.splits import make_datasets

    config = tiny_config()
    config.batch_size = config.eval_batch_size = 28
    config.num_buckets = 1
    store = fixture_store()
    everything = np.arange(len(store))
    data = make_datasets(store, {"train": everything, "validation": everything, "test": everything}, "y")
    trainer = train.setup(config, data)
    state, mesh = trainer.state, trainer.mesh
    initial = {f"init/{jax.tree_util.keystr(k)}": np.asarray(v)
               for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
    batch = parallel.shard_batch(trainer.train_plan.batch(everything), mesh)
    state, metrics = trainer.steps.train(state, batch)
    flat = {jax.tree_util.keystr(k): parallel.to_host(v)
            for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
    metrics = {f"metric/{k}": v for k, v in parallel.to_host(metrics).items()}
    if jax.process_index() == 0:
        np.savez(out, **flat, **metrics, **initial)


def _run_worker(tmp_path: Path, name: str, devices: int, process_id: int = -1, num_processes: int = 0,
                port: int = 0) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    if num_processes:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(num_processes),
                   JAX_PROCESS_ID=str(process_id))
    return subprocess.Popen([sys.executable, __file__, "--out", str(tmp_path / f"{name}.npz")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]


def _compare(a: Path, b: Path) -> None:
    one, many = np.load(a), np.load(b)
    assert set(one.files) == set(many.files)
    for k in one.files:
        np.testing.assert_allclose(many[k], one[k], rtol=1e-5, atol=1e-5, err_msg=k)
    # The step did something: parameters moved by about the learning rate (Adam's first step).
    moved = max(np.abs(one[k] - one[f"init/{k}"]).max() for k in one.files if k.startswith("["))
    assert 5e-3 < moved < 2e-2
    # 27 real graphs with a target: 28 fixture structures, one with a NaN target masked out.
    assert float(one["metric/count"]) == 27.0
    assert float(one["metric/nonfinite"]) == 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Starts every configuration at once (they share the CPU) and waits for all of them."""
    tmp = tmp_path_factory.mktemp("parallel")
    port = _free_port()
    procs = [_run_worker(tmp, "one", 1), _run_worker(tmp, "four", 4)]
    procs += [_run_worker(tmp, "two", 1, process_id=i, num_processes=2, port=port) for i in range(2)]
    _wait(procs)
    return tmp


def test_four_devices_match_one(results):
    _compare(results / "one.npz", results / "four.npz")


def test_two_processes_match_one(results):
    _compare(results / "one.npz", results / "two.npz")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from scannet_jax import parallel

    parallel.initialize_distributed()
    one_step(args.out)
