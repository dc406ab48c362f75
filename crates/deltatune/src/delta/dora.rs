//! DoRA (Liu et al., 2024), reparameterization family: weight-decomposed LoRA. The adapted weight
//! is `W' = m ⊙ (W + s·B A) / ‖W + s·B A‖`, the norm taken over each output row and `m` a
//! trainable magnitude per output row; `s = lora_alpha / r` (or `/√r` with rsLoRA).
//!
//! PEFT spells DoRA `LoraConfig(use_dora=True)` (`peft_type` "LORA"); here it is the method
//! `dora` with LoRA's fields, and `lora:use_dora=true` (or a LoRA adapter_config.json with
//! `use_dora: true`) selects it. The forward follows PEFT's `DoraLinearLayer` (`tuners/lora/dora.py`):
//! the norm is computed from the current `B A` but detached from the graph (the paper's §4.3
//! gradient simplification), so gradients reach `m` through `m / ‖·‖` and `A`, `B` only through
//! the LoRA branch:
//!
//! `y' = y + (m/‖W + s·BA‖ − 1) ⊙ (x Wᵀ) + (m/‖W + s·BA‖) ⊙ s·B A x`
//!
//! with `x Wᵀ` the base output without its bias. With dropout (training only) PEFT feeds the
//! dropped input to both the LoRA branch and a recomputed `x Wᵀ`, and so do we.
//!
//! Initialisation as LoRA (A ~ U(±1/√in), B = 0) and, as PEFT, `m = ‖W + s·B A‖` per row, so a
//! fresh DoRA is the identity (with `init_lora_weights=random` it starts at `W + s·B A`). Mergeable like PEFT's `merge`:
//! `W' = (m / ‖W + s·B A‖) ⊙ (W + s·B A)`, the bias unchanged.

use super::lora::{LoraConfig, LoraInit};
use super::method::{site_dims, BuildCtx, Family, Method};
use super::peft_fields::{PeftIn, PeftOut};
use super::targets::Targets;
use crate::core::init;
use crate::core::{BackboneInfo, Delta, EngineHook, HookCtx, Site, SiteKind};
use crate::error::{Error, Result};
use crate::ops;
use candle_core::{DType, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// DoRA's hyperparameters: LoRA's, with PEFT's defaults (r 8, lora_alpha 8).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DoraConfig {
    /// Rank of the direction update B A.
    pub r: usize,
    /// Scale numerator (PEFT default 8).
    pub lora_alpha: f64,
    /// Dropout on the input of the DoRA terms (training only).
    pub lora_dropout: f32,
    /// rsLoRA: scale by alpha/√r instead of alpha/r.
    pub use_rslora: bool,
    pub init_lora_weights: LoraInit,
    /// Kept for PEFT config compatibility; must be false (BERT and Llama use Linear layers).
    pub fan_in_fan_out: bool,
}

impl Default for DoraConfig {
    fn default() -> Self {
        Self::from_lora(LoraConfig::default())
    }
}

impl DoraConfig {
    /// The LoRA config with the same fields (PEFT's view of a DoRA adapter).
    pub fn as_lora(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            use_rslora: self.use_rslora,
            init_lora_weights: self.init_lora_weights,
            fan_in_fan_out: self.fan_in_fan_out,
        }
    }

    pub fn from_lora(l: LoraConfig) -> Self {
        DoraConfig {
            r: l.r,
            lora_alpha: l.lora_alpha,
            lora_dropout: l.lora_dropout,
            use_rslora: l.use_rslora,
            init_lora_weights: l.init_lora_weights,
            fan_in_fan_out: l.fan_in_fan_out,
        }
    }
}

impl Method for DoraConfig {
    const FAMILY: Family = Family::Reparameterization;
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[("alpha", "lora_alpha"), ("dropout", "lora_dropout"), ("rank", "r")];
    const PEFT_TYPE: Option<&'static str> = Some("LORA");

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Linear]
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        // PEFT's LoRA defaults (DoRA is a LoRA option there).
        self.as_lora().default_targets(model_type)
    }

    fn validate(&self, _info: &BackboneInfo) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Delta("dora: r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::Delta(format!("dora: lora_dropout {} is not in [0, 1)", self.lora_dropout)));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(Error::Delta(format!("dora: lora_alpha must be a positive number, got {}", self.lora_alpha)));
        }
        if self.fan_in_fan_out {
            return Err(Error::Delta("dora: fan_in_fan_out=true applies to Conv1D layers only; BERT uses Linear (set it to false)".into()));
        }
        Ok(())
    }

    fn param_estimate(&self, inp: usize, out: usize, _info: &BackboneInfo) -> Option<u128> {
        Some(self.r as u128 * (inp as u128 + out as u128) + out as u128)
    }

    /// Reached for a LoRA adapter_config.json with `use_dora: true` (LoRA's `use_dora` switch).
    fn from_peft(p: &PeftIn) -> Result<(Self, Targets)> {
        let (lora, targets) = LoraConfig::from_peft(p)?;
        Ok((Self::from_lora(lora), targets))
    }

    fn to_peft(&self, targets: &Targets, p: &PeftOut) -> Result<Value> {
        let mut v = self.as_lora().to_peft(targets, p)?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("use_dora".into(), Value::Bool(true));
            // The f32 dropout as its shortest decimal (0.05, not 0.05000000074505806).
            let d: f64 = self.lora_dropout.to_string().parse().unwrap_or(self.lora_dropout as f64);
            obj.insert("lora_dropout".into(), serde_json::json!(d));
        }
        Ok(v)
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
        // The base weight as it is now (dequantized once for a quantized decoder layer).
        let weight = match (site.param("weight"), site.quantized("weight")) {
            (Some(w), _) => w.to_dtype(DType::F32)?,
            (None, Some(q)) => q.dequantize(dev)?,
            (None, None) => return Err(Error::Delta(format!("{} has no weight", site.path()))),
        };
        let bias = site.param("bias").map(|b| b.to_dtype(DType::F32)).transpose()?;
        let scale = self.as_lora().scaling();
        let magnitude = row_norms(&weight, &b, &a, scale)?;
        Ok(Box::new(Dora {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            m: Var::from_tensor(&magnitude)?,
            weight,
            bias,
            scale,
            dropout: self.lora_dropout,
        }))
    }
}

