"""Reading JSON Lines files (``.jsonl`` or ``.jsonl.gz``) with errors that name the file and line."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple, Union

__all__ = ["iter_jsonl", "read_jsonl"]


def iter_jsonl(path: Union[str, os.PathLike], what: str = "JSONL") -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line; ``ValueError("FILE:LINE: ...")`` on a bad line.

    Raises ``FileNotFoundError`` (mentioning ``what``, e.g. "GSM8K") when the file does not exist.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file '{p}' does not exist.")
    opener: Any = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not valid JSON ({e.msg}).") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}.")
            yield lineno, rec


def read_jsonl(path: Union[str, os.PathLike], what: str = "JSONL") -> List[Dict[str, Any]]:
    """Every record of a JSON Lines file (see :func:`iter_jsonl`)."""
    return [rec for _, rec in iter_jsonl(path, what)]
