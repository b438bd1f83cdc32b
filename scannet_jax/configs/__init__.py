"""Training configs shipped with the package, addressable by name or by path.

``--config=qm9:homo`` names the packaged ``scannet_jax/configs/qm9.py`` with the argument
``homo``; ``--config=configs/qm9.py:homo`` (the checkout's entry-point files, which re-export
these modules) and any other path to a file with ``get_config(arg)`` keep working unchanged.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
# Modules here that are helpers, not configs.
_HELPERS = frozenset({"__init__", "common"})


def names() -> list[str]:
    """The packaged configs' names, e.g. ``['files', 'fullerene', 'mp', 'pt_graphene', 'qm9']``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in _HELPERS)


def resolve(spec: str) -> str:
    """``name[:arg]`` → ``<package>/configs/name.py[:arg]``; a path (anything else) is returned as is.

    Raises:
      ValueError: ``spec`` is neither an existing file nor a packaged config's name.
    """
    head, sep, arg = spec.partition(":")
    if head in names():
        return f"{CONFIG_DIR / head}.py{sep}{arg}"
    if not Path(head).is_file():
        raise ValueError(f"--config={spec}: {head!r} is neither a config file nor a packaged "
                         f"config's name (known names: {', '.join(names())})")
    return spec
