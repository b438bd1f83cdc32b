"""The reference ``alignn`` package's side of experiments/compare_alignn.py.

Run only with the reference environment's interpreter (PyPI ``alignn`` 2026.8.11 with PyTorch and
DGL, zoo-reference.md §1.1), never from the project's package::

    /work/venvs/alignn_ref/bin/python experiments/alignn_ref/reference_alignn.py graphs \
        --data DIR --config config.json --out graphs.json
    /work/venvs/alignn_ref/bin/python experiments/alignn_ref/reference_alignn.py train \
        --data DIR --config config.json --workdir WORK --out train.json

``DIR`` is a data set in the reference's JSON folder format: ``id_prop.json``, a list of
``{"jid", "target", "atoms"}`` with ``atoms`` a ``jarvis.core.atoms.Atoms.to_dict`` record
(Cartesian coordinates), what ``alignn/train_alignn.py --root_dir`` reads with ``--id_key jid
--target_key target``; its entries ordered train, validation, test. ``config.json`` holds
``alignn.config.TrainingConfig`` keys (with ``n_train``/``n_val``/``n_test`` and
``keep_data_order`` true, so the reference's ``get_id_train_val_test`` takes the entries in that
order).

``graphs`` times ``Graph.atom_dgl_multigraph`` (the k-nearest crystal graph and its line graph) on
every structure, after all structures are read into ``Atoms``, and writes the seconds and each structure's
bond and triplet counts.

``train`` builds the loaders with the reference's ``get_train_val_loaders`` (graphs, CGCNN
features, LMDB cache, its batching and ``drop_last=True`` training loader) and trains the
reference's ``ALIGNN`` model with the paper-era recipe of ``alignn/train_props.py``: the
reference's ``group_decay`` parameter groups and ``setup_optimizer`` (AdamW), ``OneCycleLR`` with
the arguments of ``alignn/train.py`` stepped once per batch, ``torch.nn.MSELoss``. The loop is
written here because ``alignn.train.train_dgl`` of 2026.8.11 trains only the ``alignn_*``
(atomwise) models, with a hard-coded L1 loss; for ``name="alignn"`` it builds the model and
optimizer and skips training. Validation and test are evaluated on every structure (the
reference's validation loader drops its last partial batch); test MAE is given for the
best-validation epoch (as the project's trainer reports it) and for the last epoch (as the
paper-era code wrote its predictions).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import sys
import time


def read_folder(root: str) -> list[dict]:
    """The entries ``train_for_folder`` builds from ``root/id_prop.json``: ``{"jid", "target", "atoms"}``."""
    with open(os.path.join(root, "id_prop.json")) as f:
        return [{"jid": e["jid"], "target": float(e["target"]), "atoms": e["atoms"]} for e in json.load(f)]


def versions() -> dict[str, str]:
    """Versions of the reference stack."""
    import alignn
    import dgl
    import jarvis
    import torch

    return {"python": sys.version.split()[0], "alignn": alignn.__version__, "torch": torch.__version__,
            "dgl": dgl.__version__, "jarvis-tools": jarvis.__version__, "torch_threads": torch.get_num_threads()}


def peak_rss_mib() -> float:
    """This process's peak resident set size (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_graphs(args: argparse.Namespace) -> dict:
    """Times ``Graph.atom_dgl_multigraph`` over the folder's structures (``graphs`` command)."""
    from alignn.graphs import Graph
    from jarvis.core.atoms import Atoms

    config = json.load(open(args.config))
    entries = read_folder(args.data)
    structures = [Atoms.from_dict(e["atoms"]) for e in entries]
    counts = []
    start = time.perf_counter()
    for atoms in structures:
        g, lg = Graph.atom_dgl_multigraph(
            atoms, neighbor_strategy=config["neighbor_strategy"], cutoff=float(config["cutoff"]),
            max_neighbors=config["max_neighbors"], atom_features=config["atom_features"],
            compute_line_graph=True, use_canonize=config["use_canonize"], dtype=config["dtype"])
        counts.append((int(g.num_edges()), int(lg.num_edges())))
    seconds = time.perf_counter() - start
    return {"num_structures": len(structures), "graph_seconds": seconds,
            "graph_structures_per_s": len(structures) / seconds,
            "ids": [e["jid"] for e in entries], "n_edge": [c[0] for c in counts],
            "n_triplet": [c[1] for c in counts], "peak_rss_mib": peak_rss_mib(), "versions": versions()}


def _mae(net, loader) -> tuple[float, int]:
    """Mean absolute error of ``net`` (eval mode) over ``loader``, and the structure count."""
    import torch

    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for g, lg, lattice, y in loader:
            out = net([g, lg, lattice]).reshape(-1)
            total += float(torch.abs(out - y.reshape(-1)).sum())
            count += int(y.numel())
    return total / max(count, 1), count


