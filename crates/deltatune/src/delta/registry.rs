//! The method registry: [`DeltaConfig`], one variant per method, generated from one list.
//!
//! # Adding a method
//!
//! 1. Write `delta/<method>.rs`: a config struct with PEFT's field names (`#[serde(default)]`,
//!    a `Default` impl with PEFT's defaults), an `impl Method` (family, aliases, site kinds,
//!    default targets per architecture, validation, `build` with the initialisation, and
//!    `from_peft`/`to_peft`/`peft_key` when PEFT has the method; `SWITCHES` where PEFT spells a
//!    method as an option of another, as LoRA's `use_dora` is DoRA), and the delta it builds
//!    (`impl Delta`: the forward hooks, `merged` where the maths allows). Copy `lora.rs`.
//! 2. Declare the file in `delta/mod.rs` and add one line to the `registry!` list below:
//!    `"config_name" => Variant(file::Config),`.
//! 3. Add a row to the method table of `tests/methods.rs`; the shared checks (zero-init is the
//!    identity, save → load is exact, merge equals unmerged, …) then run on it.
//!
//! Nothing else changes: spec parsing, aliases, PEFT import/export, the tree and the CLI all go
//! through this registry.

use super::method::{BuildCtx, Family, Method};
use super::peft_fields::{PeftIn, PeftOut};
use super::targets::Targets;
use super::{adalora, adapter, bitfit, compacter, dora, finetune, ia3, ln_tuning, loha, lokr, lora, low_rank_adapter, oft, parallel_adapter, prefix, prompt, vera};
use crate::core::{BackboneInfo, Delta, GroupTensors, GroupTrainer, Site, SiteKind};
use crate::error::{suggest, Error, Result};
use serde::{Deserialize, Serialize};
use candle_core::Tensor;
use serde_json::Value;

