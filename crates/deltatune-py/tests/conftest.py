"""Shared fixtures: the default model (loaded once), the golden PEFT fixtures in ../shared, and a
small numpy reader of safetensors files (so the tests need no torch)."""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import deltatune as dt

ROOT = Path(__file__).resolve().parents[3]
SHARED = Path(os.environ.get("DELTATUNE_SHARED", ROOT.parent / "shared"))
GOLDEN = SHARED / "golden"


def read_safetensors(path):
    """{name: numpy array} of a safetensors file (F32 and I64 tensors)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    out = {}
    dtypes = {"F32": "<f4", "I64": "<i8", "F16": "<f2"}
    for name, info in header.items():
        a, b = info["data_offsets"]
        buf = raw[8 + n + a : 8 + n + b]
        out[name] = np.frombuffer(buf, dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


@pytest.fixture(scope="session")
def golden():
    if not (GOLDEN / "manifest.json").is_file():
        pytest.skip(f"no golden fixtures at {GOLDEN} (the shared/ folder beside the checkout)")
    return GOLDEN


@pytest.fixture(scope="session")
def manifest(golden):
    return json.loads((golden / "manifest.json").read_text())


@pytest.fixture()
def base():
    """A fresh default model (cheap: the weights are memory-mapped)."""
    return dt.load(verbose=False)


@pytest.fixture(scope="session")
def labelled():
    """A small two-class data set, in memory: texts and labels."""
    pos = [
        "a wonderful, moving film with great acting",
        "I loved every minute of this delightful story",
        "brilliant direction and a superb cast",
        "an excellent and heartwarming movie",
        "funny, smart and beautifully shot",
        "one of the best films of the year",
        "a joyful, charming experience",
        "the performances are outstanding",
        "great script, great music, great fun",
        "a masterpiece that moved me to tears",
        "truly inspiring and well made",
        "an absolute pleasure to watch",
    ]
    neg = [
        "a dull, boring film with terrible acting",
        "I hated every minute of this awful story",
        "poor direction and a weak cast",
        "a dreadful and tedious movie",
        "unfunny, stupid and badly shot",
        "one of the worst films of the year",
        "a miserable, annoying experience",
        "the performances are embarrassing",
        "bad script, bad music, no fun",
        "a disaster that put me to sleep",
        "truly pointless and badly made",
        "an absolute chore to sit through",
    ]
    texts = [t for pair in zip(pos, neg) for t in pair]
    labels = ["pos" if i % 2 == 0 else "neg" for i in range(len(texts))]
    return texts, labels
