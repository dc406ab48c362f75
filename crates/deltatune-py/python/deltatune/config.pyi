"""Type stubs of deltatune.config: the fields editors complete (all keyword-only)."""

from typing import Any, Dict, List, Literal, Optional, Sequence, Union

Targets = Optional[Union[str, Sequence[str]]]
Layers = Optional[Union[int, Sequence[int]]]

class PeftConfig:
    method: str
    peft_type: str
    def __init__(self, **fields: Any) -> None: ...
    def to_dict(self) -> Dict[str, Any]: ...
    def __getattr__(self, key: str) -> Any: ...

class LoraConfig(PeftConfig):
    def __init__(
        self,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, Literal["kaiming", "gaussian", "random"]] = True,
        fan_in_fan_out: bool = False,
        target_modules: Targets = None,
        layers_to_transform: Layers = None,
        exclude_modules: Targets = None,
        task_type: Optional[str] = None,
        inference_mode: bool = False,
        bias: Literal["none"] = "none",
        modules_to_save: Optional[List[str]] = None,
    ) -> None: ...

class IA3Config(PeftConfig):
    def __init__(
        self,
        *,
        target_modules: Targets = None,
        feedforward_modules: Targets = None,
        layers_to_transform: Layers = None,
        exclude_modules: Targets = None,
        task_type: Optional[str] = None,
        inference_mode: bool = False,
        modules_to_save: Optional[List[str]] = None,
    ) -> None: ...

class PrefixTuningConfig(PeftConfig):
    def __init__(
        self,
        *,
        num_virtual_tokens: int = 20,
        prefix_projection: bool = False,
        encoder_hidden_size: Optional[int] = None,
        task_type: Optional[str] = None,
        inference_mode: bool = False,
    ) -> None: ...

class PromptTuningConfig(PeftConfig):
    def __init__(
        self,
        *,
        num_virtual_tokens: int = 20,
        prompt_tuning_init: str = "random",
        prompt_tuning_init_text: Optional[str] = None,
        init_range: float = 0.5,
        task_type: Optional[str] = None,
        inference_mode: bool = False,
    ) -> None: ...

class LNTuningConfig(PeftConfig):
    def __init__(self, *, weight: bool = True, bias: bool = True, target_modules: Targets = None, layers_to_transform: Layers = None, exclude_modules: Targets = None, task_type: Optional[str] = None) -> None: ...

class AdaLoraConfig(PeftConfig):
    def __init__(self, **fields: Any) -> None: ...

class VeraConfig(PeftConfig):
    def __init__(self, **fields: Any) -> None: ...

class LoHaConfig(PeftConfig):
    def __init__(self, **fields: Any) -> None: ...

class LoKrConfig(PeftConfig):
    def __init__(self, **fields: Any) -> None: ...

class OFTConfig(PeftConfig):
    def __init__(self, **fields: Any) -> None: ...

class AdapterConfig(PeftConfig):
    def __init__(
        self,
        *,
        placement: str = ...,
        bottleneck_size: Optional[int] = None,
        reduction_factor: float = ...,
        non_linearity: str = ...,
        init_weights: str = ...,
        scaling: float = 1.0,
        target_modules: Targets = None,
        layers_to_transform: Layers = None,
        exclude_modules: Targets = None,
    ) -> None: ...

class ParallelAdapterConfig(PeftConfig):
    def __init__(
        self,
        *,
        bottleneck_size: Optional[int] = None,
        reduction_factor: float = ...,
        non_linearity: str = ...,
        init_weights: str = ...,
        scaling: float = ...,
        target_modules: Targets = None,
        layers_to_transform: Layers = None,
        exclude_modules: Targets = None,
    ) -> None: ...

class CompacterConfig(PeftConfig):
    def __init__(
        self,
        *,
        bottleneck_size: Optional[int] = None,
        reduction_factor: float = ...,
        phm_dim: int = ...,
        shared_phm_rule: bool = ...,
        phm_rank: int = ...,
        phm_init_range: float = ...,
        non_linearity: str = ...,
        target_modules: Targets = None,
        layers_to_transform: Layers = None,
        exclude_modules: Targets = None,
    ) -> None: ...

class LowRankAdapterConfig(PeftConfig):
    def __init__(
        self,
        *,
        bottleneck_size: Optional[int] = None,
        reduction_factor: float = ...,
        rank: int = ...,
        non_linearity: str = ...,
        target_modules: Targets = None,
        layers_to_transform: Layers = None,
        exclude_modules: Targets = None,
    ) -> None: ...

class BitFitConfig(PeftConfig):
    def __init__(self, *, target_modules: Targets = None, layers_to_transform: Layers = None, exclude_modules: Targets = None) -> None: ...

class FullFinetuneConfig(PeftConfig):
    def __init__(self, *, target_modules: Targets = None, layers_to_transform: Layers = None, exclude_modules: Targets = None) -> None: ...

AnyConfig = Union[PeftConfig, str, Dict[str, Any], List[Any]]

def config_from_spec(spec: Union[str, Dict[str, Any], PeftConfig]) -> PeftConfig: ...
