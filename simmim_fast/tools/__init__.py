"""After-pretraining tools: reconstructions, timm export, kNN / linear probe, fine-tuning.

Each tool is a module with ``add_arguments(parser)`` and ``main(args)`` (a ``simmim-fast``
subcommand) plus plain functions that scripts and the training engine can call. Heavy imports stay
inside the modules so that importing this package costs nothing.
"""
