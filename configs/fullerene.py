"""Entry point for ``--config=configs/fullerene.py:...``: the packaged config ``scannet_jax.configs.fullerene``."""

from scannet_jax.configs.fullerene import get_config  # noqa: F401
