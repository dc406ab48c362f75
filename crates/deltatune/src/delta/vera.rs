//! VeRA (Kopiczko et al., 2024), reparameterization family: one pair of frozen random projections
//! `A` (r, in_max) and `B` (out_max, r) shared by every targeted module, and two trainable scaling
//! vectors per module, `λ_d` (r,) and `λ_b` (out,):
//!
//! `y = x Wᵀ + b + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] dropout(x))))`
//!
//! as PEFT's `tuners/vera/layer.py`: `A` and `B` are sized by the largest input and output of the
//! targeted modules and each module uses their leading columns / rows. Mergeable:
//! `W' = W + (λ_b ⊙ B[:out]) (λ_d ⊙ A[:, :in])`.
//!
//! Initialisation follows PEFT exactly: `λ_b = 0`, `λ_d = d_initial` (so a fresh VeRA is the
//! identity), and `A`, `B` drawn from torch's CPU generator seeded with `projection_prng_key`
//! (MT19937, `uniform_` of a kaiming-uniform bound with gain √2, A first, then B), reproduced here
//! bit for bit, so a fresh VeRA has PEFT's projections and adapters saved without them
//! (`save_projection: false`) load. They are saved once per group as frozen shared buffers
//! (`vera_A`, `vera_B`, PEFT's keys `base_model.vera_A`/`vera_B`) when `save_projection` is true;
//! a loaded PEFT folder uses the saved ones.

use super::method::{site_dims, BuildCtx, Family, Method};
use super::peft_fields::{PeftIn, PeftOut, PEFT_VERSION};
use super::targets::{query_value, Targets};
use crate::core::init;
use crate::core::{BackboneInfo, Delta, EngineHook, HookCtx, Site, SiteKind};
use crate::error::{Error, Result};
use crate::ops;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VeraConfig {
    /// Rank of the shared projections (PEFT default 256).
    pub r: usize,
    /// Dropout on the VeRA branch input (training only).
    pub vera_dropout: f64,
    /// Initial value of every `λ_d` entry (PEFT default 0.1).
    pub d_initial: f64,
    /// Seed of the shared projections (torch's generator, as PEFT).
    pub projection_prng_key: u64,
    /// Whether the projections are saved with the adapter (else regenerated from the key).
    pub save_projection: bool,
    /// PEFT's `init_weights`: true gives `λ_b = 0`, `λ_d = d_initial` (the identity); false keeps
    /// `λ_b = 1` and draws `λ_d` from N(0, 1) (for tests and experiments).
    pub init_weights: bool,
    /// Kept for PEFT config compatibility; must be false (BERT and Llama use Linear layers).
    pub fan_in_fan_out: bool,
}

impl Default for VeraConfig {
    fn default() -> Self {
        VeraConfig { r: 256, vera_dropout: 0.0, d_initial: 0.1, projection_prng_key: 0, save_projection: true, init_weights: true, fan_in_fan_out: false }
    }
}

