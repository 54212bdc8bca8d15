"""Stored models, the surrogate segmenter's and VoteNet+'s alike: ``<name>.safetensors`` (the weights; read with
``safetensors`` only, so loading never unpickles anything) and ``<name>.json`` (the description, written last,
atomically, naming the weight file under ``"weights"``)."""
from __future__ import annotations

import os
from pathlib import Path
import math
from typing import Any, Callable, Optional, TypeVar

import torch

from .errors import MASRefineError
from .imageio import atomic_write_bytes
from .jsonio import field_error, read_json, write_json

T = TypeVar("T")


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


def load_model(path: str | os.PathLike, name: str, what: str, fmt: str,
               build: Callable[[Path, dict[str, Any]], tuple[torch.nn.Module, T]], missing: Callable[[Path], str],
               version: Optional[int] = None) -> tuple[Path, T]:
    """A stored model: its description ``<name>.json`` (``path`` itself, or in the folder ``path`` or its
    ``models/``), checked for ``"format": fmt`` (and ``"format_version": version`` when given), then
    ``build(json path, description)`` -> (network, the model object) and the network's weights loaded.
    Returns (the description's path, the model). Every problem is one :class:`MASRefineError` line naming the
    file (``what``: e.g. "VoteNet+"); ``missing(folder)`` words it for a folder without a description, and a
    KeyError/TypeError/ValueError in ``build`` is a malformed description (the field named)."""
    p = Path(path)
    if p.is_dir():
        found = find_description(p, name)
        if found is None:
            raise MASRefineError(missing(p))
        p = found
    if not p.is_file():
        raise MASRefineError(f"{p}: {what} description not found")
    doc = read_json(p, f"{what} description", allow_nan=True)  # written by save_model: NaN (a Dice) allowed
    d = doc if isinstance(doc, dict) else {}
    if d.get("format") != fmt or (version is not None and d.get("format_version") != version):
        raise MASRefineError(f"{p}: not a {what} model (format {d.get('format')!r} version {d.get('format_version')!r})")
    try:  # a description edited by hand or cut short: one line naming the field
        net, model = build(p, d)
    except (KeyError, TypeError, ValueError, AttributeError, AssertionError, RuntimeError) as e:
        raise MASRefineError(f"{p}: malformed {what} description ({field_error(e)})") from None
    load_weights(net, weights_path(p, d, name), p, what)
    return p, model


def ceil_to(n: int, m: int) -> int:
    """The smallest multiple of ``m`` that is at least ``n`` (window sizes of the models' sliding-window inference)."""
    return int(math.ceil(n / m) * m)
