"""Delta configurations with PEFT's class and field names (``LoraConfig(r=8, lora_alpha=16,
target_modules=["query", "value"])``), plus deltatune's own methods (adapters, Compacter, BitFit,
...). Every field a method's Rust config has is accepted by name; the defaults are the library's,
which follow PEFT's.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Dict, List, Optional, Union

from . import _native
from .errors import InvalidArgumentError

__all__ = [
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
]

# PEFT fields that describe the surrounding model rather than the delta; accepted and ignored.
_PEFT_CONTEXT = ("task_type", "inference_mode", "base_model_name_or_path", "revision", "peft_type")
_TARGET_KEYS = ("target_modules", "layers_to_transform", "exclude_modules")


class PeftConfig:
    """Base class of the delta configurations. ``to_dict()`` gives the flat JSON object that
    deltatune's files and ``--delta-config`` use."""

    method: str = ""

    def __init__(self, **fields: Any) -> None:
        if self.method == "lora" and "use_dora" in fields:
            # PEFT's switch: LoraConfig(use_dora=True) is DoRA.
            use = fields.pop("use_dora")
            if not isinstance(use, bool):
                raise InvalidArgumentError(f"invalid use_dora: {use!r} (must be True or False)")
            if use:
                object.__setattr__(self, "method", "dora")
        defaults = json.loads(_native.method_defaults(self.method))
        defaults.pop("method", None)
        object.__setattr__(self, "_fields", dict(defaults))
        object.__setattr__(self, "_targets", {k: None for k in _TARGET_KEYS})
        object.__setattr__(self, "_context", {})
        for key, value in fields.items():
            self._set(key, value)

    def _set(self, key: str, value: Any) -> None:
        if key == "init_lora_weights" and isinstance(value, bool):
            # PEFT's True (Kaiming A, zero B) and False (both random: not a no-op at start).
            value = "kaiming" if value else "random"
        if key in self._fields:
            self._fields[key] = value
        elif key in _TARGET_KEYS:
            if key == "target_modules" and isinstance(value, (list, tuple, set)):
                value = list(value)
            self._targets[key] = value
        elif key in _PEFT_CONTEXT:
            self._context[key] = value
        elif key == "bias":
            if value not in (None, "none"):
                raise InvalidArgumentError(
                    f"invalid bias: {value!r}: deltatune trains biases with its own delta; "
                    "add a BitFitConfig adapter next to this one"
                )
        elif key == "modules_to_save":
            if value not in (None, [], ["classifier"], ["score"]):
                raise InvalidArgumentError(
                    f"invalid modules_to_save: {value!r}: only the task head (classifier) is trained "
                    "besides the deltas; use FullFinetuneConfig(target_modules=[...]) for other modules"
                )
        else:
            known = sorted(list(self._fields) + list(_TARGET_KEYS))
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean `{near[0]}`?)" if near else ""
            raise TypeError(
                f"{type(self).__name__} got an unexpected field `{key}`{hint}; fields: {', '.join(known)}"
            )

    def __getattr__(self, key: str) -> Any:
        for part in ("_fields", "_targets", "_context"):
            d = self.__dict__.get(part, {})
            if key in d:
                return d[key]
        if key == "peft_type":
            return type(self).__name__.replace("Config", "").upper()
        raise AttributeError(f"{type(self).__name__} has no field `{key}`")

    def __setattr__(self, key: str, value: Any) -> None:
        self._set(key, value)

    def to_dict(self) -> Dict[str, Any]:
        """The flat configuration (``{"method": "lora", "r": 8, ...}``) with the targets."""
        d: Dict[str, Any] = {"method": self.method}
        d.update(self._fields)
        d.update({k: v for k, v in self._targets.items() if v is not None})
        return d

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeftConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "method")
        return f"{type(self).__name__}({args})"


class _SpecConfig(PeftConfig):
    """A configuration given as a CLI spec string or a flat dict (any method)."""

    def __init__(self, flat: Dict[str, Any]) -> None:
        object.__setattr__(self, "method", flat["method"])
        rest = {k: v for k, v in flat.items() if k not in ("method", "name")}
        super().__init__(**rest)


