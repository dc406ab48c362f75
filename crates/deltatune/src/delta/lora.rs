//! LoRA (Hu et al., 2021), reparameterization family: `y = x W^T + b + s · B(A(dropout(x)))` with
//! `s = lora_alpha / r` (or `lora_alpha / sqrt(r)` with rsLoRA). Defaults and initialisation follow
//! PEFT (`tuners/lora/layer.py`, `LoraLayer.reset_lora_parameters`): A ~ kaiming_uniform(a=√5) =
//! U(±1/√in), B = 0, so a fresh LoRA leaves the model unchanged. Mergeable: `W' = W + s · B A`.

use super::method::{site_dims, BuildCtx, Family, Method};
use super::peft_fields::{PeftIn, PeftOut, PEFT_VERSION};
use super::targets::{query_value, Targets};
use crate::core::init;
use crate::core::{BackboneInfo, Delta, EngineHook, HookCtx, Site, SiteKind};
use crate::error::{Error, Result};
use crate::ops;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// How A and B start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// A ~ U(±1/√in) (torch's kaiming_uniform with a=√5), B = 0 (PEFT's default).
    Kaiming,
    /// A ~ N(0, 1/r), B = 0 (PEFT's "gaussian").
    Gaussian,
    /// Both A and B random (not a no-op at init; for tests and experiments).
    Random,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scale numerator (PEFT default 8).
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch input.
    pub lora_dropout: f32,
    /// rsLoRA: scale by alpha/√r instead of alpha/r.
    pub use_rslora: bool,
    pub init_lora_weights: LoraInit,
    /// Kept for PEFT config compatibility; only meaningful for GPT-2 Conv1D layers, so (as PEFT
    /// does for nn.Linear) it must be false here.
    pub fan_in_fan_out: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { r: 8, lora_alpha: 8.0, lora_dropout: 0.0, use_rslora: false, init_lora_weights: LoraInit::Kaiming, fan_in_fan_out: false }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

impl Method for LoraConfig {
    const FAMILY: Family = Family::Reparameterization;
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[("alpha", "lora_alpha"), ("dropout", "lora_dropout"), ("rank", "r")];
    const PEFT_TYPE: Option<&'static str> = Some("LORA");
    // PEFT spells DoRA as a LoRA option.
    const SWITCHES: &'static [(&'static str, &'static str)] = &[("use_dora", "dora")];

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Linear]
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        // PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for bert and llama.
        query_value(model_type)
    }

    fn validate(&self, _info: &BackboneInfo) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Delta("lora: r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::Delta(format!("lora: lora_dropout {} is not in [0, 1)", self.lora_dropout)));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(Error::Delta(format!("lora: lora_alpha must be a positive number, got {}", self.lora_alpha)));
        }
        if self.fan_in_fan_out {
            return Err(Error::Delta("lora: fan_in_fan_out=true applies to Conv1D layers only; BERT uses Linear (set it to false)".into()));
        }
        Ok(())
    }

    fn from_peft(p: &PeftIn) -> Result<(Self, Targets)> {
        p.refuse_true("lora_bias", "a LoRA bias")?;
        p.refuse_pattern("rank_pattern")?;
        p.refuse_pattern("alpha_pattern")?;
        if let Some(b) = p.str("bias").filter(|b| *b != "none") {
            return Err(p.bad(format!("bias=\"{b}\" is not supported; attach a bitfit delta alongside")));
        }
        let cfg = LoraConfig {
            r: p.usize("r")?,
            lora_alpha: p.num("lora_alpha")?,
            lora_dropout: p.num_or("lora_dropout", 0.0) as f32,
            use_rslora: p.bool_or("use_rslora", false),
            ..Default::default()
        };
        Ok((cfg, p.targets()?))
    }

    fn to_peft(&self, targets: &Targets, p: &PeftOut) -> Result<Value> {
        if self.lora_alpha.fract() != 0.0 {
            return Err(Error::Delta("PEFT stores lora_alpha as an integer in practice; export needs an integer alpha".into()));
        }
        let (target_modules, exclude_modules) = p.target_fields(targets, &self.default_targets(p.model_type));
        Ok(json!({
            "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null, "auto_mapping": null,
            "base_model_name_or_path": p.base_model, "bias": "none", "corda_config": null, "ensure_weight_tying": false,
            "eva_config": null, "exclude_modules": exclude_modules, "fan_in_fan_out": false,
            "inference_mode": true, "init_lora_weights": true, "kasa_config": null, "layer_replication": null,
            "layers_pattern": null, "layers_to_transform": targets.layers_to_transform, "loftq_config": {},
            "lora_alpha": self.lora_alpha as i64, "lora_bias": false, "lora_dropout": self.lora_dropout as f64, "lora_ga_config": null,
            "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": p.modules_to_save,
            "monteclora_config": null, "peft_type": "LORA", "peft_version": PEFT_VERSION, "qalora_group_size": 16, "r": self.r,
            "rank_pattern": {}, "revision": null, "target_modules": target_modules,
            "target_parameters": null, "task_type": "FEATURE_EXTRACTION", "trainable_token_indices": null,
            "use_bdlora": null, "use_dora": false, "use_qalora": false, "use_rslora": self.use_rslora, "velora_config": null
        }))
    }

    fn param_estimate(&self, inp: usize, out: usize, _info: &BackboneInfo) -> Option<u128> {
        Some(self.r as u128 * (inp as u128 + out as u128))
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (inp, out) = site_dims(site, &ctx.info)?;
        let (dev, r) = (&ctx.device, self.r);
        let sa = ctx.stream(site.path(), "lora_A");
        let sb = ctx.stream(site.path(), "lora_B");
        let (a, b) = match self.init_lora_weights {
            LoraInit::Kaiming => (sa.kaiming_uniform(&[r, inp], inp, dev)?, init::zeros(&[out, r], dev)?),
            LoraInit::Gaussian => (sa.normal(&[r, inp], 0.0, 1.0 / r as f32, dev)?, init::zeros(&[out, r], dev)?),
            LoraInit::Random => (sa.kaiming_uniform(&[r, inp], inp, dev)?, sb.kaiming_uniform(&[out, r], r, dev)?),
        };
        Ok(Box::new(Lora { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)?, scale: self.scaling(), dropout: self.lora_dropout }))
    }
}

