"""Strict JSON for files from elsewhere: bounded nesting, no NaN/Infinity, no duplicate keys.

Python's ``json`` recurses once per nesting level, so a deeply nested file
(``[[[[...`` 200,000 levels) raises RecursionError, or with a raised recursion
limit overflows the C stack. The depth is therefore measured before parsing,
without recursion, and bounded.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Tuple, Union

import numpy as np

__all__ = ["loads", "json_depth", "MAX_DEPTH"]

#: Deepest nesting accepted: mixquant's own files nest at most 4 levels.
MAX_DEPTH = 32

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """Deepest bracket nesting of JSON ``text`` (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def _reject_constant(token: str) -> None:
    raise ValueError(f"non-finite number {token}")


def _reject_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # json would keep the last silently; a tampered file could hide a field
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads(raw: Union[str, bytes], *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``raw`` (UTF-8 bytes or text) strictly; ValueError for anything else.

    Refused: invalid UTF-8 or JSON, a byte-order mark, NaN/Infinity, duplicate
    keys, integers too long to convert (Python's digit limit), and nesting
    deeper than ``max_depth``. The message starts with "JSON nested too
    deeply" or "invalid JSON".
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    if not isinstance(text, str):
        raise ValueError(f"invalid JSON: expected text, got {type(text).__name__}")
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"JSON nested too deeply ({depth} levels, at most {max_depth})")
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_reject_duplicates)
    except RecursionError:  # not reached after the depth check; kept as a guard
        raise ValueError("JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, huge integers, NaN, duplicates
        raise ValueError(f"invalid JSON: {exc}") from None
