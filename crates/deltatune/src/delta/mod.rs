//! Delta modules: the small trainable pieces attached to a frozen backbone's sites.
//!
//! This file owns the [`Delta`] trait — the hooks a backbone calls at each site — the [`Attached`]
//! record a site keeps for each delta, and the [`DeltaConfig`] enum that is the method registry:
//! adding a method is a new file, a new variant and one arm in [`dispatch!`]. Methods know only
//! candle and their site; they never import training or search code.

mod adapter;
mod compacter;
mod finetune;
mod ia3;
pub mod init;
mod lora;
mod norm_bias;
mod prefix;
mod prompt;
pub mod spec;
pub mod store;

pub use adapter::{Activation, AdapterConfig, AdapterInit, LowRankAdapterConfig, ParallelAdapterConfig, Placement};
pub use compacter::CompacterConfig;
pub use finetune::FinetuneConfig;
pub use ia3::Ia3Config;
pub use lora::{LoraConfig, LoraInit};
pub use norm_bias::{BitFitConfig, LnTuningConfig};
pub use prefix::PrefixConfig;
pub use prompt::{PromptConfig, PromptInit};
pub use spec::{DeltaSpec, TargetModules, Targets};

use crate::backbone::{Site, SiteKind};
use crate::data::tokenize::TextEncoder;
use crate::error::{Error, Result};
use crate::ops::DropoutKey;
use candle_core::{Device, Tensor, Var};
use init::Stream;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a hook call knows about the forward pass it is part of.
#[derive(Clone, Debug)]
pub struct HookCtx {
    /// Training mode (dropout active).
    pub train: bool,
    /// Scalar gate multiplying this delta's contribution (structure search); `None` means 1.
    pub gate: Option<Tensor>,
    /// Dropout stream unique to this (step, site, delta).
    pub key: DropoutKey,
}

impl HookCtx {
    /// `contribution * gate` (or the contribution itself when ungated).
    pub fn gated(&self, contribution: Tensor) -> Result<Tensor> {
        match &self.gate {
            Some(g) => Ok(contribution.broadcast_mul(g)?),
            None => Ok(contribution),
        }
    }
}

/// A trainable modification of one site. Hooks default to "no change"; a method overrides the
/// ones its maths needs. Output hooks return `None` when they leave the value unchanged.
///
/// Hook semantics follow PEFT's wrapper contract: a linear site computes
/// `post(x', base(x'; resolve(weight), resolve(bias)))` with `x' = pre(x)`; block sites
/// (attention output, feed-forward output) call `post(sublayer_input, sublayer_output)` before the
/// residual connection and layer norm.
pub trait Delta: std::fmt::Debug + Send + Sync {
    /// The method's name as used in configs (`lora`, `ia3`, …).
    fn method(&self) -> &'static str;

    /// Trainable tensors owned by this site, named relative to it with PEFT's names
    /// (`lora_A.weight`, `ia3_l`).
    fn params(&self) -> Vec<(String, Var)>;

