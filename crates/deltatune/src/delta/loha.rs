//! LoHa (Hyeon-Woo et al., 2022, FedPara; LyCORIS), reparameterization family: the weight
//! update is the Hadamard (element-wise) product of two rank-r products,
//! `ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r`, so its rank can reach r² with 2r(in + out)
//! numbers. Follows PEFT (`tuners/loha/layer.py`): `hada_w1_a` (out, r), `hada_w1_b` (r, in),
//! `hada_w2_a` (out, r), `hada_w2_b` (r, in); initialisation kaiming-uniform (a=√5, i.e.
//! U(±1/√fan_in)) for the first three and `hada_w2_b = 0`, so a fresh LoHa is the identity;
//! `y = x Wᵀ + b + x ΔWᵀ`. Per-module `rank_pattern` / `alpha_pattern`, rank dropout (rows of
//! ΔW, rescaled by the kept fraction) and module dropout while training. Mergeable: `W + ΔW`.

use super::lycoris::{alpha_json, check_prob, module_dropped, pattern, peft_number, rank_dropout, rank_json, Pattern};
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LohaConfig {
    /// Rank of each of the two factors.
    pub r: usize,
    /// Scale numerator: ΔW is multiplied by alpha / r.
    pub alpha: f64,
    /// While training, each output row of ΔW is dropped with this probability.
    pub rank_dropout: f32,
    /// While training, the whole update is skipped for a step with this probability.
    pub module_dropout: f32,
    /// PEFT's default (w2_b = 0, the identity); false: all four random (not a no-op).
    pub init_weights: bool,
    /// Convolution-only option of PEFT, kept for config compatibility (no effect on Linear).
    pub use_effective_conv2d: bool,
    /// Rank per module (regex over the module path → r).
    pub rank_pattern: Pattern<usize>,
    /// Alpha per module (regex over the module path → alpha).
    pub alpha_pattern: Pattern<f64>,
}

impl Default for LohaConfig {
    fn default() -> Self {
        LohaConfig {
            r: 8,
            alpha: 8.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            init_weights: true,
            use_effective_conv2d: false,
            rank_pattern: Pattern::default(),
            alpha_pattern: Pattern::default(),
        }
    }
}

impl LohaConfig {
    /// Rank and alpha in effect at module `path`.
    pub fn rank_alpha(&self, path: &str) -> Result<(usize, f64)> {
        let r = self.rank_pattern.lookup(path, self.r, "loha: rank_pattern")?;
        let alpha = self.alpha_pattern.lookup(path, self.alpha, "loha: alpha_pattern")?;
        Ok((r, alpha))
    }

    fn max_rank(&self) -> usize {
        self.rank_pattern.0.iter().map(|(_, r)| *r).chain([self.r]).max().unwrap_or(self.r)
    }
}

