"""Device selection: ``auto`` picks CUDA when available, else the CPU."""
from __future__ import annotations

import torch

from .errors import MASRefineError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Map ``auto|cpu|cuda|cuda:N`` (or a torch.device) to a usable torch.device."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MASRefineError(f"device '{name}' requested but CUDA is not available (use --device cpu or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise MASRefineError(f"unknown device '{name}' (expected auto, cpu or cuda)")
    return torch.device(name)
