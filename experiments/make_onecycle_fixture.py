"""Records the reference ALIGNN training recipe's optimiser numbers (zoo-reference.md §1.10).

Run once, in the reference environment only (torch and alignn; never imported by scannet_jax):

    /work/venvs/alignn_ref/bin/python experiments/make_onecycle_fixture.py

Writes ``tests/fixtures/alignn/optimizer.npz`` (read by tests/test_alignn_recipe.py):

* ``<case>.lr``, ``<case>.beta1`` [T] (float64): the learning rate and β1 that
  ``torch.optim.lr_scheduler.OneCycleLR`` gives optimiser step t = 0 … T−1 of an AdamW, with the
  reference's arguments (``max_lr``, ``epochs``, ``steps_per_epoch``, ``pct_start=0.3``, every
  other argument at torch's default), for the cases of ``SCHEDULES``: ``<case>.args`` holds
  (max_lr, epochs, steps_per_epoch, pct_start).
* ``adamw.*``: AdamW (betas (0.9, 0.999), eps 1e-8) driven by OneCycleLR and stepped once per
  batch, as ``alignn/train.py`` does, on a tiny parameter set named like the reference's
  modules, split into parameter groups by the reference's own ``alignn.utils.group_decay``.
  ``adamw.names`` the parameter names, ``adamw.decayed`` [P] whether ``group_decay`` puts each
  in the weight-decay group, ``adamw.init.<name>``, ``adamw.grads.<name>`` [S, ...] the fixed
  random gradient of every step, ``adamw.params.<name>`` [S, ...] the parameters after every step,
  ``adamw.lr``/``adamw.beta1`` [S] the rate and β1 each step used, ``adamw.args`` (max_lr,
  epochs, steps_per_epoch, pct_start, weight_decay). The rate and decay are larger than the
  recipe's (1e-3, 1e-5) so that the decay, and which parameters get it, shows in float32.
* ``versions``: the packages that made the file.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import alignn
import numpy as np
import torch
from alignn.utils import group_decay
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "alignn" / "optimizer.npz"

# case -> (max_lr, epochs, steps_per_epoch, pct_start)
SCHEDULES = {
    "recipe": (1e-3, 30, 10, 0.3),  # the reference's arguments, 300 steps (phase boundary at 89)
    "fractional": (1e-3, 7, 13, 0.3),  # 91 steps: the warm-up ends at the non-integer step 26.3
    "short": (1e-3, 1, 5, 0.3),  # 5 steps: the warm-up ends at step 0.5
}
ADAMW = (0.05, 4, 10, 0.3, 0.1)  # max_lr, epochs, steps_per_epoch, pct_start, weight_decay


class Tiny(nn.Module):
    """Two layers named like the reference's: an MLPLayer (``<name>.layer.0`` Linear,
    ``<name>.layer.1`` BatchNorm1d, decayed by ``group_decay``: no "bn"/"norm" in the name), an
    EGGC-style ``bn_nodes`` BatchNorm1d (not decayed) and the ``fc`` output Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.atom_embedding = nn.Module()
        self.atom_embedding.layer = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.SiLU())
        self.bn_nodes = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 1)


def schedule(max_lr: float, epochs: int, steps_per_epoch: int, pct_start: float) -> tuple[np.ndarray, np.ndarray]:
    """(lr [T], β1 [T]) that OneCycleLR gives each optimiser step of an AdamW."""
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=max_lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=pct_start)
    lrs, betas = [], []
    for _ in range(epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    return np.array(lrs), np.array(betas)


def adamw_run() -> dict[str, np.ndarray]:
    """AdamW + OneCycleLR on `Tiny` with fixed random gradients (one optimiser step per batch)."""
    max_lr, epochs, steps_per_epoch, pct_start, weight_decay = ADAMW
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():  # BatchNorm starts at (1, 0): make every parameter non-trivial
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    params = dict(model.named_parameters())
    groups = group_decay(model)
    decayed_ids = {id(p) for p in groups[0]["params"]}
    assert groups[1]["weight_decay"] == 0
    optimizer = torch.optim.AdamW(groups, lr=max_lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=pct_start)
    num_steps = epochs * steps_per_epoch
    rng = np.random.default_rng(0)
    out = {"adamw.names": np.array(list(params)),
           "adamw.decayed": np.array([id(p) in decayed_ids for p in params.values()]),
           "adamw.args": np.array(ADAMW)}
    grads = {n: [] for n in params}
    after = {n: [] for n in params}
    for n, p in params.items():
        out[f"adamw.init.{n}"] = p.detach().numpy().copy()
    lrs, betas = [], []
    for step in range(num_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        for n, p in params.items():
            g = rng.normal(size=p.shape).astype(np.float32)
            if step % 7 == 3:  # now and then a zero gradient: the decay and the moments act alone
                g[...] = 0.0
            grads[n].append(g)
            p.grad = torch.from_numpy(g.copy())
        optimizer.step()
        scheduler.step()
        for n, p in params.items():
            after[n].append(p.detach().numpy().copy())
    for n in params:
        out[f"adamw.grads.{n}"] = np.stack(grads[n])
        out[f"adamw.params.{n}"] = np.stack(after[n])
    out["adamw.lr"], out["adamw.beta1"] = np.array(lrs), np.array(betas)
    return out


def main() -> None:
    out = {}
    for case, args in SCHEDULES.items():
        out[f"{case}.lr"], out[f"{case}.beta1"] = schedule(*args)
        out[f"{case}.args"] = np.array(args)
    out.update(adamw_run())
    out["versions"] = np.array(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                                           "alignn": alignn.__version__, "numpy": np.__version__}))
    np.savez(OUT, **out)
    print(f"wrote {OUT}: {len(out)} arrays; decayed: "
          f"{dict(zip(out['adamw.names'].tolist(), out['adamw.decayed'].tolist()))}")


if __name__ == "__main__":
    main()