#[derive(Debug)]
pub struct Lora {
    a: Var, // (r, in)
    b: Var, // (out, r)
    scale: f64,
    dropout: f32,
}

impl Delta for Lora {
    fn method(&self) -> &'static str {
        "lora"
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("lora_A.weight".into(), self.a.clone()), ("lora_B.weight".into(), self.b.clone())]
    }

    fn low_rank(&self, h: &HookCtx) -> Result<Option<(Tensor, Tensor)>> {
        if h.inference || (h.train && self.dropout > 0.0) {
            return Ok(None);
        }
        Ok(Some((self.a.as_tensor().clone(), h.gated((self.b.as_tensor() * self.scale)?)?)))
    }

    fn post(&self, x: &Tensor, y: &Tensor, h: &HookCtx) -> Result<Option<Tensor>> {
        let x = if h.train && self.dropout > 0.0 { ops::dropout(x, self.dropout, h.key)? } else { x.clone() };
        // The scale (and a search gate) folded into the small B: (x A^T)(s·B)^T = s·(x A^T B^T),
        // one tensor of rank × out instead of a pass over the whole output.
        let b = h.gated((self.b.as_tensor() * self.scale)?)?;
        if h.inference {
            // Inference: rows computed one by one (a row's numbers do not depend on its batch),
            // and nothing downstream records a graph (quantized layers keep their inference
            // kernels).
            let d = ops::low_rank_rows(&x, self.a.as_tensor(), &b)?;
            return Ok(Some(y.add(&d)?));
        }
        let d = ops::linear(&ops::linear(&x, self.a.as_tensor(), None)?, &b, None)?;
        Ok(Some(y.add(&d)?))
    }

    /// The block engines run it with its dropout too: the update on the dropped input.
    fn engine_hook(&self, h: &HookCtx) -> Result<Option<EngineHook>> {
        if h.inference {
            return Ok(None);
        }
        let drop = (h.train && self.dropout > 0.0).then_some((self.dropout, h.key));
        Ok(Some(EngineHook::LowRank(self.a.as_tensor().clone(), h.gated((self.b.as_tensor() * self.scale)?)?, drop)))
    }

    fn merged(&self, base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        let Some((_, w)) = base.iter().find(|(n, _)| n == "weight") else { return Ok(None) };
        let dw = (self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?;
        Ok(Some(vec![("weight".into(), w.add(&dw)?)]))
    }
}
