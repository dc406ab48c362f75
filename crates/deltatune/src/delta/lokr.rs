//! LoKr (Yeh et al., 2023; LyCORIS), reparameterization family: the weight update is a Kronecker
//! product `ΔW = (w1 ⊗ w2) · alpha / r` of a small left matrix and a larger right one, either of
//! which may itself be a rank-r product. Follows PEFT (`tuners/lokr/layer.py`):
//!
//! - sizes: `in = c·d`, `out = a·b` with `(c, d) = factorization(in, decompose_factor)` and
//!   `(a, b) = factorization(out, decompose_factor)` ([`factorization`]); `w1` is (a, c), `w2` is
//!   (b, d), so `ΔW` is (a·b, c·d) = (out, in);
//! - `w1` is a full `lokr_w1` unless `decompose_both` and `r < max(a, c) / 2`, then
//!   `lokr_w1_a` (a, r) · `lokr_w1_b` (r, c); `w2` is a full `lokr_w2` unless `r < max(b, d) / 2`,
//!   then `lokr_w2_a` (b, r) · `lokr_w2_b` (r, d) — with `r` from `rank_pattern` per module;
//! - initialisation (`init_weights=true`): `w1` (or `w1_a`) zero, the rest kaiming-uniform, so a
//!   fresh LoKr is the identity; `"lycoris"`: `w2` (or `w2_b`) zero instead; `false`: all random;
//! - rank dropout on the rows of ΔW (rescaled only with `rank_dropout_scale`), module dropout.
//!
//! Mergeable: `W + ΔW`.