impl Method for VeraConfig {
    const FAMILY: Family = Family::Reparameterization;
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[("dropout", "vera_dropout"), ("rank", "r"), ("seed", "projection_prng_key")];
    const PEFT_TYPE: Option<&'static str> = Some("VERA");

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Linear]
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        // PEFT's TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING for bert and llama.
        query_value(model_type)
    }

    fn validate(&self, _info: &BackboneInfo) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Delta("vera: r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.vera_dropout) {
            return Err(Error::Delta(format!("vera: vera_dropout {} is not in [0, 1)", self.vera_dropout)));
        }
        if !self.d_initial.is_finite() {
            return Err(Error::Delta(format!("vera: d_initial must be a finite number, got {}", self.d_initial)));
        }
        if self.fan_in_fan_out {
            return Err(Error::Delta("vera: fan_in_fan_out=true applies to Conv1D layers only; BERT uses Linear (set it to false)".into()));
        }
        Ok(())
    }

    fn param_estimate(&self, inp: usize, out: usize, _info: &BackboneInfo) -> Option<u128> {
        // λ_b and λ_d, plus (as an upper bound) the shared projections' share.
        Some(out as u128 + self.r as u128 * (1 + inp as u128 + out as u128))
    }

    fn from_peft(p: &PeftIn) -> Result<(Self, Targets)> {
        if let Some(b) = p.str("bias").filter(|b| *b != "none") {
            return Err(p.bad(format!("bias=\"{b}\" is not supported; attach a bitfit delta alongside")));
        }
        let key = match p.obj.get("projection_prng_key") {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().ok_or_else(|| p.bad(format!("`projection_prng_key` must be a non-negative integer, got {v}")))?,
        };
        let cfg = VeraConfig {
            r: p.usize("r")?,
            vera_dropout: opt_num(p, "vera_dropout", 0.0)?,
            d_initial: opt_num(p, "d_initial", 0.1)?,
            projection_prng_key: key,
            save_projection: opt_bool(p, "save_projection", true)?,
            init_weights: opt_bool(p, "init_weights", true)?,
            fan_in_fan_out: opt_bool(p, "fan_in_fan_out", false)?,
        };
        cfg.validate(&p.info).map_err(|e| p.bad(e.to_string()))?;
        Ok((cfg, p.targets()?))
    }

    fn to_peft(&self, targets: &Targets, p: &PeftOut) -> Result<Value> {
        let (target_modules, exclude_modules) = p.target_fields(targets, &self.default_targets(p.model_type));
        if !exclude_modules.is_null() {
            return Err(Error::Delta("PEFT's VeRA config has no exclude_modules; name the targets instead".into()));
        }
        Ok(json!({
            "auto_mapping": null, "base_model_name_or_path": p.base_model, "bias": "none",
            "d_initial": self.d_initial, "fan_in_fan_out": false, "inference_mode": true,
            "init_weights": self.init_weights, "layers_pattern": null, "layers_to_transform": targets.layers_to_transform,
            "modules_to_save": p.modules_to_save, "peft_type": "VERA", "peft_version": PEFT_VERSION,
            "projection_prng_key": self.projection_prng_key, "r": self.r, "revision": null,
            "save_projection": self.save_projection, "target_modules": target_modules,
            "task_type": "FEATURE_EXTRACTION", "vera_dropout": self.vera_dropout
        }))
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (inp, out) = site_dims(site, &ctx.info)?;
        let (a, b) = match (ctx.shared.get("vera_A"), ctx.shared.get("vera_B")) {
            (Some(a), Some(b)) => (a.clone(), b.clone()),
            _ => {
                // Sized by the largest targeted module, like PEFT's `_find_dim`.
                let (in_max, out_max) = ctx.group_dims.iter().fold((inp, out), |(i, o), &(x, y)| (i.max(x), o.max(y)));
                let (a, b) = projections(self.projection_prng_key, self.r, in_max, out_max, &ctx.device)?;
                let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
                ctx.shared.insert("vera_A".into(), a.clone());
                ctx.shared.insert("vera_B".into(), b.clone());
                (a, b)
            }
        };
        if a.dims()[1] < inp || b.dims()[0] < out {
            return Err(Error::Delta(format!(
                "the shared projections ({:?}, {:?}) are smaller than {} ({out} x {inp})",
                a.dims(),
                b.dims(),
                site.path()
            )));
        }
        let dev = &ctx.device;
        let (lambda_b, lambda_d) = if self.init_weights {
            (init::zeros(&[out], dev)?, Tensor::full(self.d_initial as f32, self.r, dev)?)
        } else {
            (init::ones(&[out], dev)?, ctx.stream(site.path(), "vera_lambda_d").normal(&[self.r], 0.0, 1.0, dev)?)
        };
        Ok(Box::new(Vera {
            a,
            b,
            lambda_b: Var::from_tensor(&lambda_b)?,
            lambda_d: Var::from_tensor(&lambda_d)?,
            inp,
            out,
            dropout: self.vera_dropout as f32,
            save_projection: self.save_projection,
        }))
    }
}

/// An optional number of the PEFT config; another type is an error naming the field.
fn opt_num(p: &PeftIn, key: &str, default: f64) -> Result<f64> {
    match p.obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| p.bad(format!("`{key}` must be a number, got {v}"))),
    }
}

/// An optional boolean of the PEFT config; another type is an error naming the field.
fn opt_bool(p: &PeftIn, key: &str, default: bool) -> Result<bool> {
    match p.obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_bool().ok_or_else(|| p.bad(format!("`{key}` must be true or false, got {v}"))),
    }
}

/// PEFT's `_init_vera_A_vera_B`: `A` (r, in_max) then `B` (out_max, r), each
/// `uniform_(-bound, bound)` with `bound = √3 · √2 / √fan_in`, from one torch generator seeded
/// with `key`.
pub fn projections(key: u64, r: usize, in_max: usize, out_max: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let mut g = TorchGenerator::new(key);
    let a = g.kaiming_uniform(r, in_max);
    let b = g.kaiming_uniform(out_max, r);
    Ok((Tensor::from_vec(a, (r, in_max), dev)?, Tensor::from_vec(b, (out_max, r), dev)?))
}

