"""Pre-built models shipped inside the package, by name.

Each model is a minimal training workdir under ``scannet_jax/pretrained/<name>/``: the run's
``config.json``, ``domain.json`` and ``target_scaler.json``, its best-validation checkpoint
``best/<epoch>/`` (parameters and the network's other variables, no optimiser state) and its
model card (``model_card.json`` with every figure, ``MODEL_CARD.md`` for people). So a pre-built
model is read by exactly the code that reads a workdir (`predict.Predictor.from_workdir`,
`checkpoints.load_pretrained` for ``config.init_from``), and `export` makes one from any workdir.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from scannet_jax import checkpoints

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
CARD_FILE = "model_card.json"
CARD_TEXT = "MODEL_CARD.md"
# What `export` copies from a workdir, beside best/<epoch>.
WORKDIR_FILES = (checkpoints.CONFIG_FILE, checkpoints.DOMAIN_FILE, checkpoints.SCALER_FILE)


def names(root: Path = PRETRAINED_DIR) -> list[str]:
    """The names of the pre-built models under ``root``, sorted."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CARD_FILE).is_file())


def path(name: str, root: Path = PRETRAINED_DIR) -> Path:
    """The directory of pre-built model ``name``.

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    if name not in names(root):
        raise ValueError(f"no pre-built model {name!r}; available: {', '.join(names(root)) or 'none'}")
    return root / name


def card(name: str, root: Path = PRETRAINED_DIR) -> dict[str, Any]:
    """The model card of ``name`` (`export`'s ``card`` plus what it read from the workdir)."""
    return json.loads((path(name, root) / CARD_FILE).read_text())


def resolve(spec: str) -> str:
    """``spec`` if it is an existing path, else the directory of the pre-built model so named,
    else ``spec`` unchanged (the caller reports it as a missing path)."""
    if not spec or Path(spec).exists() or spec not in names():
        return spec
    return str(path(spec))


def card_markdown(values: dict[str, Any]) -> str:
    """The model card as Markdown: title, description, a table of the fields, the settings as JSON."""
    rows = [f"| {key.replace('_', ' ')} | {_cell(value)} |" for key, value in values.items()
            if key not in ("name", "description", "config")]
    settings = json.dumps(values.get("config", {}), indent=1)
    return "\n".join([f"# {values['name']}", "", values.get("description", ""), "",
                      "| field | value |", "|---|---|", *rows, "",
                      "Model and data settings of the run:", "", "```json", settings, "```", ""])


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def export(workdir: str | os.PathLike, name: str, card_fields: dict[str, Any],
           root: Path = PRETRAINED_DIR) -> Path:
    """Writes pre-built model ``name`` from a finished training workdir.

    Copies the workdir's config, domain and scaler files and its newest ``best/<epoch>``
    checkpoint, and writes the model card: ``card_fields`` (e.g. command, hardware, wall time;
    ``structures``, the split sizes, overrides the counts the run evaluated) and the run's
    test/validation MAE, best epoch and code version from ``results.json``. The directory appears complete or not at all (written beside and renamed).

    Raises:
      FileNotFoundError: if the workdir lacks one of these files or a best checkpoint.
    """
    workdir = Path(workdir)
    missing = [f for f in (*WORKDIR_FILES, "results.json") if not (workdir / f).is_file()]
    steps = sorted((int(p.name) for p in (workdir / checkpoints.BEST_DIR).glob("*") if p.name.isdigit()),
                   reverse=True)
    if missing or not steps:
        raise FileNotFoundError(f"{workdir}: not a finished training workdir (missing: "
                                f"{', '.join(missing + ([] if steps else [checkpoints.BEST_DIR + '/<epoch>']))})")
    results = json.loads((workdir / "results.json").read_text())
    scaler = json.loads((workdir / checkpoints.SCALER_FILE).read_text())
    values = {"name": name, "structures": results["num_structures"], **card_fields, "target": results["target"],
              "units": scaler.get("units", ""),
              "train_mae_on": results.get("train_mae_on", "the whole training split"),
              "best_epoch": results["best_epoch"],
              "epochs_run": results["epochs_run"], "stop_reason": results.get("stop_reason", ""),
              "mae": results["mae"], "rmse": results.get("rmse", {}),
              "config": {k: results["config"][k] for k in ("model", "data") if k in results["config"]},
              "code_version": results.get("code_version", {})}
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        for f in WORKDIR_FILES:
            shutil.copy2(workdir / f, staging / f)
        shutil.copytree(workdir / checkpoints.BEST_DIR / str(steps[0]),
                        staging / checkpoints.BEST_DIR / str(steps[0]))
        (staging / CARD_FILE).write_text(json.dumps(values, indent=1) + "\n")
        (staging / CARD_TEXT).write_text(card_markdown(values))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