    /// Trainable tensors shared by all sites of the delta group (e.g. Compacter's PHM rules),
    /// named relative to the group. Counted and saved once per group.
    fn shared_params(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    /// Whether the trainable tensors replace the site's own (fine-tuning) rather than add to them;
    /// decides whether they count towards the model's total size.
    fn replaces_base(&self) -> bool {
        false
    }

    /// Transforms the site's input before the base computation (e.g. IA3 on a feed-forward input).
    fn pre(&self, _x: &Tensor, _h: &HookCtx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Transforms the site's output; `x` is the (pre-hooked) input (LoRA, adapters, IA3).
    fn post(&self, _x: &Tensor, _y: &Tensor, _h: &HookCtx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Replaces a base parameter of the site (`weight`, `bias`) for this forward: specification
    /// methods (BitFit, LayerNorm tuning, fine-tuning). `base` is the current value, if any.
    fn reparam(&self, _name: &str, _base: Option<&Tensor>, _h: &HookCtx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Soft tokens to prepend to the input embeddings, shape (b, n, h) (embeddings site).
    fn prompt(&self, _batch: usize, _h: &HookCtx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Keys and values to prepend in layer `layer`'s self-attention, each (b, n, w) with w the key
    /// width ([`BackboneInfo::kv_width`]) (layer-stack site).
    fn prefix(&self, _layer: usize, _batch: usize, _h: &HookCtx) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// Virtual tokens this delta adds: prompt tokens (embeddings site) or prefix length (encoder
    /// site). Real tokens' position ids start after a prefix, as in PEFT.
    fn num_virtual_tokens(&self) -> usize {
        0
    }

    /// New values for the site's base parameters with this delta folded in, if the maths allows
    /// (`base` holds the site's current parameters by name). `None` when not mergeable.
    fn merged(&self, _base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        Ok(None)
    }
}

/// One delta as attached to a site.
#[derive(Debug)]
pub struct Attached {
    /// The user-facing name of the delta group this belongs to (e.g. `lora`, `adapter_ffn`).
    pub name: String,
    /// Switched off deltas are skipped by every hook.
    pub enabled: bool,
    /// Index into the forward's gate vector (structure search), if gated.
    pub gate: Option<usize>,
    /// Folded into the site's base parameters (its hooks are then skipped).
    pub merged: bool,
    pub delta: Box<dyn Delta>,
}

impl Attached {
    pub fn new(name: impl Into<String>, delta: Box<dyn Delta>) -> Self {
        Attached { name: name.into(), enabled: true, gate: None, merged: false, delta }
    }

    /// Whether the hooks of this delta run.
    pub fn active(&self) -> bool {
        self.enabled && !self.merged
    }
}

/// Sizes of the backbone a delta is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackboneInfo {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// Width of one layer's keys (and values) where it differs from `hidden_size`: grouped-query
    /// attention (`num_key_value_heads × head_dim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_width: Option<usize>,
}

impl BackboneInfo {
    /// Width of one layer's attention keys (and values).
    pub fn kv_width(&self) -> usize {
        self.kv_width.unwrap_or(self.hidden_size)
    }
}

/// Whether `model_type` names a Llama-family decoder (HF names `model.layers.N.self_attn.q_proj`).
pub(crate) fn is_decoder(model_type: &str) -> bool {
    model_type == "llama"
}

/// A target list of suffix names or `re:` patterns.
pub(crate) fn targets(list: &[&str]) -> Targets {
    Targets { target_modules: Some(TargetModules::List(list.iter().map(|s| s.to_string()).collect())), ..Default::default() }
}

/// Everything a method needs to build its delta for one site.
pub struct BuildCtx<'a> {
    pub seed: u64,
    /// The backbone's `model_type` (`bert`, `llama`, …).
    pub model_type: String,
    /// The delta group's name (part of every random stream).
    pub name: String,
    pub device: Device,
    pub info: BackboneInfo,
    /// The word embedding table (for prompt initialisation from the vocabulary).
    pub word_embeddings: Option<Tensor>,
    /// The tokenizer (for prompt initialisation from text).
    pub tokenizer: Option<&'a TextEncoder>,
    /// Tensors shared across the sites of the group, by name.
    pub shared: BTreeMap<String, Var>,
}

impl BuildCtx<'_> {
    /// The random stream of tensor `tensor` at `site`.
    pub fn stream(&self, site: &str, tensor: &str) -> Stream {
        Stream::new(self.seed, &[&self.name, site, tensor])
    }

    /// The shared variable `name`, created by `init` on first use.
    pub fn shared_var(&mut self, name: &str, init: impl FnOnce(&Self) -> Result<Tensor>) -> Result<Var> {
        if let Some(v) = self.shared.get(name) {
            return Ok(v.clone());
        }
        let v = Var::from_tensor(&init(self)?)?;
        self.shared.insert(name.to_string(), v.clone());
        Ok(v)
    }
}

/// Input and output sizes of a site, as a method sees them.
pub(crate) fn site_dims(site: &Site, info: &BackboneInfo) -> Result<(usize, usize)> {
    match site.kind() {
        SiteKind::Linear | SiteKind::Embedding => {
            match site.param_dims("weight").as_deref() {
                Some(&[out, inp]) => Ok((inp, out)),
                _ => Err(Error::Delta(format!("{} has no two-dimensional weight", site.path()))),
            }
        }
        SiteKind::Intermediate => Ok((info.hidden_size, info.intermediate_size)),
        _ => Ok((info.hidden_size, info.hidden_size)),
    }
}

/// What every method config provides; implemented once per method file.
pub(crate) trait Method {
    /// Site kinds the method attaches to.
    fn kinds(&self) -> &'static [SiteKind];
    /// Whether a matched block expands into its descendants of the allowed kinds (specification
    /// methods) instead of being an error.
    fn expands(&self) -> bool {
        false
    }
    /// Where it attaches when the user names no targets, per backbone `model_type` (PEFT's
    /// per-architecture defaults: BERT family, or `llama` for decoders).
    fn default_targets(&self, model_type: &str) -> Targets;
    /// Checks hyperparameters.
    fn validate(&self, _info: &BackboneInfo) -> Result<()> {
        Ok(())
    }
    /// Builds the delta for one site.
    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>>;
    /// Whether a structure-search gate can scale this method's contribution.
    fn gateable(&self) -> bool {
        true
    }
}

/// The method registry: one variant per method, tagged by its config name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum DeltaConfig {
    Lora(LoraConfig),
    Ia3(Ia3Config),
    Adapter(AdapterConfig),
    ParallelAdapter(ParallelAdapterConfig),
    Compacter(CompacterConfig),
    LowRankAdapter(LowRankAdapterConfig),
    Prefix(PrefixConfig),
    Prompt(PromptConfig),
    #[serde(rename = "bitfit")]
    BitFit(BitFitConfig),
    LnTuning(LnTuningConfig),
    Finetune(FinetuneConfig),
}

/// Calls `$body` with `$m` bound to the method config of any variant.
macro_rules! dispatch {
    ($self:expr, $m:ident => $body:expr) => {
        match $self {
            DeltaConfig::Lora($m) => $body,
            DeltaConfig::Ia3($m) => $body,
            DeltaConfig::Adapter($m) => $body,
            DeltaConfig::ParallelAdapter($m) => $body,
            DeltaConfig::Compacter($m) => $body,
            DeltaConfig::LowRankAdapter($m) => $body,
            DeltaConfig::Prefix($m) => $body,
            DeltaConfig::Prompt($m) => $body,
            DeltaConfig::BitFit($m) => $body,
            DeltaConfig::LnTuning($m) => $body,
            DeltaConfig::Finetune($m) => $body,
        }
    };
}

/// Every method name accepted in configs, with its family (Delta Tuning taxonomy).
pub const METHODS: &[(&str, &str)] = &[
    ("lora", "reparameterization"),
    ("ia3", "addition"),
    ("adapter", "addition"),
    ("parallel_adapter", "addition"),
    ("compacter", "addition"),
    ("low_rank_adapter", "addition"),
    ("prefix", "addition"),
    ("prompt", "addition"),
    ("bitfit", "specification"),
    ("ln_tuning", "specification"),
    ("finetune", "specification"),
];

impl DeltaConfig {
    /// The config name of the method.
    pub fn method(&self) -> &'static str {
        match self {
            DeltaConfig::Lora(_) => "lora",
            DeltaConfig::Ia3(_) => "ia3",
            DeltaConfig::Adapter(_) => "adapter",
            DeltaConfig::ParallelAdapter(_) => "parallel_adapter",
            DeltaConfig::Compacter(_) => "compacter",
            DeltaConfig::LowRankAdapter(_) => "low_rank_adapter",
            DeltaConfig::Prefix(_) => "prefix",
            DeltaConfig::Prompt(_) => "prompt",
            DeltaConfig::BitFit(_) => "bitfit",
            DeltaConfig::LnTuning(_) => "ln_tuning",
            DeltaConfig::Finetune(_) => "finetune",
        }
    }