use super::lycoris::{alpha_json, check_prob, module_dropped, pattern, peft_number, rank_dropout, rank_json, Pattern};
use super::method::{site_dims, BuildCtx, Family, Method};
use super::peft_fields::{PeftIn, PeftOut, PEFT_VERSION};
use super::targets::{query_value, Targets};
use crate::core::init::{self, Stream};
use crate::core::{BackboneInfo, Delta, EngineHook, HookCtx, Site, SiteKind};
use crate::error::{Error, Result};
use crate::ops;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// PEFT's `init_weights` for LoKr: `true`, `false` or `"lycoris"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LokrInit {
    /// true: w1 zero (PEFT's default); false: every factor random (not a no-op).
    Flag(bool),
    /// `"lycoris"`: w2 zero, as the LyCORIS library initialises.
    Named(LycorisInit),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LycorisInit {
    Lycoris,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LokrConfig {
    /// Rank of the factored matrices (and what decides full vs factored).
    pub r: usize,
    /// Scale numerator: ΔW is multiplied by alpha / r.
    pub alpha: f64,
    pub rank_dropout: f32,
    pub module_dropout: f32,
    /// Also factor the left matrix w1 into a rank-r product when r is small enough.
    pub decompose_both: bool,
    /// The factor sizes aim at this number (-1: close to the square root).
    pub decompose_factor: i64,
    /// Rescale rank dropout by the kept fraction.
    pub rank_dropout_scale: bool,
    pub init_weights: LokrInit,
    /// Convolution-only option of PEFT, kept for config compatibility (no effect on Linear).
    pub use_effective_conv2d: bool,
    pub rank_pattern: Pattern<usize>,
    pub alpha_pattern: Pattern<f64>,
}

impl Default for LokrConfig {
    fn default() -> Self {
        LokrConfig {
            r: 8,
            alpha: 8.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            decompose_both: false,
            decompose_factor: -1,
            rank_dropout_scale: false,
            init_weights: LokrInit::Flag(true),
            use_effective_conv2d: false,
            rank_pattern: Pattern::default(),
            alpha_pattern: Pattern::default(),
        }
    }
}

/// PEFT's `factorization(dimension, factor)`: two numbers whose product is `dimension`. A positive
/// `factor` dividing it gives `(factor, dimension / factor)` as is (not sorted); otherwise the
/// divisor pair closest to the square root with the smaller one at most `factor` (-1: any),
/// smaller first.
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension % factor as usize == 0 {
        return (factor as usize, dimension / factor as usize);
    }
    let limit = if factor == -1 { dimension as i64 } else { factor };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while dimension % new_m != 0 {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m as i64 > limit {
            break;
        }
        m = new_m;
        n = new_n;
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

/// The shapes PEFT gives one module: `w1` (a, c), `w2` (b, d) and whether each is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LokrShape {
    pub a: usize,
    pub b: usize,
    pub c: usize,
    pub d: usize,
    pub full_w1: bool,
    pub full_w2: bool,
}

impl LokrShape {
    pub fn new(inp: usize, out: usize, r: usize, decompose_both: bool, factor: i64) -> Self {
        let (c, d) = factorization(inp, factor);
        let (a, b) = factorization(out, factor);
        // PEFT compares an integer with a float half: r < max / 2.
        let full_w1 = !(decompose_both && (r as f64) < a.max(c) as f64 / 2.0);
        let full_w2 = (r as f64) >= b.max(d) as f64 / 2.0;
        LokrShape { a, b, c, d, full_w1, full_w2 }
    }

    /// Trainable scalars at rank `r`.
    pub fn count(&self, r: usize) -> usize {
        let w1 = if self.full_w1 { self.a * self.c } else { r * (self.a + self.c) };
        let w2 = if self.full_w2 { self.b * self.d } else { r * (self.b + self.d) };
        w1 + w2
    }
}

impl LokrConfig {
    /// Rank and alpha in effect at module `path`.
    pub fn rank_alpha(&self, path: &str) -> Result<(usize, f64)> {
        let r = self.rank_pattern.lookup(path, self.r, "lokr: rank_pattern")?;
        let alpha = self.alpha_pattern.lookup(path, self.alpha, "lokr: alpha_pattern")?;
        Ok((r, alpha))
    }
}

impl Method for LokrConfig {
    const FAMILY: Family = Family::Reparameterization;
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[("rank", "r")];
    const PEFT_TYPE: Option<&'static str> = Some("LOKR");

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Linear]
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        // PEFT's TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING (a copy of LoRA's).
        query_value(model_type)
    }

    fn validate(&self, _info: &BackboneInfo) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Delta("lokr: r must be at least 1".into()));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::Delta(format!("lokr: alpha must be a positive number, got {}", self.alpha)));
        }
        if self.decompose_factor == 0 || self.decompose_factor < -1 {
            return Err(Error::Delta(format!("lokr: decompose_factor must be -1 or a positive number, got {}", self.decompose_factor)));
        }
        check_prob("lokr", "rank_dropout", self.rank_dropout)?;
        check_prob("lokr", "module_dropout", self.module_dropout)?;
        self.rank_pattern.check("lokr", "rank_pattern", |r| *r > 0, "a rank of at least 1")?;
        self.alpha_pattern.check("lokr", "alpha_pattern", |a| a.is_finite() && *a > 0.0, "a positive number")?;
        Ok(())
    }

    fn from_peft(p: &PeftIn) -> Result<(Self, Targets)> {
        let init_weights = match p.obj.get("init_weights") {
            None | Some(Value::Null) => LokrInit::Flag(true),
            Some(v) => serde_json::from_value(v.clone()).map_err(|_| p.bad(format!("`init_weights` must be true, false or \"lycoris\", got {v}")))?,
        };
        let decompose_factor = match p.obj.get("decompose_factor") {
            None | Some(Value::Null) => -1,
            Some(v) => v.as_i64().ok_or_else(|| p.bad(format!("`decompose_factor` must be an integer, got {v}")))?,
        };
        let cfg = LokrConfig {
            r: p.usize("r")?,
            alpha: p.num("alpha")?,
            rank_dropout: p.num_or("rank_dropout", 0.0) as f32,
            module_dropout: p.num_or("module_dropout", 0.0) as f32,
            decompose_both: p.bool_or("decompose_both", false),
            decompose_factor,
            rank_dropout_scale: p.bool_or("rank_dropout_scale", false),
            init_weights,
            use_effective_conv2d: p.bool_or("use_effective_conv2d", false),
            rank_pattern: pattern(p, "rank_pattern")?,
            alpha_pattern: pattern(p, "alpha_pattern")?,
        };
        Ok((cfg, p.targets()?))
    }

    fn to_peft(&self, targets: &Targets, p: &PeftOut) -> Result<Value> {
        let (target_modules, exclude_modules) = p.target_fields(targets, &self.default_targets(p.model_type));
        let init = match self.init_weights {
            LokrInit::Flag(b) => json!(b),
            LokrInit::Named(_) => json!("lycoris"),
        };
        Ok(json!({
            "alpha": peft_number(self.alpha), "alpha_pattern": alpha_json(&self.alpha_pattern), "auto_mapping": null,
            "base_model_name_or_path": p.base_model, "decompose_both": self.decompose_both,
            "decompose_factor": self.decompose_factor, "exclude_modules": exclude_modules, "inference_mode": true,
            "init_weights": init, "layers_pattern": null, "layers_to_transform": targets.layers_to_transform,
            "module_dropout": self.module_dropout as f64, "modules_to_save": p.modules_to_save, "peft_type": "LOKR",
            "peft_version": PEFT_VERSION, "r": self.r, "rank_dropout": self.rank_dropout as f64,
            "rank_dropout_scale": self.rank_dropout_scale, "rank_pattern": rank_json(&self.rank_pattern), "revision": null,
            "target_modules": target_modules, "task_type": "FEATURE_EXTRACTION", "use_effective_conv2d": self.use_effective_conv2d
        }))
    }

    fn param_estimate(&self, inp: usize, out: usize, _info: &BackboneInfo) -> Option<u128> {
        let ranks = self.rank_pattern.0.iter().map(|(_, r)| *r).chain([self.r]);
        ranks.map(|r| LokrShape::new(inp, out, r, self.decompose_both, self.decompose_factor).count(r) as u128).max()
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (inp, out) = site_dims(site, &ctx.info)?;
        let (r, alpha) = self.rank_alpha(site.path())?;
        let sh = LokrShape::new(inp, out, r, self.decompose_both, self.decompose_factor);
        let dev = &ctx.device;
        let s = |name: &str| ctx.stream(site.path(), name);
        // Which tensor starts at zero: w1 (PEFT's default), w2 ("lycoris"), or none (false).
        let (zero_w1, zero_w2) = match self.init_weights {
            LokrInit::Flag(true) => (true, false),
            LokrInit::Named(_) => (false, true),
            LokrInit::Flag(false) => (false, false),
        };
        // torch's kaiming_uniform_(a=√5) on a (rows, cols) weight: U(±1/√cols).
        let ku = |st: Stream, shape: [usize; 2], zero: bool| -> Result<Var> {
            let t = if zero { init::zeros(&shape, dev)? } else { st.kaiming_uniform(&shape, shape[1], dev)? };
            Ok(Var::from_tensor(&t)?)
        };
        let w1 = if sh.full_w1 {
            Factor::Full(ku(s("lokr_w1"), [sh.a, sh.c], zero_w1)?)
        } else {
            // PEFT zeroes w1_a (and leaves w1_b random) for the default init.
            Factor::Product(ku(s("lokr_w1_a"), [sh.a, r], zero_w1)?, ku(s("lokr_w1_b"), [r, sh.c], false)?)
        };
        let w2 = if sh.full_w2 {
            Factor::Full(ku(s("lokr_w2"), [sh.b, sh.d], zero_w2)?)
        } else {
            // "lycoris" zeroes w2_b and keeps w2_a random.
            Factor::Product(ku(s("lokr_w2_a"), [sh.b, r], false)?, ku(s("lokr_w2_b"), [r, sh.d], zero_w2)?)
        };
        Ok(Box::new(Lokr {
            w1,
            w2,
            scale: alpha / r as f64,
            rank_dropout: self.rank_dropout,
            rank_dropout_scale: self.rank_dropout_scale,
            module_dropout: self.module_dropout,
            device: dev.clone(),
        }))
    }
}