/// torch's CPU generator (`torch.Generator().manual_seed(key)`): MT19937 seeded with the key's low
/// 32 bits, and its float32 `uniform_`, which takes 24 bits of one draw per value.
struct TorchGenerator {
    state: [u32; 624],
    next: usize,
}

impl TorchGenerator {
    fn new(key: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = key as u32;
        for i in 1..624 {
            state[i] = 1_812_433_253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        TorchGenerator { state, next: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= 624 {
            for k in 0..624 {
                let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % 624] & 0x7fff_ffff);
                let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
                self.state[k] = self.state[(k + 397) % 624] ^ (y >> 1) ^ mag;
            }
            self.next = 0;
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `torch.empty(rows, cols).uniform_(-bound, bound)` with PEFT's kaiming bound (fan_in = cols).
    fn kaiming_uniform(&mut self, rows: usize, cols: usize) -> Vec<f32> {
        let bound = 3f64.sqrt() * (2f64.sqrt() / (cols as f64).sqrt());
        let (lo, hi) = (-bound as f32, bound as f32);
        let range = hi - lo;
        // torch computes `x * (hi - lo) + lo` with a fused multiply-add.
        (0..rows * cols).map(|_| ((self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)).mul_add(range, lo)).collect()
    }
}

#[derive(Debug)]
pub struct Vera {
    /// The shared frozen projections, (r, in_max) and (out_max, r).
    a: Var,
    b: Var,
    lambda_b: Var, // (out,)
    lambda_d: Var, // (r,)
    inp: usize,
    out: usize,
    dropout: f32,
    save_projection: bool,
}

impl Vera {
    /// This module's slices of the projections, outside the graph.
    fn slices(&self) -> Result<(Tensor, Tensor)> {
        let a = self.a.as_tensor().detach().narrow(1, 0, self.inp)?.contiguous()?;
        let b = self.b.as_tensor().detach().narrow(0, 0, self.out)?.contiguous()?;
        Ok((a, b))
    }
}

impl Delta for Vera {
    fn method(&self) -> &'static str {
        "vera"
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("vera_lambda_b".into(), self.lambda_b.clone()), ("vera_lambda_d".into(), self.lambda_d.clone())]
    }

    fn shared_buffers(&self) -> Vec<(String, Var)> {
        if self.save_projection {
            vec![("vera_A".into(), self.a.clone()), ("vera_B".into(), self.b.clone())]
        } else {
            Vec::new()
        }
    }

    fn post(&self, x: &Tensor, y: &Tensor, h: &HookCtx) -> Result<Option<Tensor>> {
        let x = if h.train && self.dropout > 0.0 { ops::dropout(x, self.dropout, h.key)? } else { x.clone() };
        let (a, b) = self.slices()?;
        let d = ops::linear(&x, &a, None)?.broadcast_mul(self.lambda_d.as_tensor())?;
        let d = ops::linear(&d, &b, None)?.broadcast_mul(self.lambda_b.as_tensor())?;
        Ok(Some(y.add(&h.gated(d)?)?))
    }

    /// For a block engine: the update is `(x (Λd A)ᵀ) (Λb B)ᵀ`, a low-rank one whose factors
    /// carry the gradient to λd and λb (the projections stay frozen); with dropout in training, on
    /// the dropped input.
    fn engine_hook(&self, h: &HookCtx) -> Result<Option<EngineHook>> {
        if h.inference {
            return Ok(None);
        }
        let drop = (h.train && self.dropout > 0.0).then_some((self.dropout, h.key));
        let (a, b) = self.slices()?;
        let a = a.broadcast_mul(&self.lambda_d.as_tensor().unsqueeze(1)?)?;
        let b = h.gated(b.broadcast_mul(&self.lambda_b.as_tensor().unsqueeze(1)?)?)?;
        Ok(Some(EngineHook::LowRank(a, b, drop)))
    }

    fn merged(&self, base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        let Some((_, w)) = base.iter().find(|(n, _)| n == "weight") else { return Ok(None) };
        let (a, b) = self.slices()?;
        let b = b.broadcast_mul(&self.lambda_b.as_tensor().unsqueeze(1)?)?;
        let a = a.broadcast_mul(&self.lambda_d.as_tensor().unsqueeze(1)?)?;
        Ok(Some(vec![("weight".into(), w.add(&b.matmul(&a)?)?.detach())]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_generator_matches_the_reference_stream() {
        // First outputs of MT19937 seeded with 5489 (the reference implementation's default).
        let mut g = TorchGenerator::new(5489);
        let first: Vec<u32> = (0..3).map(|_| g.next_u32()).collect();
        assert_eq!(first, vec![3_499_211_612, 581_869_302, 3_890_346_734]);
    }
}