impl Method for LohaConfig {
    const FAMILY: Family = Family::Reparameterization;
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[("rank", "r")];
    const PEFT_TYPE: Option<&'static str> = Some("LOHA");

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Linear]
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        // PEFT's TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING (a copy of LoRA's).
        query_value(model_type)
    }

    fn validate(&self, _info: &BackboneInfo) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Delta("loha: r must be at least 1".into()));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::Delta(format!("loha: alpha must be a positive number, got {}", self.alpha)));
        }
        check_prob("loha", "rank_dropout", self.rank_dropout)?;
        check_prob("loha", "module_dropout", self.module_dropout)?;
        self.rank_pattern.check("loha", "rank_pattern", |r| *r > 0, "a rank of at least 1")?;
        self.alpha_pattern.check("loha", "alpha_pattern", |a| a.is_finite() && *a > 0.0, "a positive number")?;
        Ok(())
    }

    fn from_peft(p: &PeftIn) -> Result<(Self, Targets)> {
        let cfg = LohaConfig {
            r: p.usize("r")?,
            alpha: p.num("alpha")?,
            rank_dropout: p.num_or("rank_dropout", 0.0) as f32,
            module_dropout: p.num_or("module_dropout", 0.0) as f32,
            init_weights: p.bool_or("init_weights", true),
            use_effective_conv2d: p.bool_or("use_effective_conv2d", false),
            rank_pattern: pattern(p, "rank_pattern")?,
            alpha_pattern: pattern(p, "alpha_pattern")?,
        };
        Ok((cfg, p.targets()?))
    }

    fn to_peft(&self, targets: &Targets, p: &PeftOut) -> Result<Value> {
        let (target_modules, exclude_modules) = p.target_fields(targets, &self.default_targets(p.model_type));
        Ok(json!({
            "alpha": peft_number(self.alpha), "alpha_pattern": alpha_json(&self.alpha_pattern), "auto_mapping": null,
            "base_model_name_or_path": p.base_model, "exclude_modules": exclude_modules, "inference_mode": true,
            "init_weights": self.init_weights, "layers_pattern": null, "layers_to_transform": targets.layers_to_transform,
            "module_dropout": self.module_dropout as f64, "modules_to_save": p.modules_to_save, "peft_type": "LOHA",
            "peft_version": PEFT_VERSION, "r": self.r, "rank_dropout": self.rank_dropout as f64,
            "rank_pattern": rank_json(&self.rank_pattern), "revision": null, "target_modules": target_modules,
            "task_type": "FEATURE_EXTRACTION", "use_effective_conv2d": self.use_effective_conv2d
        }))
    }

    fn param_estimate(&self, inp: usize, out: usize, _info: &BackboneInfo) -> Option<u128> {
        Some(2 * self.max_rank() as u128 * (inp as u128 + out as u128))
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (inp, out) = site_dims(site, &ctx.info)?;
        let (r, alpha) = self.rank_alpha(site.path())?;
        let dev = &ctx.device;
        let s = |name: &str| ctx.stream(site.path(), name);
        // torch's kaiming_uniform_(a=√5) on a (rows, cols) weight: U(±1/√cols).
        let w1a = s("hada_w1_a").kaiming_uniform(&[out, r], r, dev)?;
        let w1b = s("hada_w1_b").kaiming_uniform(&[r, inp], inp, dev)?;
        let w2a = s("hada_w2_a").kaiming_uniform(&[out, r], r, dev)?;
        let w2b = if self.init_weights { init::zeros(&[r, inp], dev)? } else { s("hada_w2_b").kaiming_uniform(&[r, inp], inp, dev)? };
        Ok(Box::new(Loha {
            w1a: Var::from_tensor(&w1a)?,
            w1b: Var::from_tensor(&w1b)?,
            w2a: Var::from_tensor(&w2a)?,
            w2b: Var::from_tensor(&w2b)?,
            scale: alpha / r as f64,
            rank_dropout: self.rank_dropout,
            module_dropout: self.module_dropout,
        }))
    }
}

#[derive(Debug)]
pub struct Loha {
    w1a: Var, // (out, r)
    w1b: Var, // (r, in)
    w2a: Var, // (out, r)
    w2b: Var, // (r, in)
    scale: f64,
    rank_dropout: f32,
    module_dropout: f32,
}

impl Loha {
    /// `(w1_a w1_b) ⊙ (w2_a w2_b) · scale`, (out, in).
    fn delta_weight(&self) -> Result<Tensor> {
        let w1 = self.w1a.as_tensor().matmul(self.w1b.as_tensor())?;
        let w2 = self.w2a.as_tensor().matmul(self.w2b.as_tensor())?;
        Ok((w1.mul(&w2)? * self.scale)?)
    }
}

impl Delta for Loha {
    fn method(&self) -> &'static str {
        "loha"
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("hada_w1_a".into(), self.w1a.clone()),
            ("hada_w1_b".into(), self.w1b.clone()),
            ("hada_w2_a".into(), self.w2a.clone()),
            ("hada_w2_b".into(), self.w2b.clone()),
        ]
    }

    fn post(&self, x: &Tensor, y: &Tensor, h: &HookCtx) -> Result<Option<Tensor>> {
        if module_dropped(h, self.module_dropout) {
            return Ok(None);
        }
        let dw = rank_dropout(self.delta_weight()?, h, self.rank_dropout, true, x.device())?;
        let dw = h.gated(dw)?;
        Ok(Some(y.add(&ops::linear(x, &dw, None)?)?))
    }

    /// The block engines add `x ΔWᵀ` themselves (with the same module and rank dropout).
    fn engine_hook(&self, h: &HookCtx) -> Result<Option<EngineHook>> {
        if module_dropped(h, self.module_dropout) {
            return Ok(Some(EngineHook::Reparam));
        }
        let dw = rank_dropout(self.delta_weight()?, h, self.rank_dropout, true, self.w1a.device())?;
        Ok(Some(EngineHook::Dense(h.gated(dw)?, None)))
    }

    fn merged(&self, base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        let Some((_, w)) = base.iter().find(|(n, _)| n == "weight") else { return Ok(None) };
        Ok(Some(vec![("weight".into(), w.add(&self.delta_weight()?)?)]))
    }
}