/// One side of the Kronecker product: a full matrix or a rank-r product.
#[derive(Debug)]
enum Factor {
    Full(Var),
    Product(Var, Var),
}

impl Factor {
    fn matrix(&self) -> Result<Tensor> {
        Ok(match self {
            Factor::Full(w) => w.as_tensor().clone(),
            Factor::Product(a, b) => a.as_tensor().matmul(b.as_tensor())?,
        })
    }

    fn params(&self, name: &str, out: &mut Vec<(String, Var)>) {
        match self {
            Factor::Full(w) => out.push((name.to_string(), w.clone())),
            Factor::Product(a, b) => {
                out.push((format!("{name}_a"), a.clone()));
                out.push((format!("{name}_b"), b.clone()));
            }
        }
    }
}

/// `a ⊗ b` (torch.kron) for matrices: (p, q) ⊗ (s, t) → (p·s, q·t).
pub fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (p, q) = a.dims2()?;
    let (s, t) = b.dims2()?;
    let k = a.reshape((p, 1, q, 1))?.broadcast_mul(&b.reshape((1, s, 1, t))?)?;
    Ok(k.reshape((p * s, q * t))?)
}

#[derive(Debug)]
pub struct Lokr {
    w1: Factor, // (a, c)
    w2: Factor, // (b, d)
    scale: f64,
    rank_dropout: f32,
    rank_dropout_scale: bool,
    module_dropout: f32,
    device: Device,
}