macro_rules! registry {
    ($($name:literal => $variant:ident($cfg:ty),)*) => {
        /// One delta method with its hyperparameters, tagged by its config name (`"method": "lora"`).
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "method")]
        pub enum DeltaConfig {
            $(#[serde(rename = $name)] $variant($cfg),)*
        }

        /// Every method: config name, family, other names, PEFT type.
        pub const METHODS: &[MethodInfo] = &[
            $(MethodInfo {
                name: $name,
                family: <$cfg as Method>::FAMILY,
                aliases: <$cfg as Method>::ALIASES,
                peft_type: <$cfg as Method>::PEFT_TYPE,
            },)*
        ];

        impl DeltaConfig {
            /// The config name of the method.
            pub fn method(&self) -> &'static str {
                match self { $(DeltaConfig::$variant(_) => $name,)* }
            }

            /// The default config of a method by name or alias (`full`, `houlsby`, …).
            pub fn default_for(method: &str) -> Result<Self> {
                $(if method == $name { return Ok(DeltaConfig::$variant(<$cfg>::default())); })*
                $(if <$cfg as Method>::ALIASES.contains(&method) {
                    return Ok(DeltaConfig::$variant(<$cfg as Method>::for_alias(method)));
                })*
                Err(unknown_method(method))
            }

            /// Short command-line forms of this method's keys.
            pub fn key_aliases(&self) -> &'static [(&'static str, &'static str)] {
                match self { $(DeltaConfig::$variant(_) => <$cfg as Method>::KEY_ALIASES,)* }
            }

            /// Boolean keys selecting another method when true (`use_dora` → `dora`).
            pub fn switches(&self) -> &'static [(&'static str, &'static str)] {
                match self { $(DeltaConfig::$variant(_) => <$cfg as Method>::SWITCHES,)* }
            }

            pub fn family(&self) -> Family {
                match self { $(DeltaConfig::$variant(_) => <$cfg as Method>::FAMILY,)* }
            }

            pub fn kinds(&self) -> &'static [SiteKind] {
                match self { $(DeltaConfig::$variant(m) => m.kinds(),)* }
            }

            pub fn expands(&self) -> bool {
                match self { $(DeltaConfig::$variant(m) => m.expands(),)* }
            }

            pub fn default_targets(&self, model_type: &str) -> Targets {
                match self { $(DeltaConfig::$variant(m) => m.default_targets(model_type),)* }
            }

            pub fn validate(&self, info: &BackboneInfo) -> Result<()> {
                match self { $(DeltaConfig::$variant(m) => m.validate(info),)* }
            }

            /// Trainable scalars at a site of sizes `inp` → `out`, when the method's sizes are free numbers.
            pub fn param_estimate(&self, inp: usize, out: usize, info: &BackboneInfo) -> Option<u128> {
                match self { $(DeltaConfig::$variant(m) => m.param_estimate(inp, out, info),)* }
            }

            pub fn gateable(&self) -> bool {
                match self { $(DeltaConfig::$variant(m) => m.gateable(),)* }
            }

            /// Builds the delta for `site`.
            pub fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
                match self { $(DeltaConfig::$variant(m) => m.build(site, ctx),)* }
            }

            /// Training-time behaviour of the whole group, if the method has any.
            pub fn group_trainer(&self, tensors: GroupTensors) -> Result<Option<Box<dyn GroupTrainer>>> {
                match self { $(DeltaConfig::$variant(m) => m.group_trainer(tensors),)* }
            }

            /// Fills in run-length settings ([`Method::set_run_length`]).
            pub fn set_run_length(&mut self, total_steps: usize) -> Result<()> {
                match self { $(DeltaConfig::$variant(m) => m.set_run_length(total_steps),)* }
            }

            /// PEFT's stored shape of a tensor ([`Method::peft_shape`]).
            pub fn peft_shape(&self, site: &str, param: &str, dims: &[usize]) -> Option<Vec<usize>> {
                match self { $(DeltaConfig::$variant(m) => m.peft_shape(site, param, dims),)* }
            }

            /// Our value of a PEFT-stored tensor ([`Method::from_peft_tensor`]).
            pub fn from_peft_tensor(&self, site: &str, param: &str, t: Tensor) -> Result<Tensor> {
                match self { $(DeltaConfig::$variant(m) => m.from_peft_tensor(site, param, t),)* }
            }

            /// A group's tensors and config as PEFT stores them ([`Method::to_peft_tensors`]).
            pub fn to_peft_tensors(&self, tensors: &mut Vec<(String, String, Tensor)>, config: &mut Value) -> Result<()> {
                match self { $(DeltaConfig::$variant(m) => m.to_peft_tensors(tensors, config),)* }
            }

            /// PEFT's `peft_type`, if PEFT has this method.
            pub fn peft_type(&self) -> Option<&'static str> {
                match self { $(DeltaConfig::$variant(_) => <$cfg as Method>::PEFT_TYPE,)* }
            }

            /// The config of a PEFT adapter_config.json, by its `peft_type`.
            pub fn from_peft(peft_type: &str, p: &PeftIn) -> Result<(Self, Targets)> {
                // The first method of that type reads it, unless one of its switches selects
                // another (a LORA config with `use_dora: true` is DoRA).
                $(if <$cfg as Method>::PEFT_TYPE == Some(peft_type) {
                    if let Some(other) = switched(<$cfg as Method>::SWITCHES, p)? {
                        return Self::from_peft_as(other, p);
                    }
                    let (c, t) = <$cfg as Method>::from_peft(p)?;
                    return Ok((DeltaConfig::$variant(c), t));
                })*
                let known: Vec<&str> = METHODS.iter().filter_map(|m| m.peft_type).collect();
                Err(p.bad(format!("peft_type `{peft_type}` is not supported ({})", known.join(", "))))
            }

            fn from_peft_as(method: &str, p: &PeftIn) -> Result<(Self, Targets)> {
                $(if method == $name {
                    let (c, t) = <$cfg as Method>::from_peft(p)?;
                    return Ok((DeltaConfig::$variant(c), t));
                })*
                Err(unknown_method(method))
            }

            /// PEFT's adapter_config.json fields for this config.
            pub fn to_peft(&self, targets: &Targets, p: &PeftOut) -> Result<Value> {
                match self { $(DeltaConfig::$variant(m) => m.to_peft(targets, p),)* }
            }

            /// PEFT's safetensors key (without `base_model.model.`) of tensor `param` at `site`.
            pub fn peft_key(&self, site: &str, param: &str) -> String {
                match self { $(DeltaConfig::$variant(m) => m.peft_key(site, param),)* }
            }
        }
    };
}

