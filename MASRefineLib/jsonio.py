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
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`protocol.atomic.atomic_write_text`); returns the path."""
    from .protocol.atomic import atomic_write_text
    return atomic_write_text(json.dumps(obj, indent=indent, default=json_default) + "\n", path)


#: the largest JSON file the project reads (job files, atlas.json, label tables, model descriptions, reports:
#: kilobytes to a few MB); a larger one is refused before it is read into memory
MAX_JSON_BYTES = 64 * 2 ** 20


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str, source: str | os.PathLike, allow_nan: bool = False) -> Any:
    """Parse JSON text with every failure as one line naming ``source``: invalid JSON, nesting too deep for the
    parser, numbers too long to convert and, unless ``allow_nan``, ``NaN``/``Infinity`` (not JSON, though
    Python writes them: files the project wrote itself, reports and model descriptions, may hold them)."""
    try:
        return json.loads(text, parse_constant=None if allow_nan else _no_constant)
    except json.JSONDecodeError as e:
        raise MASRefineError(f"{source}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise MASRefineError(f"{source}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # NaN/Infinity, integers beyond Python's digit limit
        raise MASRefineError(f"{source}: invalid JSON ({str(e).splitlines()[0]})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file", allow_nan: bool = False) -> Any:
    """The parsed content of ``path``; one-line MASRefineError naming the file when it is missing, a folder,
    unreadable, larger than :data:`MAX_JSON_BYTES`, not UTF-8 or not JSON (:func:`parse_json`). The one JSON
    reader of every input the project reads."""
    p = Path(path)
    if not p.exists():
        raise MASRefineError(f"{p}: {what} not found")
    if not p.is_file():
        raise MASRefineError(f"{p}: {what} is not a file")
    try:
        if p.stat().st_size > MAX_JSON_BYTES:
            raise MASRefineError(f"{p}: {what} of {p.stat().st_size:,} bytes exceeds {MAX_JSON_BYTES:,} bytes")
        data = p.read_bytes()
    except OSError as e:
        raise MASRefineError(f"{p}: {what} cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is allowed
    except UnicodeDecodeError:
        raise MASRefineError(f"{p}: not a text (UTF-8) file") from None
    return parse_json(text, p, allow_nan)


def field_error(e: BaseException) -> str:
    """A KeyError / TypeError / ValueError from taking a JSON document apart, in words for a one-line error."""
    if isinstance(e, KeyError):
        return f"missing field {e.args[0]!r}" if e.args else "missing field"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"wrong field value ({msg})"