impl Lokr {
    /// `(w1 ⊗ w2) · scale`, (out, in).
    fn delta_weight(&self) -> Result<Tensor> {
        Ok((kron(&self.w1.matrix()?, &self.w2.matrix()?)? * self.scale)?)
    }
}

impl Delta for Lokr {
    fn method(&self) -> &'static str {
        "lokr"
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        self.w1.params("lokr_w1", &mut out);
        self.w2.params("lokr_w2", &mut out);
        out
    }

    fn post(&self, x: &Tensor, y: &Tensor, h: &HookCtx) -> Result<Option<Tensor>> {
        if module_dropped(h, self.module_dropout) {
            return Ok(None);
        }
        let dw = rank_dropout(self.delta_weight()?, h, self.rank_dropout, self.rank_dropout_scale, &self.device)?;
        let dw = h.gated(dw)?;
        Ok(Some(y.add(&ops::linear(x, &dw, None)?)?))
    }

    /// The block engines add `x ΔWᵀ` themselves (with the same module and rank dropout).
    fn engine_hook(&self, h: &HookCtx) -> Result<Option<EngineHook>> {
        if module_dropped(h, self.module_dropout) {
            return Ok(Some(EngineHook::Reparam));
        }
        let dw = rank_dropout(self.delta_weight()?, h, self.rank_dropout, self.rank_dropout_scale, &self.device)?;
        Ok(Some(EngineHook::Dense(h.gated(dw)?, None)))
    }

    fn merged(&self, base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        let Some((_, w)) = base.iter().find(|(n, _)| n == "weight") else { return Ok(None) };
        Ok(Some(vec![("weight".into(), w.add(&self.delta_weight()?)?)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_of_the_fixture_modules() {
        // lokr fixture: r 2, decompose_both, query 384→384; intermediate.dense 384→1536 at r 24.
        let q = LokrShape::new(384, 384, 2, true, -1);
        assert_eq!((q.a, q.b, q.c, q.d, q.full_w1, q.full_w2), (16, 24, 16, 24, false, false));
        let i = LokrShape::new(384, 1536, 24, true, -1);
        assert_eq!((i.a, i.b, i.c, i.d, i.full_w1, i.full_w2), (32, 48, 16, 24, true, true));
        // PEFT's default (r 8, w1 full, w2 factored): 256 + 8·48 per query/value module.
        assert_eq!(LokrShape::new(384, 384, 8, false, -1).count(8), 640);
    }

    #[test]
    fn kron_matches_definition() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let b = Tensor::new(&[[0f32, 5., 1.]], &dev).unwrap();
        let k = kron(&a, &b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(k, vec![vec![0., 5., 1., 0., 10., 2.], vec![0., 15., 3., 0., 20., 4.]]);
    }
}
