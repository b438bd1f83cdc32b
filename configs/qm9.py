"""Entry point for ``--config=configs/qm9.py:...``: the packaged config ``scannet_jax.configs.qm9``."""

from scannet_jax.configs.qm9 import get_config  # noqa: F401
