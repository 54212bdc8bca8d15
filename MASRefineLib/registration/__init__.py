"""Affine and deformable registration of atlases to a target (torch, batched over atlases, any device).

See :mod:`.params` for every parameter with its unit and the presets, :func:`register` for the
orchestration, :mod:`.affine` and :mod:`.deformable` for the two stages.
"""
from .params import PRESETS, RegistrationParams, get_params
from .register import AtlasInput, register

__all__ = ["PRESETS", "RegistrationParams", "get_params", "AtlasInput", "register"]