/// `‖W + s·B A‖` over each output row, (out,), outside the graph.
fn row_norms(w: &Tensor, b: &Tensor, a: &Tensor, scale: f64) -> Result<Tensor> {
    let v = w.add(&(b.detach().matmul(&a.detach())? * scale)?)?;
    Ok(v.sqr()?.sum(D::Minus1)?.sqrt()?.detach())
}

#[derive(Debug)]
pub struct Dora {
    a: Var, // (r, in)
    b: Var, // (out, r)
    /// The magnitude vector, (out,).
    m: Var,
    /// The frozen base weight (out, in) and bias the norm and the bias-free base output use.
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f64,
    dropout: f32,
}

impl Delta for Dora {
    fn method(&self) -> &'static str {
        "dora"
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_A.weight".into(), self.a.clone()),
            ("lora_B.weight".into(), self.b.clone()),
            ("lora_magnitude_vector".into(), self.m.clone()),
        ]
    }

    fn post(&self, x: &Tensor, y: &Tensor, h: &HookCtx) -> Result<Option<Tensor>> {
        let norm = row_norms(&self.weight, self.b.as_tensor(), self.a.as_tensor(), self.scale)?;
        let mag_scale = self.m.as_tensor().div(&norm)?; // (out,)
        let dropped = h.train && self.dropout > 0.0;
        let x = if dropped { ops::dropout(x, self.dropout, h.key)? } else { x.clone() };
        let b = (self.b.as_tensor() * self.scale)?;
        let lora = ops::linear(&ops::linear(&x, self.a.as_tensor(), None)?, &b, None)?;
        // The base output without its bias: recomputed on the dropped input, as PEFT does.
        let base = if dropped {
            ops::linear(&x, &self.weight, None)?
        } else {
            match &self.bias {
                Some(bias) => y.broadcast_sub(bias)?,
                None => y.clone(),
            }
        };
        let contribution = base.broadcast_mul(&(&mag_scale - 1.0)?)?.add(&lora.broadcast_mul(&mag_scale)?)?;
        Ok(Some(y.add(&h.gated(contribution)?)?))
    }

    /// Without dropout and ungated, the block engines run it as a LoRA inside a magnitude scale
    /// that leaves the frozen bias out: `b₀ + m / ‖W + BA‖ ⊙ (x Wᵀ + x Aᵀ Bᵀ)`. With dropout in
    /// training or a search gate, as [`Self::post`]'s contribution written as one weight update
    /// on the dropped input, `g · x' (diag(mag − 1) W + diag(mag) s B A)ᵀ` (three products the size
    /// of the map's, still cheaper than the layer module by module).
    fn engine_hook(&self, h: &HookCtx) -> Result<Option<EngineHook>> {
        let norm = row_norms(&self.weight, self.b.as_tensor(), self.a.as_tensor(), self.scale)?;
        let mag = self.m.as_tensor().div(&norm)?;
        let b = (self.b.as_tensor() * self.scale)?;
        let dropped = h.train && self.dropout > 0.0;
        if dropped || h.gate.is_some() {
            let mag = mag.unsqueeze(1)?;
            let base = self.weight.broadcast_mul(&(&mag - 1.0)?.to_dtype(self.weight.dtype())?)?;
            let update = b.matmul(self.a.as_tensor())?.broadcast_mul(&mag)?;
            let dw = h.gated(base.add(&update)?)?;
            return Ok(Some(EngineHook::Dense(dw, dropped.then_some((self.dropout, h.key)))));
        }
        Ok(Some(EngineHook::Dora { a: self.a.as_tensor().clone(), b, mag, base_bias: self.bias.clone() }))
    }

    fn merged(&self, base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        let Some((_, w)) = base.iter().find(|(n, _)| n == "weight") else { return Ok(None) };
        let v = w.add(&(self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)?;
        let norm = v.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        let factor = self.m.as_tensor().unsqueeze(1)?.div(&norm)?;
        Ok(Some(vec![("weight".into(), v.broadcast_mul(&factor)?.detach())]))
    }
}
