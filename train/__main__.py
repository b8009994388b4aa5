"""``python -m train``: the training command line (:func:`train.cli.main`)."""

from train.cli import main

main()