def config_from_spec(spec: Union[str, Dict[str, Any], PeftConfig]) -> PeftConfig:
    """A config from a CLI spec string (``"lora:r=8,target=query+value"``), a flat dict with a
    ``"method"`` key (as in deltatune's files), or a config (returned as is)."""
    if isinstance(spec, PeftConfig):
        return spec
    if isinstance(spec, str):
        return _SpecConfig(json.loads(_native.parse_spec(spec)))
    if isinstance(spec, dict):
        if "method" not in spec:
            raise InvalidArgumentError("invalid config: a dict config needs a `method` key (e.g. \"lora\")")
        return _SpecConfig(json.loads(_native.spec_from_json(json.dumps(spec))))
    raise TypeError(f"expected a config, a spec string or a dict, got {type(spec).__name__}")


def _config_class(name: str, method: str, doc: str) -> type:
    return type(name, (PeftConfig,), {"method": method, "__doc__": doc, "__module__": __name__})


LoraConfig = _config_class(
    "LoraConfig",
    "lora",
    """LoRA (PEFT's ``LoraConfig``): ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``,
    ``init_lora_weights``, ``fan_in_fan_out``, ``target_modules``, ``layers_to_transform``,
    ``exclude_modules``. ``task_type`` and ``inference_mode`` are accepted and ignored.""",
)
IA3Config = _config_class(
    "IA3Config",
    "ia3",
    """(IA)³ (PEFT's ``IA3Config``): ``target_modules``, ``feedforward_modules``,
    ``layers_to_transform``, ``exclude_modules``.""",
)
PrefixTuningConfig = _config_class(
    "PrefixTuningConfig",
    "prefix",
    """Prefix tuning (PEFT's ``PrefixTuningConfig``): ``num_virtual_tokens``,
    ``prefix_projection``, ``encoder_hidden_size``.""",
)
PromptTuningConfig = _config_class(
    "PromptTuningConfig",
    "prompt",
    """Prompt tuning (PEFT's ``PromptTuningConfig``): ``num_virtual_tokens``,
    ``prompt_tuning_init``, ``prompt_tuning_init_text``, ``init_range``.""",
)
LNTuningConfig = _config_class(
    "LNTuningConfig",
    "ln_tuning",
    """LayerNorm tuning (PEFT's ``LNTuningConfig``).""",
)
AdaLoraConfig = _config_class(
    "AdaLoraConfig",
    "adalora",
    """AdaLoRA (PEFT's ``AdaLoraConfig``): SVD-form LoRA with importance-based rank allocation to a
    total-rank budget: ``init_r``, ``target_r``, ``lora_alpha``, ``tinit``, ``tfinal``, ``deltaT``,
    ``beta1``, ``beta2``, ``orth_reg_weight``, ``total_step`` (filled in from the run when not given).""",
)
VeraConfig = _config_class(
    "VeraConfig",
    "vera",
    """VeRA (PEFT's ``VeraConfig``): shared frozen random projections, trainable scaling vectors:
    ``r``, ``projection_prng_key``, ``d_initial``, ``save_projection``.""",
)
LoHaConfig = _config_class(
    "LoHaConfig", "loha", """LoHa (PEFT's ``LoHaConfig``): Hadamard product of two low-rank products: ``r``, ``alpha``."""
)
LoKrConfig = _config_class(
    "LoKrConfig", "lokr", """LoKr (PEFT's ``LoKrConfig``): Kronecker product: ``r``, ``alpha``, ``decompose_both``, ``decompose_factor``."""
)
OFTConfig = _config_class(
    "OFTConfig",
    "oft",
    """OFT (PEFT's ``OFTConfig``): block-diagonal orthogonal rotation of the input: ``oft_block_size``
    (or ``r``), ``use_cayley_neumann``, ``block_share``.""",
)
AdapterConfig = _config_class(
    "AdapterConfig",
    "adapter",
    """Sequential bottleneck adapters (Houlsby/Pfeiffer; deltatune's own, PEFT has none).""",
)
ParallelAdapterConfig = _config_class(
    "ParallelAdapterConfig", "parallel_adapter", """Parallel adapters (He et al.; deltatune's own)."""
)
CompacterConfig = _config_class(
    "CompacterConfig", "compacter", """Compacter: PHM adapters with shared rules (deltatune's own)."""
)
LowRankAdapterConfig = _config_class(
    "LowRankAdapterConfig", "low_rank_adapter", """Low-rank adapters (deltatune's own)."""
)
BitFitConfig = _config_class("BitFitConfig", "bitfit", """BitFit: train the biases (deltatune's own).""")
FullFinetuneConfig = _config_class(
    "FullFinetuneConfig",
    "finetune",
    """Fine-tune chosen modules (``target_modules``) or the whole model (deltatune's own).""",
)

AnyConfig = Union[PeftConfig, str, Dict[str, Any], List[Any]]
_ = Optional  # re-exported for the stubs' aliases
