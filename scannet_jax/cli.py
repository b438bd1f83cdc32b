"""The command line: ``scannet-jax`` (installed by pip) and ``python main.py`` in a checkout.

Usage::

    scannet-jax train --config=qm9:homo --workdir=runs/qm9_homo [--config.batch_size=64 ...]
    scannet-jax predict --model=scannplus-qm9-homo mols.xyz --png=pictures
    scannet-jax predict --list-models
    python main.py --config=configs/qm9.py:homo --workdir=runs/qm9_homo   # "train" implied

``--config`` takes a packaged config's name (``qm9``, ``mp``, ``files``, ``fullerene``,
``pt_graphene``; `scannet_jax.configs`) or a path to a config file, each with its ``:argument``.
Training trains (or resumes, if ``--workdir`` holds a checkpoint) and evaluates one model; every
config field can be overridden, e.g. ``--config.batch_size=64``. SIGTERM or Ctrl-C saves a
checkpoint and exits with status 128 + the signal number (143, 130); the same command resumes.
``predict`` is `scannet_jax.cli_predict`.
"""

from __future__ import annotations

import logging as std_logging
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from scannet_jax import configs, host_memory

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config: a packaged config's name or a file path, "
                                "then :argument (e.g. qm9:homo).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")


def train(argv: list[str]) -> None:
    """absl main of ``train``: sets up logging into the workdir and runs `train.train_and_evaluate`."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config.get("keep_freed_host_memory", False):
        host_memory.keep_freed_memory()  # before JAX starts its threads
    from scannet_jax import parallel, train as training  # after flag parsing: JAX starts here

    distributed = FLAGS.config.distributed
    parallel.initialize_distributed(distributed.coordinator_address, distributed.num_processes,
                                    distributed.process_id)
    workdir = Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = std_logging.FileHandler(workdir / "train.log")
    log_file.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    std_logging.getLogger().addHandler(log_file)
    logging.set_verbosity(logging.WARNING)  # libraries logging through absl (Orbax) only warn
    std_logging.getLogger("scannet_jax").setLevel(std_logging.INFO)
    results = training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if "signal" in results:  # stopped by SIGTERM / SIGINT after saving a checkpoint
        sys.exit(128 + results["signal"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line error for a ``--config.<key>`` the config lacks."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as err:  # raised by ml_collections for an unknown field
        text = str(err.args[0] if err.args else err).replace("\\n", "\n").replace("\\'", "'")
        keys = [a.split("=")[0][len("--config."):] for a in argv if a.startswith("--config.")]
        key = next((k for k in keys if f"'{k.split('.')[-1]}'" in text), keys[0] if keys else text)
        hint = next((line.rstrip("'\"") for line in text.splitlines() if line.startswith("Did you mean")), "")
        sys.exit(f"error: --config.{key}: the config has no field {key.split('.')[-1]!r}"
                 + (f". {hint}" if hint else " (the fields are those set in the config file)"))
    except flags.Error as err:
        sys.exit(f"error: {err}\nPass --help for usage.")


def resolve_config_flag(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--config`` (``--config=X`` or ``--config X``) resolved by
    `configs.resolve` (a packaged config's name becomes its file's path)."""
    out = list(argv)
    for k, arg in enumerate(out):
        try:
            if arg.startswith("--config="):
                out[k] = "--config=" + configs.resolve(arg[len("--config="):])
            elif arg == "--config" and k + 1 < len(out):
                out[k + 1] = configs.resolve(out[k + 1])
        except ValueError as err:
            sys.exit(f"error: {err}")
    return out


def main() -> None:
    """The process's entry point (``scannet-jax``, ``python main.py``): `run` on ``sys.argv``, in a
    process restarted once with transparent huge pages for the heap (`host_memory`)."""
    host_memory.restart_with_huge_pages()
    run()


def run(argv: list[str] | None = None) -> None:
    """Dispatches ``[prog, "train" | "predict" | flags...]``; no subcommand means ``train``."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 1 and argv[1] == "predict":
        from scannet_jax import cli_predict

        sys.exit(cli_predict.main(argv[2:]))
    if len(argv) > 1 and argv[1] == "train":
        argv = [f"{argv[0]} train", *argv[2:]]
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(train, argv=resolve_config_flag(argv), flags_parser=parse_flags)
