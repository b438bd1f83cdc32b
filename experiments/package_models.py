"""Writes one pre-built model into the package (``scannet_jax/pretrained/<name>/``) from a
finished training workdir, with its model card.

    python experiments/package_models.py --workdir=runs/qm9_homo_pre --name=scannplus-qm9-homo \\
        --time_logs=runs/qm9_homo_pre.log --paper_mae="0.032 eV (reference §3, 1,000 epochs)" \\
        --command="python main.py --config=configs/qm9.py:homo --workdir=runs/qm9_homo_pre ..."

The card holds the exact command(s), the hardware, wall and CPU time read from the ``/usr/bin/time
-v`` output of each invocation (``--time_logs``, in order; a resumed run has two), the figure of
the paper where one exists, and what `pretrained.export` reads from the workdir (data, split
sizes, test/validation MAE, best epoch, featuriser and model settings, code version). Afterwards
it predicts the workdir's own test split through the packaged copy and checks that the test MAE
equals the workdir's, so the card's figure is the shipped model's.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

from absl import app, flags

flags.DEFINE_string("workdir", None, "finished training workdir")
flags.DEFINE_string("name", None, "name of the pre-built model, e.g. scannplus-qm9-homo")
flags.DEFINE_string("description", "", "one paragraph for the card")
flags.DEFINE_list("commands", [], "the training command(s) as run, in order")
flags.DEFINE_list("time_logs", [], "files holding each command's /usr/bin/time -v output, in order")
flags.DEFINE_string("hardware", "", "where it was trained (default: this machine's CPU and core count)")
flags.DEFINE_string("schedule", "", "how it shared the machine, e.g. 'one core (taskset), beside another run'")
flags.DEFINE_string("paper_mae", "", "the paper's test MAE for this target, with its source")
FLAGS = flags.FLAGS


def _time_figures(path: str) -> dict[str, float]:
    """Wall, user and system seconds from a ``/usr/bin/time -v`` report."""
    text = Path(path).read_text(errors="replace")

    def seconds(label: str) -> float:
        match = re.search(rf"{label} \(seconds\): ([0-9.]+)", text)
        if not match:
            raise ValueError(f"{path}: no '{label}' line of /usr/bin/time -v")
        return float(match.group(1))

    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([0-9:.]+)", text)
    if not wall:
        raise ValueError(f"{path}: no wall-clock line of /usr/bin/time -v")
    parts = [float(p) for p in wall.group(1).split(":")]
    wall_s = sum(p * 60 ** k for k, p in enumerate(reversed(parts)))
    return {"wall_s": wall_s, "user_s": seconds("User time"), "system_s": seconds("System time")}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str]) -> None:
    del argv
    from scannet_jax import pretrained

    times = [_time_figures(p) for p in FLAGS.time_logs]
    wall_h = sum(t["wall_s"] for t in times) / 3600
    cpu_h = sum(t["user_s"] + t["system_s"] for t in times) / 3600
    fields = {
        "description": FLAGS.description,
        "training": f"{wall_h:.2f} h wall, {cpu_h:.2f} CPU-h",
        "commands": " ; then ".join(FLAGS.commands),
        "hardware": FLAGS.hardware or f"{_cpu_name()}, {os.cpu_count()} cores, no GPU",
        "schedule": FLAGS.schedule,
        "time": {"wall_h": round(wall_h, 3), "cpu_h": round(cpu_h, 3), "invocations": len(times)},
        "paper_test_mae": FLAGS.paper_mae or "none published for this data set",
    }
    data = run_datasets(Path(FLAGS.workdir))
    # The split sizes: the run's results count only the structures it evaluated.
    fields["structures"] = {split: len(index) for split, index in data.splits.items()}
    final = pretrained.export(FLAGS.workdir, FLAGS.name, fields)
    print(f"wrote {final} ({sum(f.stat().st_size for f in final.rglob('*') if f.is_file()) / 2**20:.1f} MiB)")
    print(json.dumps({k: v for k, v in pretrained.card(FLAGS.name).items() if k != "config"}, indent=1))
    check_test_mae(FLAGS.name, data)


def run_datasets(workdir: Path):
    """The data set and splits of a training workdir's run (`train.get_datasets` on its config)."""
    import ml_collections

    from scannet_jax import train

    return train.get_datasets(ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text())))


def check_test_mae(name: str, data) -> None:
    """Predicts the run's test split (``data``, `run_datasets`) through the packaged model; its MAE
    must equal the card's."""
    import numpy as np

    from scannet_jax import predict, pretrained

    card = pretrained.card(name)
    test = data.test
    predictor = predict.Predictor.pretrained(name)
    values = np.array([p.value for p in predictor.predict_store(test)])
    truth = np.asarray(test.targets[data.target])
    mae = float(np.nanmean(np.abs(values - truth)))
    predictor.close()
    print(f"{name}: test MAE through the packaged model {mae:.6g} {card['units']}, card {card['mae']['test']:.6g}")
    if not np.isclose(mae, card["mae"]["test"], rtol=1e-4, atol=1e-6):
        raise SystemExit(f"{name}: the packaged model's test MAE {mae} differs from the run's {card['mae']['test']}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "name"])
    app.run(main)
