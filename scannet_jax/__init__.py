"""scannet_jax: SCANN / SCANN+ interpretable attention networks in JAX/Flax."""

__version__ = "0.1.0"
