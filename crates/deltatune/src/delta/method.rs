//! What every delta method provides ([`Method`]), what it is given to build its delta at one
//! site ([`BuildCtx`]), and the Delta Tuning taxonomy ([`Family`]).
//!
//! A method is one file in this folder holding its config struct (PEFT's field names, serde
//! defaults), the [`Method`] impl (defaults, validation, initialisation, PEFT mapping), and the
//! [`crate::core::Delta`] it builds (forward hooks, merge). It is made known by one line in
//! [`super::registry`]. See that file's header for the steps.

use super::peft_fields::{PeftIn, PeftOut};
use super::targets::Targets;
use crate::core::init::Stream;
use crate::core::{BackboneInfo, Delta, GroupTensors, GroupTrainer, Site, SiteKind};
use crate::data::tokenize::TextEncoder;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor, Var};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// The three families of the Delta Tuning study (Ding et al., 2023).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// New modules or tokens added to the model (adapters, prefix, prompt, (IA)³).
    Addition,
    /// A chosen part of the model itself trained (BitFit, LN tuning, chosen modules).
    Specification,
    /// A weight update in a cheaper parametrisation (LoRA and its variants).
    Reparameterization,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Addition => "addition",
            Family::Specification => "specification",
            Family::Reparameterization => "reparameterization",
        }
    }
}

/// What every method config provides; implemented once, in the method's own file.
pub trait Method: Clone + std::fmt::Debug + Default + PartialEq + Serialize + DeserializeOwned {
    /// The family in the Delta Tuning taxonomy.
    const FAMILY: Family;
    /// Other names selecting this method, each with its own defaults ([`Method::for_alias`]):
    /// `houlsby` for a two-position adapter, `full` for fine-tuning everything.
    const ALIASES: &'static [&'static str] = &[];
    /// Short forms of config keys accepted on the command line: (`alpha`, `lora_alpha`).
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[];
    /// PEFT's `peft_type` for this method, if PEFT has it.
    const PEFT_TYPE: Option<&'static str> = None;
    /// Boolean keys that, set to true, select another method (by config name) instead of this
    /// one, in specs and in PEFT configs alike: LoRA's `use_dora` selects `dora`, as PEFT spells
    /// DoRA. Set to false they are accepted and dropped.
    const SWITCHES: &'static [(&'static str, &'static str)] = &[];

    /// The defaults selected by `alias` (one of [`Method::ALIASES`]).
    fn for_alias(_alias: &str) -> Self {
        Self::default()
    }
    /// Site kinds the method attaches to.
    fn kinds(&self) -> &'static [SiteKind];
    /// Whether a matched block expands into its descendants of the allowed kinds (specification
    /// methods) instead of being an error.
    fn expands(&self) -> bool {
        false
    }
    /// Where it attaches when the user names no targets, per backbone `model_type` (PEFT's
    /// per-architecture defaults).
    fn default_targets(&self, model_type: &str) -> Targets;
    /// Checks hyperparameters against the backbone before anything is allocated.
    fn validate(&self, _info: &BackboneInfo) -> Result<()> {
        Ok(())
    }
    /// Trainable scalars the delta would allocate at a site with input and output sizes `inp` and
    /// `out` (an upper bound is fine), for methods whose size settings are free numbers; `None` when
    /// the delta is bounded by the site's own size. [`crate::core`] callers check the sum against the
    /// machine's memory before anything is allocated.
    fn param_estimate(&self, _inp: usize, _out: usize, _info: &BackboneInfo) -> Option<u128> {
        None
    }
    /// Builds the delta for one site.
    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>>;
    /// Whether a structure-search gate can scale this method's contribution.
    fn gateable(&self) -> bool {
        true
    }
    /// Training-time behaviour of the whole group (AdaLoRA's rank allocation), built from the
    /// group's tensors once they are attached.
    fn group_trainer(&self, _tensors: GroupTensors) -> Result<Option<Box<dyn GroupTrainer>>> {
        Ok(None)
    }
    /// Fills in settings that depend on the run's length (AdaLoRA's `total_step`) before training
    /// `total_steps` optimizer steps, and checks them.
    fn set_run_length(&mut self, _total_steps: usize) -> Result<()> {
        Ok(())
    }
    /// The shape PEFT stores tensor `param` at `site` with, given ours (`dims`); `None` for our
    /// tensors PEFT does not store (they keep their built value on import). AdaLoRA's saved
    /// tensors are trimmed to the kept ranks.
    fn peft_shape(&self, _site: &str, _param: &str, dims: &[usize]) -> Option<Vec<usize>> {
        Some(dims.to_vec())
    }
    /// Our value of tensor `param` at `site` from PEFT's stored one (of [`Method::peft_shape`]).
    fn from_peft_tensor(&self, _site: &str, _param: &str, t: Tensor) -> Result<Tensor> {
        Ok(t)
    }
    /// Adjusts a group's tensors (site, param, value) and the adapter_config.json fields for PEFT's
    /// files (AdaLoRA: trims to the kept ranks, writes `rank_pattern`, drops its mask buffers).
    fn to_peft_tensors(&self, _tensors: &mut Vec<(String, String, Tensor)>, _config: &mut Value) -> Result<()> {
        Ok(())
    }
    /// Reads PEFT's adapter_config.json (for methods with a [`Method::PEFT_TYPE`]).
    fn from_peft(p: &PeftIn) -> Result<(Self, Targets)> {
        Err(p.bad("this adapter type cannot be read"))
    }
    /// Writes PEFT's adapter_config.json fields (for methods PEFT can load).
    fn to_peft(&self, _targets: &Targets, _p: &PeftOut) -> Result<Value> {
        Err(Error::Delta("PEFT has no format for this method".into()))
    }
    /// PEFT's safetensors key (after `base_model.model.`) of trainable tensor `param` at `site`;
    /// `site` is empty for tensors shared by the whole group.
    fn peft_key(&self, site: &str, param: &str) -> String {
        if site.is_empty() {
            param.to_string()
        } else {
            format!("{site}.{param}")
        }
    }
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
    /// Input and output sizes ([`site_dims`]) of every site the group attaches to, in plan order
    /// (VeRA sizes its shared projections by the largest).
    pub group_dims: Vec<(usize, usize)>,
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
pub fn site_dims(site: &Site, info: &BackboneInfo) -> Result<(usize, usize)> {
    match site.kind() {
        SiteKind::Linear | SiteKind::Embedding => match site.param_dims("weight").as_deref() {
            Some(&[out, inp]) => Ok((inp, out)),
            _ => Err(Error::Delta(format!("{} has no two-dimensional weight", site.path()))),
        },
        SiteKind::Intermediate => Ok((info.hidden_size, info.intermediate_size)),
        _ => Ok((info.hidden_size, info.hidden_size)),
    }
}