    /// The default config of a method by name (aliases accepted: `full`, `houlsby`, …).
    pub fn default_for(method: &str) -> Result<Self> {
        Ok(match method {
            "lora" => DeltaConfig::Lora(LoraConfig::default()),
            "ia3" => DeltaConfig::Ia3(Ia3Config::default()),
            "adapter" | "pfeiffer" | "seq_bn" => DeltaConfig::Adapter(AdapterConfig::default()),
            "houlsby" | "double_seq_bn" => DeltaConfig::Adapter(AdapterConfig::houlsby()),
            "parallel_adapter" | "parallel" | "par_bn" => DeltaConfig::ParallelAdapter(ParallelAdapterConfig::default()),
            "compacter" => DeltaConfig::Compacter(CompacterConfig::default()),
            "low_rank_adapter" | "lowrank_adapter" | "lra" => DeltaConfig::LowRankAdapter(LowRankAdapterConfig::default()),
            "prefix" | "prefix_tuning" => DeltaConfig::Prefix(PrefixConfig::default()),
            "prompt" | "prompt_tuning" | "soft_prompt" => DeltaConfig::Prompt(PromptConfig::default()),
            "bitfit" => DeltaConfig::BitFit(BitFitConfig::default()),
            "ln_tuning" | "lnfit" | "layernorm" => DeltaConfig::LnTuning(LnTuningConfig::default()),
            "finetune" | "full" | "full_finetune" => DeltaConfig::Finetune(FinetuneConfig::default()),
            other => {
                let names: Vec<&str> = METHODS.iter().map(|(n, _)| *n).collect();
                return Err(Error::Delta(format!(
                    "unknown delta method `{other}`{}; known methods: {}",
                    spec::suggest(other, names.iter().copied()),
                    names.join(", ")
                )));
            }
        })
    }

    /// The canonical method name for an alias (`full` → `finetune`).
    pub fn canonical(method: &str) -> Result<&'static str> {
        Ok(Self::default_for(method)?.method())
    }

    fn as_method(&self) -> &dyn Method {
        dispatch!(self, m => m)
    }

    pub fn kinds(&self) -> &'static [SiteKind] {
        self.as_method().kinds()
    }

    pub fn expands(&self) -> bool {
        self.as_method().expands()
    }

    pub fn default_targets(&self, model_type: &str) -> Targets {
        self.as_method().default_targets(model_type)
    }

    pub fn validate(&self, info: &BackboneInfo) -> Result<()> {
        self.as_method().validate(info)
    }

    pub fn gateable(&self) -> bool {
        self.as_method().gateable()
    }

    /// Builds the delta for `site`.
    pub fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        dispatch!(self, m => m.build(site, ctx))
    }

    /// The family of the method in the Delta Tuning taxonomy.
    pub fn family(&self) -> &'static str {
        METHODS.iter().find(|(n, _)| *n == self.method()).map(|(_, f)| *f).unwrap_or("addition")
    }
}
