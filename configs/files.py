"""Entry point for ``--config=configs/files.py:...``: the packaged config ``scannet_jax.configs.files``."""

from scannet_jax.configs.files import get_config  # noqa: F401