registry! {
    "lora" => Lora(lora::LoraConfig),
    "dora" => Dora(dora::DoraConfig),
    "vera" => Vera(vera::VeraConfig),
    "ia3" => Ia3(ia3::Ia3Config),
    "adapter" => Adapter(adapter::AdapterConfig),
    "parallel_adapter" => ParallelAdapter(parallel_adapter::ParallelAdapterConfig),
    "compacter" => Compacter(compacter::CompacterConfig),
    "low_rank_adapter" => LowRankAdapter(low_rank_adapter::LowRankAdapterConfig),
    "prefix" => Prefix(prefix::PrefixConfig),
    "prompt" => Prompt(prompt::PromptConfig),
    "bitfit" => BitFit(bitfit::BitFitConfig),
    "ln_tuning" => LnTuning(ln_tuning::LnTuningConfig),
    "finetune" => Finetune(finetune::FinetuneConfig),
    "loha" => Loha(loha::LohaConfig),
    "lokr" => Lokr(lokr::LokrConfig),
    "oft" => Oft(oft::OftConfig),
    "adalora" => AdaLora(adalora::AdaLoraConfig),
}

/// The method a PEFT config's switch selects (`use_dora: true`), if any; a switch that is not a
/// boolean is an error naming it.
fn switched(switches: &[(&str, &'static str)], p: &PeftIn) -> Result<Option<&'static str>> {
    for (key, other) in switches {
        match p.obj.get(*key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => return Ok(Some(other)),
            Some(v) => return Err(p.bad(format!("`{key}` must be true or false, got {v}"))),
        }
    }
    Ok(None)
}

/// A registered method, for listings and lookups.
#[derive(Clone, Copy, Debug)]
pub struct MethodInfo {
    pub name: &'static str,
    pub family: Family,
    pub aliases: &'static [&'static str],
    pub peft_type: Option<&'static str>,
}

fn unknown_method(method: &str) -> Error {
    let names: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
    Error::Delta(format!(
        "unknown delta method `{method}`{}; known methods: {}",
        suggest(method, names.iter().copied().chain(METHODS.iter().flat_map(|m| m.aliases.iter().copied()))),
        names.join(", ")
    ))
}

impl DeltaConfig {
    /// The canonical method name for an alias (`full` → `finetune`).
    pub fn canonical(method: &str) -> Result<&'static str> {
        Ok(Self::default_for(method)?.method())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_resolve_and_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for m in METHODS {
            assert!(seen.insert(m.name), "duplicate name {}", m.name);
            assert_eq!(DeltaConfig::default_for(m.name).unwrap().method(), m.name);
            for a in m.aliases {
                assert!(seen.insert(a), "alias {a} used twice");
                assert_eq!(DeltaConfig::canonical(a).unwrap(), m.name);
            }
        }
        let e = DeltaConfig::default_for("lorra").unwrap_err().to_string();
        assert!(e.contains("did you mean `lora`"), "{e}");
    }

    #[test]
    fn serde_tag_is_the_registered_name() {
        for m in METHODS {
            let v = serde_json::to_value(DeltaConfig::default_for(m.name).unwrap()).unwrap();
            assert_eq!(v["method"], m.name);
        }
    }
}
