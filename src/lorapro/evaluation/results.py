"""Evaluation results on disk: ``summary.json`` per run, per-example JSONL files, tables, comparisons.

``summary.json`` (one per ``lorapro eval`` run)::

    {"task": "gsm8k", "run_name": "...", "metrics": {"accuracy": 0.41}, "n": 1319,
     "model": {"name": ..., "adapter": ...}, "files": {"predictions": "predictions.jsonl"},
     "details": {...task specific, e.g. the sandbox isolation...}, "config": {...the full EvalConfig...},
     "lorapro_version": "0.1.0", "created": "2025-01-01T12:00:00+00:00", "elapsed_s": 812.3}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = ["write_json", "write_jsonl", "make_summary", "format_table", "compare_table", "load_summary"]


def write_json(path: os.PathLike, obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def write_jsonl(path: os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(p, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lorapro")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "unknown"


def make_summary(
    task: str,
    metrics: Mapping[str, Any],
    n: int,
    *,
    run_name: str,
    model: Mapping[str, Any],
    files: Mapping[str, str],
    config: Mapping[str, Any],
    details: Optional[Mapping[str, Any]] = None,
    elapsed_s: Optional[float] = None,
) -> Dict[str, Any]:
    return {
        "task": task,
        "run_name": run_name,
        "metrics": dict(metrics),
        "n": n,
        "model": dict(model),
        "files": dict(files),
        "details": dict(details or {}),
        "config": dict(config),
        "lorapro_version": _version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": None if elapsed_s is None else round(elapsed_s, 2),
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), line, *[fmt(r) for r in rows]])


def _flat_metrics(summary: Mapping[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in summary.get("metrics", {}).items():
        if isinstance(v, Mapping):
            for k2, v2 in v.items():
                out[f"{k}.{k2}"] = v2
        else:
            out[k] = v
    return out


def format_table(summary: Mapping[str, Any]) -> str:
    """A readable block: task, model, n, then one metric per line."""
    model = summary.get("model", {})
    head = f"{summary.get('task')} | {summary.get('run_name')} | model {model.get('name')}"
    if model.get("adapter"):
        head += f" + adapter {model['adapter']}"
    rows = [[k, _fmt(v)] for k, v in _flat_metrics(summary).items()]
    rows.append(["n", _fmt(summary.get("n"))])
    return head + "\n" + _grid(["metric", "value"], rows)


def load_summary(path: str) -> Dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.is_file():
        raise FileNotFoundError(f"'{path}' is neither a summary.json nor a run directory holding one.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e.msg}).") from None
    if not isinstance(data, dict) or "metrics" not in data:
        raise ValueError(f"{p} is not a lorapro evaluation summary (no 'metrics').")
    return data


def compare_table(summaries: Sequence[Mapping[str, Any]], labels: Optional[Sequence[str]] = None) -> str:
    """Runs side by side: one column per run, one row per ``task: metric`` (``-`` where a run lacks it)."""
    labels = list(labels or [str(s.get("run_name") or f"run{i}") for i, s in enumerate(summaries)])
    # disambiguate equal labels
    seen: Dict[str, int] = {}
    for i, l in enumerate(labels):
        if l in seen:
            seen[l] += 1
            labels[i] = f"{l} ({seen[l]})"
        else:
            seen[l] = 1
    keys: List[str] = []
    for s in summaries:
        for k in [*_flat_metrics(s).keys(), "n"]:
            key = f"{s.get('task')}: {k}"
            if key not in keys:
                keys.append(key)
    rows = []
    for key in keys:
        task, metric = key.split(": ", 1)
        row = [key]
        for s in summaries:
            if s.get("task") != task:
                row.append("-")
            elif metric == "n":
                row.append(_fmt(s.get("n")))
            else:
                row.append(_fmt(_flat_metrics(s).get(metric)))
        rows.append(row)
    return _grid(["metric", *labels], rows)
