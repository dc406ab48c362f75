"""deltatune: delta tuning (parameter-efficient fine-tuning) of transformers without torch.

PEFT's names on a Rust core::

    import deltatune as dt

    model = dt.load()                                   # all-MiniLM-L6-v2, fetched on first use
    config = dt.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    model = dt.get_peft_model(model, config)
    model.print_trainable_parameters()                  # trainable params: 73,728 || ...
    model.train("bbc-news", epochs=1, lr=2e-3, max_length=64)
    model.save_pretrained("bbc-lora")
    print(model.predict(["Shares rose sharply after the results."]))

Long work releases the GIL, shows a progress bar (``verbose=False`` silences it), calls an
optional ``callback`` with the step metrics, and stops cleanly on Ctrl-C. Errors are
:class:`DeltaTuneError` subclasses (see :mod:`deltatune.errors`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional, Union

from . import _data, _native
from ._progress import Callback, Reporter
from .config import (
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    CompacterConfig,
    FullFinetuneConfig,
    IA3Config,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    LowRankAdapterConfig,
    OFTConfig,
    ParallelAdapterConfig,
    VeraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    config_from_spec,
)
from .errors import (
    AssetError,
    CancelledError,
    ConfigError,
    DataError,
    DeltaTuneError,
    DeltaTuneFileNotFoundError,
    DeltaTuneIOError,
    FormatError,
    InternalError,
    InvalidArgumentError,
    NonFiniteError,
)
from .model import Model, PeftModel, get_peft_model, load

__version__ = _native.__version__

__all__ = [
    "load",
    "get_peft_model",
    "Model",
    "PeftModel",
    "PeftConfig",
    "LoraConfig",
    "IA3Config",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "LNTuningConfig",
    "AdaLoraConfig",
    "VeraConfig",
    "LoHaConfig",
    "LoKrConfig",
    "OFTConfig",
    "AdapterConfig",
    "ParallelAdapterConfig",
    "CompacterConfig",
    "LowRankAdapterConfig",
    "BitFitConfig",
    "FullFinetuneConfig",
    "config_from_spec",
    "methods",
    "search",
    "SearchResult",
    "generate",
    "DeltaTuneError",
    "InvalidArgumentError",
    "ConfigError",
    "DataError",
    "FormatError",
    "DeltaTuneFileNotFoundError",
    "DeltaTuneIOError",
    "AssetError",
    "NonFiniteError",
    "CancelledError",
    "InternalError",
]


def methods() -> List[Dict[str, Any]]:
    """Every delta method: ``name``, ``family``, ``aliases``, ``peft_type``."""
    return json.loads(_native.methods())


class SearchResult:
    """What :func:`search` found. ``get_peft_model(model, result)`` attaches the chosen
    structure (one adapter per chosen delta group); ``structure`` holds their flat configs."""

    def __init__(self, outcome: Dict[str, Any]) -> None:
        self.outcome = outcome
        self.structure: List[Dict[str, Any]] = outcome.get("structure", [])
        self.output_dir: str = outcome.get("out", "")

    def __getitem__(self, key: str) -> Any:
        return self.outcome[key]

    def __repr__(self) -> str:
        o = self.outcome
        return f"SearchResult(selected={o.get('selected')}, params={o.get('selected_params')}, budget={o.get('budget'):.0f}, dev={o.get('supernet_dev')})"


def search(
    model: Optional[Model],
    data: Any,
    *,
    budget: Union[str, float, int] = "0.1%",
    space: str = "M",
    output_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    overwrite: bool = False,
    max_length: int = 128,
    pooling: str = "mean",
    verbose: bool = True,
    callback: Optional[Callback] = None,
    labels: Optional[List[Any]] = None,
    data_dir: Optional[str] = None,
    dev_fraction: Optional[float] = None,
    max_train: Optional[int] = None,
    max_dev: Optional[int] = None,
    **options: Any,
) -> SearchResult:
    """S3Delta structure search: which delta to put where under a parameter ``budget`` (a
    share such as ``"0.1%"`` or a count), over the space ``"L"`` (LoRA), ``"M"`` (mixed) or a
    JSON file of specs. ``options`` are the search settings by field name (``epochs``,
    ``max_steps``, ``batch_size``, ``lr``, ``alpha_lr``, ``seed``, ...). Writes structure.json
    and tables to ``output_dir``; returns a :class:`SearchResult` that :func:`get_peft_model`
    accepts."""
    model_dir = model._native.model_dir() if model is not None else _native.load(None, None).model_dir()
    src = _data.source(data, labels=labels, data_dir=data_dir)
    opts = {k: v for k, v in {"dev_fraction": dev_fraction, "max_train": max_train, "max_dev": max_dev}.items() if v is not None}
    if output_dir is None:
        output_dir = os.path.join("runs", f"search-{_data.label_of(data)}-{space}")
    rep = Reporter(verbose=verbose, callback=callback, desc="search")
    out = _native.search(model_dir, json.dumps(src), json.dumps(opts), str(budget), space, json.dumps(options), max_length, pooling, os.fspath(output_dir), overwrite, rep)
    return SearchResult(json.loads(out))


def generate(
    prompt: str,
    *,
    model: Optional[Union[str, "os.PathLike[str]"]] = None,
    adapter: Optional[Union[str, "os.PathLike[str]"]] = None,
    stream: bool = False,
    chat: bool = False,
    system: Optional[str] = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 42,
    stop: Optional[List[str]] = None,
) -> Union[str, Iterator[str]]:
    """Continues ``prompt`` with a decoder (a GGUF file or HF directory; ``None``: the default
    decoder, fetched on first use), optionally with a trained ``adapter``. Returns the text, or
    with ``stream=True`` an iterator over text pieces as they are generated. ``chat=True``
    renders the prompt as a user turn in the model's chat format."""
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed, "stop": list(stop or [])}
    m = os.fspath(model) if model is not None else None
    a = os.fspath(adapter) if adapter is not None else None
    if stream:
        return iter(_native.generate_stream(m, a, prompt, chat, system, json.dumps(options)))
    out = _native.generate(m, a, prompt, chat, system, json.dumps(options), Reporter(verbose=False))
    return json.loads(out)["text"]
