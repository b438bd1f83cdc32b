"""Entry point for ``--config=configs/pt_graphene.py:...``: the packaged config ``scannet_jax.configs.pt_graphene``."""

from scannet_jax.configs.pt_graphene import get_config  # noqa: F401
