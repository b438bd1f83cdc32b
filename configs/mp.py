"""Entry point for ``--config=configs/mp.py:...``: the packaged config ``scannet_jax.configs.mp``."""

from scannet_jax.configs.mp import get_config  # noqa: F401
