"""JSON files of the project (reports, model descriptions, manifests): one encoder for numpy / torch / path
values, atomic writes, and reads that fail with a one-line error naming the file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import MASRefineError


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)``: numpy scalars and arrays, torch tensors (``tolist``) and paths; anything
    else raises TypeError (a report must not silently hold ``repr`` strings)."""
    if hasattr(o, "item") and getattr(o, "ndim", None) == 0:  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):  # numpy arrays, torch tensors
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(obj: Any, path: str | os.PathLike, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`imageio.atomic_write_text`); returns the path."""
    from .imageio import atomic_write_text  # imported here: the worker uses this module before its dependency check
    return atomic_write_text(json.dumps(obj, indent=indent, default=json_default) + "\n", path)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed content of ``path``; MASRefineError naming the file when it is missing or not JSON."""
    p = Path(path)
    if not p.is_file():
        raise MASRefineError(f"{p}: {what} not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MASRefineError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise MASRefineError(f"{p}: not a text (UTF-8) file") from None
