"""Data arguments → the library's data sources.

A data argument is a task name of the CLI (``"sst2"``, ``"bbc-news"``), a folder (one subfolder
per class), a CSV/TSV/JSONL file, or in-memory examples: a list of texts with ``labels=``, a list
of ``(text, label)`` pairs or of dicts, a dict of columns, or a pandas DataFrame (pandas is not a
dependency: anything with ``to_dict("records")`` works). In-memory examples are written once to a
JSONL file named by its content under the asset cache, so that a run records where its data is
and ``evaluate`` and ``resume`` find it again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import DeltaTuneFileNotFoundError, InvalidArgumentError

DEMO_NAMES = ("bbc-news", "demo")


def cache_dir() -> Path:
    """deltatune's asset cache (``DELTATUNE_HOME`` or the user cache directory)."""
    home = os.environ.get("DELTATUNE_HOME")
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "deltatune"


def data_root(data_dir: Optional[str]) -> str:
    """The root of named tasks: ``data_dir``, ``DELTATUNE_DATA``, or ``../shared/data``."""
    root = data_dir or os.environ.get("DELTATUNE_DATA") or os.path.join("..", "shared", "data")
    return os.path.abspath(root)


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or s.endswith((".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".json"))


def _records(data: Any, labels: Optional[Sequence[Any]], text_column: str, label_column: str, pair_column: Optional[str]) -> List[Dict[str, Any]]:
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # a pandas DataFrame
        rows = data.to_dict("records")
    elif isinstance(data, dict):
        cols = {k: list(v) for k, v in data.items()}
        n = {len(v) for v in cols.values()}
        if len(n) > 1:
            raise InvalidArgumentError(f"invalid data: the columns have different lengths ({sorted(n)})")
        count = n.pop() if n else 0
        rows = [{k: cols[k][i] for k in cols} for i in range(count)]
    else:
        rows = list(data)
    if labels is not None:
        if len(labels) != len(rows):
            raise InvalidArgumentError(f"invalid labels: {len(labels)} labels for {len(rows)} texts")
        rows = [{text_column: t, label_column: lab} for t, lab in zip(rows, labels)]
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, dict):
            rec = dict(r)
        elif isinstance(r, (tuple, list)) and len(r) in (2, 3):
            rec = {text_column: r[0], label_column: r[-1]}
            if len(r) == 3:
                rec[pair_column or "text_pair"] = r[1]
        elif isinstance(r, str):
            raise InvalidArgumentError(f"invalid data: example {i} is a bare text; pass labels=[...] or (text, label) pairs")
        else:
            raise InvalidArgumentError(f"invalid data: example {i} is a {type(r).__name__}; expected a dict or a (text, label) pair")
        for key in (text_column, label_column):
            if key not in rec:
                raise InvalidArgumentError(f"invalid data: example {i} has no `{key}` field (fields: {', '.join(map(str, rec))})")
        lab = rec[label_column]
        if hasattr(lab, "item"):  # numpy scalars
            rec[label_column] = lab.item()
        out.append(rec)
    if not out:
        raise InvalidArgumentError("invalid data: no examples")
    return out


def _write_jsonl(records: List[Dict[str, Any]]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True, default=str) + "\n" for r in records)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]
    d = cache_dir() / "python-data"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{digest}.jsonl"
    if not path.exists():
        tmp = d / f".{digest}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return str(path)


def source(
    data: Any,
    *,
    labels: Optional[Sequence[Any]] = None,
    eval_data: Any = None,
    eval_labels: Optional[Sequence[Any]] = None,
    text_column: str = "text",
    text_pair_column: Optional[str] = None,
    label_column: str = "label",
    regression: bool = False,
    data_dir: Optional[str] = None,
    format: Optional[str] = None,
) -> Dict[str, Any]:
    """The library's ``DataSource`` (as a dict) for a data argument."""
    columns = {"text": text_column, "text_pair": text_pair_column, "label": label_column}

    def file_of(d: Any, labs: Optional[Sequence[Any]]) -> str:
        if isinstance(d, (str, os.PathLike)):
            p = os.fspath(d)
            if not os.path.isfile(p):
                raise DeltaTuneFileNotFoundError(f"{p}: data file not found")
            return os.path.abspath(p)
        return _write_jsonl(_records(d, labs, text_column, label_column, text_pair_column))

    if isinstance(data, (str, os.PathLike)) and eval_data is None:
        s = os.fspath(data)
        if s in DEMO_NAMES:
            return {"source": "demo"}
        if os.path.isdir(s):
            return {"source": "folder", "path": os.path.abspath(s)}
        if os.path.isfile(s):
            pass
        elif _looks_like_path(s):
            raise DeltaTuneFileNotFoundError(f"{s}: no such data file or folder")
        else:
            return {"source": "task", "name": s, "root": data_root(data_dir)}
    if isinstance(data, (str, os.PathLike)) and os.path.isdir(os.fspath(data)):
        raise InvalidArgumentError("invalid eval_data: a folder data set holds out its own dev split")
    train = file_of(data, labels)
    dev = file_of(eval_data, eval_labels) if eval_data is not None else None
    fmt = format
    if fmt is None and not isinstance(data, (str, os.PathLike)):
        fmt = "jsonl"
    return {"source": "user", "train": train, "dev": dev, "columns": columns, "format": fmt, "regression": regression}


def texts_of(texts: Any) -> List[Tuple[str, Optional[str]]]:
    """Texts for predict/embed: a string, a list of strings or of (text, pair) tuples."""
    if isinstance(texts, str):
        texts = [texts]
    out: List[Tuple[str, Optional[str]]] = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            out.append((t, None))
        elif isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(x, str) for x in t):
            out.append((t[0], t[1]))
        else:
            raise InvalidArgumentError(f"invalid texts: item {i} is {type(t).__name__}; expected a string or a (text, pair) tuple")
    return out


def label_of(data: Any) -> str:
    """A short name of the data for run directories."""
    if isinstance(data, (str, os.PathLike)):
        s = os.fspath(data)
        return "bbc-news" if s in DEMO_NAMES else Path(s).stem or "data"
    return "data"
