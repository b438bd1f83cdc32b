"""Entry point in a checkout: ``python main.py --config=configs/qm9.py:homo --workdir=runs/qm9_homo``.

The same command line as the installed ``scannet-jax`` (`scannet_jax.cli`): ``train`` is implied,
``python main.py predict ...`` predicts.
"""

from scannet_jax import cli

if __name__ == "__main__":
    cli.main()
