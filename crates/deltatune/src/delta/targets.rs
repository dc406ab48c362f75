//! Where a delta group attaches: [`Targets`] with PEFT's field names and matching semantics, and
//! the helpers methods use to state their per-architecture defaults.

use serde::{Deserialize, Serialize};

/// Module names to attach to, with PEFT's semantics: a list entry matches a module whose full path
/// equals it or ends with `.` + entry (entries starting with `re:` are full-match regexes); a single
/// string is a full-match regex over the whole path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

/// Where a delta group attaches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    /// `None`: the method's default targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<TargetModules>,
    /// Only modules inside these transformer layers (PEFT's `layers_to_transform`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<Vec<usize>>,
    /// Modules to leave out (same matching rules as `target_modules`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_modules: Option<TargetModules>,
}

/// A target list of suffix names or `re:` patterns.
pub fn targets(list: &[&str]) -> Targets {
    Targets { target_modules: Some(TargetModules::List(list.iter().map(|s| s.to_string()).collect())), ..Default::default() }
}

/// Whether `model_type` names a decoder with HF's decoder module names
/// (`model.layers.N.self_attn.q_proj`, `mlp.down_proj`), as opposed to the BERT family's
/// (`encoder.layer.N.attention.self.query`). Methods pick their default targets by it.
pub fn is_decoder(model_type: &str) -> bool {
    ["llama", "mistral", "gemma3_text", "qwen2", "qwen3", "phi3"].contains(&model_type)
}

/// PEFT's default targets of the LoRA family (its `TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING`
/// for bert and llama): the query and value projections. Phi-3 fuses its projections, and PEFT's
/// default there is every fused matrix: `qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`.
pub fn query_value(model_type: &str) -> Targets {
    if model_type == "phi3" {
        targets(&["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    } else if is_decoder(model_type) {
        targets(&["q_proj", "v_proj"])
    } else {
        targets(&["query", "value"])
    }
}
