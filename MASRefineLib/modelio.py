"""Stored models, the surrogate segmenter's and VoteNet+'s alike: ``<name>.safetensors`` (the weights; read with
``safetensors`` only, so loading never unpickles anything) and ``<name>.json`` (the description, written last,
atomically, naming the weight file under ``"weights"``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import MASRefineError
from .imageio import atomic_write_bytes
from .jsonio import write_json


def save_model(models_dir: str | os.PathLike, name: str, net: torch.nn.Module, description: dict[str, Any],
               metadata: Optional[dict[str, str]] = None) -> Path:
    """Write ``<models_dir>/<name>.safetensors`` (``net``'s state, with the safetensors header ``metadata``), then
    ``<name>.json`` (``description``); returns the JSON path."""
    from safetensors.torch import save
    d = Path(models_dir)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(save(state, metadata=metadata), d / f"{name}.safetensors")
    return write_json(description, d / f"{name}.json")


def find_description(folder: Path, name: str) -> Optional[Path]:
    """``<folder>/<name>.json`` or ``<folder>/models/<name>.json`` (an atlas set), the first that is a file."""
    return next((c for c in (folder / f"{name}.json", folder / "models" / f"{name}.json") if c.is_file()), None)


def weights_path(description_path: Path, description: dict[str, Any], name: str) -> Path:
    """The weight file a description names (beside it), ``<name>.safetensors`` when it names none."""
    return description_path.parent / str(description.get("weights", f"{name}.safetensors"))


def load_weights(net: torch.nn.Module, weights: Path, description_path: Path, what: str) -> None:
    """Load ``weights`` into ``net`` (strictly, on the CPU); a missing, corrupt or mismatched file is one
    :class:`MASRefineError` line naming it (``what``: e.g. "VoteNet+")."""
    from safetensors.torch import load_file
    if not weights.is_file():
        raise MASRefineError(f"{weights}: weights listed in {description_path.name} are missing")
    try:
        net.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    except Exception as e:  # noqa: BLE001 - a corrupt (SafetensorError) or mismatched weight file is a user error
        raise MASRefineError(f"{weights}: cannot load the {what} weights ({str(e).splitlines()[0]})") from None
