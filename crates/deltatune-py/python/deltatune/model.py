"""Models: :class:`Model` (a frozen backbone) and :class:`PeftModel` (with named deltas, PEFT's
"adapters", and after training a task head), with PEFT's method names."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _data, _native
from ._progress import Callback, Reporter
from .config import AnyConfig, PeftConfig, config_from_spec
from .errors import InvalidArgumentError

__all__ = ["Model", "PeftModel", "load", "get_peft_model"]

PathLike = Union[str, "os.PathLike[str]"]


def _configs(config: AnyConfig) -> List[Tuple[Optional[str], PeftConfig]]:
    """(name or None, config) pairs from a config, a spec string, a dict, a list of them, or a
    search result."""
    structure = getattr(config, "structure", None)
    if structure is not None:  # a SearchResult
        return [(d.get("name"), config_from_spec(d)) for d in structure]
    if isinstance(config, (list, tuple)):
        out = []
        for c in config:
            name = c.get("name") if isinstance(c, dict) else None
            out.append((name, config_from_spec(c)))
        return out
    name = config.get("name") if isinstance(config, dict) else None
    return [(name, config_from_spec(config))]


class Model:
    """A frozen pre-trained encoder (BERT family). ``print(model)`` shows its module tree."""

    def __init__(self, native: Any) -> None:
        self._native = native

    # -- inspection ------------------------------------------------------------------------
    def _info(self) -> Dict[str, Any]:
        return json.loads(self._native.info())

    @property
    def config(self) -> Dict[str, Any]:
        """Model type, directory, hidden size and number of layers."""
        i = self._info()
        return {k: i[k] for k in ("model_type", "dir", "hidden_size", "num_layers")}

    def num_parameters(self, only_trainable: bool = False) -> int:
        """Parameters of the backbone plus attached deltas (``only_trainable``: the trainable
        ones, deltas and task head)."""
        i = self._info()
        if only_trainable:
            return i["trainable_params"] + i["head_params"]
        return i["all_params"] + i["head_params"]

    def __str__(self) -> str:
        return self._native.tree()

    def __repr__(self) -> str:
        i = self._info()
        names = [a["name"] for a in i["adapters"]]
        extra = f", adapters={names}" if names else ""
        return f"{type(self).__name__}({i['model_type']}, {i['num_layers']} layers, hidden {i['hidden_size']}{extra})"

    # -- work ------------------------------------------------------------------------------
    def embed(self, texts: Union[str, Sequence[str]], *, pooling: str = "mean", normalize: bool = True, max_length: int = 128, batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings as a float32 array of shape (n, hidden): mean (or ``cls``)
        pooling, L2-normalised unless ``normalize=False``; the same numbers as
        ``deltatune embed``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise InvalidArgumentError("invalid texts: expected strings")
        raw, n, h = self._native.embed(texts, pooling, normalize, max_length, batch_size)
        return np.frombuffer(raw, dtype="<f4").reshape(n, h).astype(np.float32, copy=True)


def load(path: Optional[PathLike] = None, *, verbose: bool = True) -> Model:
    """Loads a frozen backbone: the default model (all-MiniLM-L6-v2, fetched into the asset
    cache on first use) or a Hugging Face directory (config.json, model.safetensors,
    tokenizer.json)."""
    p = os.fspath(path) if path is not None else None
    return Model(_native.load(p, Reporter(verbose=verbose, desc="load")))


class PeftModel(Model):
    """A backbone with named deltas ("adapters") and, once trained, a task head.

    Created by :func:`get_peft_model` or :meth:`PeftModel.from_pretrained`; like PEFT, both
    attach to the given model in place and return a wrapper around it."""

    def __init__(self, native: Any, active: Optional[str] = None) -> None:
        super().__init__(native)
        self._active = active

    # -- adapters --------------------------------------------------------------------------
    @property
    def peft_config(self) -> Dict[str, PeftConfig]:
        """The config of every adapter, by name."""
        return {a["name"]: config_from_spec(a["config"]) for a in self._info()["adapters"]}

    @property
    def active_adapter(self) -> Optional[str]:
        """The adapter selected by :meth:`set_adapter` (or the first one added)."""
        return self._active

    @property
    def active_adapters(self) -> List[str]:
        """The names of the enabled adapters."""
        return [a["name"] for a in self._info()["adapters"] if a["enabled"]]

    def add_adapter(self, adapter_name: str, peft_config: AnyConfig, *, seed: int = 42) -> None:
        """Attaches a new adapter (initialised with ``seed``) next to the existing ones; all
        enabled adapters act together, as deltatune combines deltas."""
        pairs = _configs(peft_config)
        for i, (name, cfg) in enumerate(pairs):
            n = adapter_name if len(pairs) == 1 else (name or f"{adapter_name}_{i}")
            self._native.add_adapter(n, json.dumps(cfg.to_dict()), seed)
            if self._active is None:
                self._active = n

    def load_adapter(self, model_id: PathLike, adapter_name: Optional[str] = None) -> List[str]:
        """Attaches a saved adapter: deltatune's directory, a training run (its ``best/``) or a
        PEFT adapter folder. Returns the names attached."""
        names = self._native.load_adapter(os.fspath(model_id), adapter_name)
        if self._active is None and names:
            self._active = names[0]
        return names

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Enables only the named adapter(s); the others stay attached but off."""
        wanted = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        names = self._native.adapter_names()
        for w in wanted:
            if w not in names:
                raise InvalidArgumentError(f"invalid adapter_name: no adapter named `{w}` (attached: {', '.join(names)})")
        for n in names:
            self._native.set_enabled(n, n in wanted)
        self._active = wanted[0]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """A context manager in which the model runs without any adapter (the base model)."""
        on = self.active_adapters
        for n in on:
            self._native.set_enabled(n, False)
        try:
            yield
        finally:
            for n in on:
                self._native.set_enabled(n, True)

    def delete_adapter(self, adapter_name: str) -> None:
        """Detaches and forgets an adapter."""
        self._native.delete_adapter(adapter_name)
        if self._active == adapter_name:
            names = self._native.adapter_names()
            self._active = names[0] if names else None

    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        """(trainable parameters, all parameters), as PEFT counts them: the enabled deltas (and
        the task head, once there is one) against backbone + deltas + head."""
        i = self._info()
        return i["trainable_params"] + i["head_params"], i["all_params"] + i["head_params"]

    def print_trainable_parameters(self) -> None:
        """Prints ``trainable params: … || all params: … || trainable%: …`` (PEFT's line)."""
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")

    # -- files -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: PathLike, selected_adapters: Optional[Sequence[str]] = None, *, save_format: str = "deltatune") -> None:
        """Saves the adapters (and the task head). ``save_format="deltatune"`` writes
        delta_config.json + delta.safetensors; ``"peft"`` writes PEFT's adapter_config.json +
        adapter_model.safetensors (further adapters in subfolders, as PEFT does)."""
        self._native.save(os.fspath(save_directory), list(selected_adapters or []), save_format)

    @classmethod
    def from_pretrained(cls, model: Model, model_id: PathLike, adapter_name: Optional[str] = None, is_trainable: bool = False) -> "PeftModel":
        """Attaches a saved adapter to ``model`` (in place) and returns the PeftModel:
        deltatune's directory, a training run or a PEFT adapter folder. ``is_trainable`` is
        accepted for PEFT compatibility (deltatune's adapters are always trainable)."""
        del is_trainable
        pm = cls(model._native)
        pm.load_adapter(model_id, adapter_name)
        return pm

    def merge_and_unload(self) -> Model:
        """Folds the enabled adapters into the base weights (LoRA, (IA)³, LN tuning; an error
        names one that cannot be merged) and removes them; returns the merged base model."""
        self._native.merge_and_unload()
        self._active = None
        return Model(self._native)

    def save_merged(self, save_directory: PathLike) -> None:
        """Writes a plain Hugging Face model directory with the enabled adapters merged in (the
        model in memory is unchanged)."""
        self._native.save_merged(os.fspath(save_directory))

    # -- jobs ------------------------------------------------------------------------------
    def train(
        self,
        data: Any,
        *,
        labels: Optional[Sequence[Any]] = None,
        eval_data: Any = None,
        eval_labels: Optional[Sequence[Any]] = None,
        output_dir: Optional[PathLike] = None,
        resume: bool = False,
        overwrite: bool = False,
        verbose: bool = True,
        callback: Optional[Callback] = None,
        text_column: str = "text",
        text_pair_column: Optional[str] = None,
        label_column: str = "label",
        regression: bool = False,
        data_dir: Optional[PathLike] = None,
        dev_fraction: Optional[float] = None,
        max_train: Optional[int] = None,
        max_dev: Optional[int] = None,
        split_seed: Optional[int] = None,
        **options: Any,
    ) -> Dict[str, Any]:
        """Trains the enabled adapters with a new task head and loads the best checkpoint.

        ``data``: a task name (``"sst2"``, ``"bbc-news"``), a folder, a CSV/TSV/JSONL file, or
        in-memory examples (texts with ``labels=``, (text, label) pairs, dicts, a DataFrame).
        ``options`` are the training settings of ``deltatune train`` by their field names:
        ``lr``, ``epochs``, ``max_steps``, ``batch_size``, ``max_length``, ``seed``,
        ``eval_every``, ``patience``, ``warmup_ratio``, ``checkpoint_every``, ...

        The run is written to ``output_dir`` (default ``runs/<data>-<method>-s<seed>``):
        checkpoints, metrics, ``best/``. Ctrl-C stops at the next step with the checkpoint
        written and raises KeyboardInterrupt; ``resume=True`` continues the run. Returns the
        run summary (``score``, ``metric``, ``steps``, ``seconds``, ...).

        Adapters start from their initialisation (the seed), not from weights loaded into this
        model."""
        src = _data.source(
            data,
            labels=labels,
            eval_data=eval_data,
            eval_labels=eval_labels,
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
            regression=regression,
            data_dir=os.fspath(data_dir) if data_dir is not None else None,
        )
        opts = {k: v for k, v in {"dev_fraction": dev_fraction, "max_train": max_train, "max_dev": max_dev, "seed": split_seed}.items() if v is not None}
        if resume and overwrite:
            raise InvalidArgumentError("invalid resume: resume and overwrite exclude each other")
        if output_dir is None:
            methods = "+".join(a["method"] for a in self._info()["adapters"] if a["enabled"]) or "none"
            output_dir = os.path.join("runs", f"{_data.label_of(data)}-{methods}-s{options.get('seed', 42)}")
        mode = "resume" if resume else ("overwrite" if overwrite else "fresh")
        rep = Reporter(verbose=verbose, callback=callback)
        out = self._native.train(json.dumps(src), json.dumps(opts), json.dumps(options), os.fspath(output_dir), mode, rep)
        return json.loads(out)

    def evaluate(self, data: Any = None, *, split: str = "dev", batch_size: int = 64, labels: Optional[Sequence[Any]] = None, verbose: bool = False, **data_options: Any) -> Dict[str, Any]:
        """Scores the trained model (its saved ``best/``) on a split of its own data
        (``data=None``) or of other data with the same labels. Returns ``score``, ``metric``,
        ``scores``, ``loss``, ``examples``."""
        trained = self._native.trained_dir()
        if trained is None:
            raise InvalidArgumentError("invalid model: evaluate needs a trained model (train it, or load a trained directory with PeftModel.from_pretrained)")
        src = None
        if data is not None:
            src = json.dumps(_data.source(data, labels=labels, **{k: v for k, v in data_options.items() if k in ("text_column", "text_pair_column", "label_column", "regression", "data_dir")}))
        opts = {k: v for k, v in data_options.items() if k in ("dev_fraction", "max_train", "max_dev")}
        out = _native.evaluate(self._native.model_dir(), trained, src, json.dumps(opts), split, batch_size, Reporter(verbose=verbose, desc="eval"))
        return json.loads(out)

    def predict(self, texts: Union[str, Sequence[Union[str, Tuple[str, str]]]], *, batch_size: int = 32) -> List[Dict[str, Any]]:
        """Runs the task head: one dict per text with ``label``, ``label_id`` and
        ``probabilities`` (classification) or ``value`` (regression)."""
        return json.loads(self._native.predict(_data.texts_of(texts), batch_size))


def get_peft_model(model: Model, peft_config: AnyConfig, adapter_name: str = "default", *, seed: int = 42) -> PeftModel:
    """Attaches a new adapter to ``model`` (in place, as PEFT does) and returns the PeftModel.

    ``peft_config``: a config (``LoraConfig(...)``), a CLI spec string (``"lora:r=8"``), a flat
    dict, a list of them (one adapter each), or a :class:`SearchResult`."""
    pm = model if isinstance(model, PeftModel) else PeftModel(model._native)
    pm.add_adapter(adapter_name, peft_config, seed=seed)
    return pm