def train(args: argparse.Namespace) -> dict:
    """Trains the reference ALIGNN on the folder's split (``train`` command)."""
    import numpy as np
    import torch
    from alignn.config import TrainingConfig
    from alignn.data import get_train_val_loaders
    from alignn.models.alignn import ALIGNN
    from alignn.utils import group_decay, setup_optimizer

    config = TrainingConfig(**json.load(open(args.config)))
    os.makedirs(args.workdir, exist_ok=True)
    entries = read_folder(os.path.abspath(args.data))
    os.chdir(args.workdir)  # the LMDB caches are written relative to the working directory
    random.seed(config.random_seed)
    np.random.seed(config.random_seed)
    torch.manual_seed(config.random_seed)
    torch.set_default_dtype(torch.float32)

    start = time.perf_counter()
    train_loader, val_loader, test_loader, _ = get_train_val_loaders(
        dataset_array=entries, target="target", n_train=config.n_train, n_val=config.n_val,
        n_test=config.n_test, batch_size=config.batch_size, atom_features=config.atom_features,
        neighbor_strategy=config.neighbor_strategy, standardize=config.atom_features != "cgcnn",
        line_graph=config.compute_line_graph, id_tag=config.id_tag, pin_memory=config.pin_memory,
        workers=config.num_workers, use_canonize=config.use_canonize, filename=config.filename,
        cutoff=config.cutoff, cutoff_extra=config.cutoff_extra, max_neighbors=config.max_neighbors,
        three_body_cutoff=config.three_body_cutoff, output_features=config.model.output_features,
        keep_data_order=config.keep_data_order, output_dir=args.workdir, use_lmdb=config.use_lmdb,
        read_existing=False, dtype=config.dtype)
    data_seconds = time.perf_counter() - start
    collate = train_loader.dataset.collate_line_graph
    val_all = torch.utils.data.DataLoader(val_loader.dataset, batch_size=config.batch_size, shuffle=False,
                                          collate_fn=collate, drop_last=False)
    test_all = torch.utils.data.DataLoader(test_loader.dataset, batch_size=config.batch_size, shuffle=False,
                                           collate_fn=collate, drop_last=False)
    split_ids = {"train": list(train_loader.dataset.ids), "validation": list(val_loader.dataset.ids),
                 "test": list(test_loader.dataset.ids)}

    net = ALIGNN(config.model)
    optimizer = setup_optimizer(group_decay(net), config)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, epochs=config.epochs, steps_per_epoch=len(train_loader),
        pct_start=0.3)
    criterion = torch.nn.MSELoss()
    epochs, best = [], (float("inf"), -1, None)
    for epoch in range(config.epochs):
        net.train()
        loss_sum, seen = 0.0, 0
        epoch_start = time.perf_counter()
        for g, lg, lattice, y in train_loader:
            optimizer.zero_grad()
            out = net([g, lg, lattice]).reshape(-1)
            loss = criterion(out, y.reshape(-1))
            loss.backward()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss) * int(y.numel())
            seen += int(y.numel())
        epoch_time = time.perf_counter() - epoch_start
        val_mae, _ = _mae(net, val_all)
        if val_mae < best[0]:
            best = (val_mae, epoch, copy.deepcopy(net.state_dict()))
        epochs.append({"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "val_mae": val_mae,
                       "epoch_time_s": epoch_time, "structures_trained": seen,
                       "train_structures_per_s": seen / epoch_time, "lr_last_batch": lr})
        print(json.dumps(epochs[-1]), flush=True)
    test_last, n_test = _mae(net, test_all)
    net.load_state_dict(best[2])
    test_best, _ = _mae(net, test_all)
    return {"data_seconds": data_seconds, "num_parameters": sum(p.numel() for p in net.parameters()),
            "steps_per_epoch": len(train_loader), "split_ids": split_ids, "epochs": epochs,
            "best_epoch": best[1], "best_val_mae": best[0], "test_mae_best_val": test_best,
            "test_mae_last_epoch": test_last, "num_test": n_test, "peak_rss_mib": peak_rss_mib(),
            "versions": versions()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("graphs", "train"))
    parser.add_argument("--data", required=True, help="folder with id_prop.json")
    parser.add_argument("--config", required=True, help="TrainingConfig JSON")
    parser.add_argument("--workdir", help="output folder of `train` (LMDB caches)")
    parser.add_argument("--out", required=True, help="result JSON")
    args = parser.parse_args(argv)
    result = time_graphs(args) if args.command == "graphs" else train(args)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
