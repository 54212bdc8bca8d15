"""Sub-commands of the ``masrefine`` CLI, one module each.

Each module defines ``add_parser(subparsers)`` which adds its parser and sets ``func`` to a function
taking the parsed arguments and returning an exit code. Heavy imports (torch, MONAI) happen inside
those functions so ``masrefine --help`` stays instant. ``_common`` holds what several commands share
(argparse number types, ``--groups``, the target-grid check); output paths are checked by
:mod:`MASRefineLib.outputs`.
"""
