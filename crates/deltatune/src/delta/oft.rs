//! OFT (Qiu et al., 2023; Liu et al., 2024 for the Cayley–Neumann form), reparameterization
//! family: a block-diagonal orthogonal matrix `R` rotates the input of a frozen linear,
//! `y = (x R) Wᵀ + b`, i.e. the effective weight is `W Rᵀ`. Follows PEFT 0.21
//! (`tuners/oft/layer.py`):
//!
//! - `oft_block_size` b (or `r` blocks, exactly one of the two non-zero) splits the input width
//!   into `in / b` blocks; each block is `R_i = cayley(Q_i)` of a skew-symmetric `Q_i` stored
//!   packed as PEFT stores it: `oft_R.weight` (blocks, b(b-1)/2), the strict upper triangle in
//!   row-major order (`Q[i, j] = v`, `Q[j, i] = -v` for i < j); `block_share` keeps one row for
//!   every block;
//! - `use_cayley_neumann=true` (default): `R = I + 2Q + 2Q² + … + 2Q^(t-2) + Q^(t-1)` with t =
//!   `num_cayley_neumann_terms` (PEFT's loop, which for t = 3 also adds `Q³`); `false`: the exact
//!   Cayley transform `R = (I - Q)(I + Q)⁻¹`, computed as `2 (I + Q)⁻¹ - I` by Gauss–Jordan
//!   elimination in float64 (`I + Q` has the identity as symmetric part, so it is invertible and
//!   needs no pivoting);
//! - each input row is split into blocks and block i is multiplied by `R_i` on the right;
//! - `init_weights=true`: Q = 0, R = I, a fresh OFT is the identity; false: N(0, 0.1²).
//!
//! Differences from PEFT: a block size that does not divide a module's input width is an error
//! naming both (PEFT silently picks a nearby divisor, whose value the message suggests); `coft`
//! (the constrained variant) and a trained `bias` are refused. `module_dropout` is kept in the
//! config but, as in PEFT 0.21's linear forward, has no effect. Mergeable: `W' = W Rᵀ`.

use super::method::{site_dims, BuildCtx, Family, Method};
use super::peft_fields::{PeftIn, PeftOut, PEFT_VERSION};
use super::targets::{query_value, Targets};
use crate::core::init;
use crate::core::{BackboneInfo, Delta, EngineHook, HookCtx, Site, SiteKind};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OftConfig {
    /// Number of blocks per module (0: derived from `oft_block_size`).
    pub r: usize,
    /// Size of each rotation block (0: derived from `r`). PEFT's default 32.
    pub oft_block_size: usize,
    /// Cayley–Neumann series (fast, approximately orthogonal) instead of the exact Cayley map.
    pub use_cayley_neumann: bool,
    pub num_cayley_neumann_terms: usize,
    /// One rotation shared by every block of a module.
    pub block_share: bool,
    /// Kept for PEFT config compatibility; PEFT 0.21 does not apply it in a linear's forward.
    pub module_dropout: f32,
    /// Q = 0 (the identity, PEFT's default); false: N(0, 0.1²).
    pub init_weights: bool,
    /// Constrained OFT (not supported: must be false).
    pub coft: bool,
    /// COFT's radius (only with coft; kept for config compatibility).
    pub eps: f64,
}

impl Default for OftConfig {
    fn default() -> Self {
        OftConfig {
            r: 0,
            oft_block_size: 32,
            use_cayley_neumann: true,
            num_cayley_neumann_terms: 5,
            block_share: false,
            module_dropout: 0.0,
            init_weights: true,
            coft: false,
            eps: 6e-5,
        }
    }
}

/// PEFT's `adjust_oft_parameters`: the divisor of `width` nearest to `value` (ties: the lower).
pub fn nearest_divisor(width: usize, value: usize) -> usize {
    if value >= width {
        return width;
    }
    let mut higher = value.max(1);
    while higher <= width && width % higher != 0 {
        higher += 1;
    }
    let mut lower = value.max(1);
    while lower > 1 && width % lower != 0 {
        lower -= 1;
    }
    if value - lower <= higher - value {
        lower
    } else {
        higher
    }
}

impl OftConfig {
    /// (blocks, block size) at a module of input width `inp`; `path` names it in errors.
    pub fn blocks(&self, inp: usize, path: &str) -> Result<(usize, usize)> {
        if self.oft_block_size != 0 {
            let b = self.oft_block_size;
            if b > inp || inp % b != 0 {
                return Err(Error::Delta(format!(
                    "oft: oft_block_size {b} does not divide the input width {inp} of {path} (PEFT would silently use {}; set oft_block_size to a divisor of {inp})",
                    nearest_divisor(inp, b)
                )));
            }
            Ok((inp / b, b))
        } else {
            let r = self.r;
            if r > inp || inp % r != 0 {
                return Err(Error::Delta(format!(
                    "oft: r {r} (blocks) does not divide the input width {inp} of {path} (PEFT would silently use {}; set r to a divisor of {inp})",
                    nearest_divisor(inp, r)
                )));
            }
            Ok((r, inp / r))
        }
    }
}

impl Method for OftConfig {
    const FAMILY: Family = Family::Reparameterization;
    const KEY_ALIASES: &'static [(&'static str, &'static str)] = &[("block_size", "oft_block_size"), ("terms", "num_cayley_neumann_terms")];
    const PEFT_TYPE: Option<&'static str> = Some("OFT");

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Linear]
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        // PEFT's TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING (a copy of LoRA's).
        query_value(model_type)
    }

    fn validate(&self, _info: &BackboneInfo) -> Result<()> {
        match (self.r, self.oft_block_size) {
            (0, 0) => return Err(Error::Delta("oft: one of r and oft_block_size must be non-zero (both are 0)".into())),
            (r, b) if r != 0 && b != 0 => {
                return Err(Error::Delta(format!(
                    "oft: give either r ({r}) or oft_block_size ({b}), not both (r × oft_block_size = input width); set the other to 0"
                )))
            }
            _ => {}
        }
        if self.oft_block_size == 1 {
            return Err(Error::Delta("oft: oft_block_size 1 has no rotation parameters; use at least 2".into()));
        }
        if self.use_cayley_neumann && self.num_cayley_neumann_terms < 2 {
            return Err(Error::Delta(format!(
                "oft: num_cayley_neumann_terms must be at least 2 (got {}; 1 is the identity whatever the parameters)",
                self.num_cayley_neumann_terms
            )));
        }
        if self.coft {
            return Err(Error::Delta("oft: coft=true (constrained OFT) is not supported".into()));
        }
        if !(0.0..1.0).contains(&self.module_dropout) {
            return Err(Error::Delta(format!("oft: module_dropout {} is not in [0, 1)", self.module_dropout)));
        }
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return Err(Error::Delta(format!("oft: eps must be a positive number, got {}", self.eps)));
        }
        Ok(())
    }

    fn from_peft(p: &PeftIn) -> Result<(Self, Targets)> {
        p.refuse_true("coft", "constrained OFT")?;
        p.refuse_true("fan_in_fan_out", "fan_in_fan_out (Conv1D layers)")?;
        if let Some(b) = p.str("bias").filter(|b| *b != "none") {
            return Err(p.bad(format!("bias=\"{b}\" is not supported; attach a bitfit delta alongside")));
        }
        if !p.obj.contains_key("oft_block_size") {
            return Err(p.bad("no `oft_block_size`: this is an OFT adapter from before PEFT 0.14, whose format differs; retrain it with a newer PEFT"));
        }
        let cfg = OftConfig {
            r: p.usize_or("r", 0)?,
            oft_block_size: p.usize_or("oft_block_size", 0)?,
            use_cayley_neumann: p.bool_or("use_cayley_neumann", true),
            num_cayley_neumann_terms: p.usize_or("num_cayley_neumann_terms", 5)?,
            block_share: p.bool_or("block_share", false),
            module_dropout: p.num_or("module_dropout", 0.0) as f32,
            init_weights: p.bool_or("init_weights", true),
            coft: false,
            eps: p.num_or("eps", 6e-5),
        };
        Ok((cfg, p.targets()?))
    }

    fn to_peft(&self, targets: &Targets, p: &PeftOut) -> Result<Value> {
        let (target_modules, exclude_modules) = p.target_fields(targets, &self.default_targets(p.model_type));
        Ok(json!({
            "auto_mapping": null, "base_model_name_or_path": p.base_model, "bias": "none",
            "block_share": self.block_share, "coft": self.coft, "eps": self.eps, "exclude_modules": exclude_modules,
            "fan_in_fan_out": false, "inference_mode": true, "init_weights": self.init_weights, "layers_pattern": null,
            "layers_to_transform": targets.layers_to_transform, "module_dropout": self.module_dropout as f64,
            "modules_to_save": p.modules_to_save, "num_cayley_neumann_terms": self.num_cayley_neumann_terms,
            "oft_block_size": self.oft_block_size, "peft_type": "OFT", "peft_version": PEFT_VERSION, "r": self.r,
            "revision": null, "target_modules": target_modules, "task_type": "FEATURE_EXTRACTION",
            "use_cayley_neumann": self.use_cayley_neumann
        }))
    }

    fn param_estimate(&self, inp: usize, _out: usize, _info: &BackboneInfo) -> Option<u128> {
        let b = if self.oft_block_size != 0 { self.oft_block_size } else { inp / self.r.max(1) };
        let rows = if self.block_share { 1 } else { inp / b.max(1) };
        Some(rows as u128 * (b * b.saturating_sub(1) / 2) as u128)
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (inp, _) = site_dims(site, &ctx.info)?;
        let (blocks, b) = self.blocks(inp, site.path())?;
        let rows = if self.block_share { 1 } else { blocks };
        let shape = [rows, b * (b - 1) / 2];
        let w = if self.init_weights { init::zeros(&shape, &ctx.device)? } else { ctx.stream(site.path(), "oft_R").normal(&shape, 0.0, 0.1, &ctx.device)? };
        Ok(Box::new(Oft {
            weight: Var::from_tensor(&w)?,
            blocks,
            block: b,
            scatter: skew_index(b, &ctx.device)?,
            neumann: self.use_cayley_neumann,
            terms: self.num_cayley_neumann_terms,
            base: site.param("weight").cloned(),
        }))
    }
}

/// For each of the b² entries of a block (row-major), its index into `[0, v, -v]` (the packed
/// vector `v` of length m = b(b-1)/2 with a zero in front and its negation behind).
fn skew_index(b: usize, device: &Device) -> Result<Tensor> {
    let m = b * (b - 1) / 2;
    let mut idx = vec![0u32; b * b];
    let mut k = 0u32;
    for i in 0..b {
        for j in i + 1..b {
            idx[i * b + j] = 1 + k;
            idx[j * b + i] = 1 + m as u32 + k;
            k += 1;
        }
    }
    Ok(Tensor::from_vec(idx, b * b, device)?)
}

#[derive(Debug)]
pub struct Oft {
    weight: Var, // (blocks or 1, b(b-1)/2)
    blocks: usize,
    block: usize,
    scatter: Tensor,
    neumann: bool,
    terms: usize,
    /// The site's f32 weight (shared, not copied), for the engines' form `W Rᵀ`; `None` on a
    /// quantized map (module by module there).
    base: Option<Tensor>,
}

/// `(I + A)⁻¹` for a batch `a` (n, b, b) by Gauss–Jordan elimination without pivoting, from
/// differentiable ops. Valid when every leading block of `I + A` is invertible, which holds for
/// skew-symmetric `A` (the symmetric part of `I + A` is the identity).
fn inverse_of_identity_plus(a: &Tensor) -> Result<Tensor> {
    let (n, b, _) = a.dims3()?;
    let eye = Tensor::eye(b, a.dtype(), a.device())?;
    let mut m = Tensor::cat(&[&a.broadcast_add(&eye)?, &eye.unsqueeze(0)?.broadcast_as((n, b, b))?.contiguous()?], 2)?;
    for k in 0..b {
        let row = m.narrow(1, k, 1)?; // (n, 1, 2b)
        let pivot = row.narrow(2, k, 1)?; // (n, 1, 1)
        let row = row.broadcast_div(&pivot)?;
        let mut e = vec![0f64; b];
        e[k] = 1.0;
        let e = Tensor::from_vec(e, (1, b, 1), a.device())?.to_dtype(a.dtype())?;
        let col = m.narrow(2, k, 1)?.broadcast_sub(&e)?; // (n, b, 1): row k becomes the scaled pivot row
        m = (m - col.broadcast_mul(&row)?)?;
    }
    Ok(m.narrow(2, b, b)?)
}

impl Oft {
    /// The rotation blocks (blocks, b, b), interpolated towards the identity by a search gate.
    fn rotation(&self, h: Option<&HookCtx>) -> Result<Tensor> {
        let (rows, m) = self.weight.as_tensor().dims2()?;
        let b = self.block;
        let v = self.weight.as_tensor();
        let padded = Tensor::cat(&[&Tensor::zeros((rows, 1), v.dtype(), v.device())?, v, &v.neg()?], 1)?; // (rows, 1 + 2m)
        debug_assert_eq!(padded.dim(1)?, 1 + 2 * m);
        let q = padded.index_select(&self.scatter, 1)?.reshape((rows, b, b))?;
        let eye = Tensor::eye(b, q.dtype(), q.device())?;
        let r = if self.neumann {
            // PEFT's loop: I + 2Q, + 2Q², + 2Q^k for k = 3 … t-2, then + Q^(next power).
            let mut r = eye.unsqueeze(0)?.broadcast_add(&(&q * 2.0)?)?;
            if self.terms > 2 {
                let mut power = q.matmul(&q)?;
                r = (r + (&power * 2.0)?)?;
                for _ in 3..self.terms.saturating_sub(1) {
                    power = power.matmul(&q)?;
                    r = (r + (&power * 2.0)?)?;
                }
                power = power.matmul(&q)?;
                r = (r + power)?;
            }
            r
        } else {
            // (I - Q)(I + Q)⁻¹ = 2 (I + Q)⁻¹ - I, in float64.
            let inv = inverse_of_identity_plus(&q.to_dtype(DType::F64)?)?;
            (inv * 2.0)?.broadcast_sub(&eye.to_dtype(DType::F64)?)?.to_dtype(q.dtype())?
        };
        let r = match h {
            Some(h) if h.gate.is_some() => h.gated(r.broadcast_sub(&eye)?)?.broadcast_add(&eye)?,
            _ => r,
        };
        if rows == self.blocks {
            Ok(r)
        } else {
            Ok(r.broadcast_as((self.blocks, b, b))?.contiguous()?)
        }
    }

    /// `x` (..., blocks·b) with block i of every row multiplied by `rot[i]` on the right.
    fn rotate(&self, x: &Tensor, rot: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows = x.elem_count() / (self.blocks * self.block);
        let xb = x.reshape((rows, self.blocks, self.block))?.transpose(0, 1)?.contiguous()?; // (blocks, rows, b)
        let y = xb.matmul(rot)?.transpose(0, 1)?.contiguous()?; // (rows, blocks, b)
        Ok(y.reshape(dims)?)
    }
}

impl Delta for Oft {
    fn method(&self) -> &'static str {
        "oft"
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("oft_R.weight".into(), self.weight.clone())]
    }

    fn pre(&self, x: &Tensor, h: &HookCtx) -> Result<Option<Tensor>> {
        let rot = self.rotation(Some(h))?;
        Ok(Some(self.rotate(x, &rot.to_dtype(x.dtype())?)?))
    }

    /// The block engines take the rotation folded into the weight, `x R Wᵀ = x (W Rᵀ)ᵀ`: the map's
    /// product then runs with `W Rᵀ` (blockwise, cheap) and the engine computes its gradient
    /// `dyᵀ x` as a fine-tuned weight's, which candle carries back to the rotation.
    fn engine_hook(&self, h: &HookCtx) -> Result<Option<EngineHook>> {
        let Some(w) = &self.base else { return Ok(None) };
        let rot_t = self.rotation(Some(h))?.transpose(1, 2)?.contiguous()?.to_dtype(w.dtype())?;
        Ok(Some(EngineHook::Weight(self.rotate(w, &rot_t)?)))
    }

    fn merged(&self, base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        let Some((_, w)) = base.iter().find(|(n, _)| n == "weight") else { return Ok(None) };
        // x R Wᵀ = x (W Rᵀ)ᵀ: every row of W is rotated by Rᵀ blockwise, i.e. row · Rᵀ.
        let rot_t = self.rotation(None)?.transpose(1, 2)?.contiguous()?.to_dtype(w.dtype())?;
        Ok(Some(vec![("weight".into(), self.rotate(w, &rot_t)?)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oft(b: usize, blocks: usize, neumann: bool, terms: usize, values: &[f32]) -> Oft {
        let dev = Device::Cpu;
        let m = b * (b - 1) / 2;
        let w = Tensor::from_vec(values.to_vec(), (blocks, m), &dev).unwrap();
        Oft { weight: Var::from_tensor(&w).unwrap(), blocks, block: b, scatter: skew_index(b, &dev).unwrap(), neumann, terms, base: None }
    }

    #[test]
    fn exact_cayley_is_orthogonal_and_matches_closed_form() {
        // b = 2: Q = [[0, v], [-v, 0]], (I - Q)(I + Q)⁻¹ = [[1 - v², -2v], [2v, 1 - v²]] / (1 + v²).
        let v = 0.7f64;
        let o = oft(2, 1, false, 5, &[v as f32]);
        let r = o.rotation(None).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        let d = 1.0 + v * v;
        let want = [[(1.0 - v * v) / d, -2.0 * v / d], [2.0 * v / d, (1.0 - v * v) / d]];
        for i in 0..2 {
            for j in 0..2 {
                assert!((r[i][j] as f64 - want[i][j]).abs() < 1e-6, "{r:?}");
            }
        }
        // A larger random block: R Rᵀ = I.
        let vals: Vec<f32> = (0..2 * 28).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.09).collect();
        let o = oft(8, 2, false, 5, &vals);
        let r = o.rotation(None).unwrap();
        let rrt = r.matmul(&r.transpose(1, 2).unwrap()).unwrap();
        let eye = Tensor::eye(8, DType::F32, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let d = rrt.broadcast_sub(&eye).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "R Rᵀ - I = {d}");
    }

    #[test]
    fn neumann_series_follows_peft_loop() {
        // b = 2: Q² = -v² I, Q³ = -v² Q, Q⁴ = v⁴ I. Five terms: I + 2Q + 2Q² + 2Q³ + Q⁴.
        let v = 0.3f32;
        let r = oft(2, 1, true, 5, &[v]).rotation(None).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        let diag = 1.0 - 2.0 * v * v + v.powi(4);
        let off = 2.0 * v - 2.0 * v.powi(3);
        assert!((r[0][0] - diag).abs() < 1e-6 && (r[0][1] - off).abs() < 1e-6 && (r[1][0] + off).abs() < 1e-6, "{r:?}");
        // Three terms: PEFT's loop adds 2Q, 2Q² and then Q³.
        let r = oft(2, 1, true, 3, &[v]).rotation(None).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        assert!((r[0][0] - (1.0 - 2.0 * v * v)).abs() < 1e-6 && (r[0][1] - (2.0 * v - v.powi(3))).abs() < 1e-6, "{r:?}");
    }

    #[test]
    fn nearest_divisor_is_peft_adjustment() {
        assert_eq!(nearest_divisor(384, 32), 32);
        assert_eq!(nearest_divisor(1536, 40), 32); // tie: the lower
        assert_eq!(nearest_divisor(384, 45), 48);
        assert_eq!(nearest_divisor(384, 36), 32);
        assert_eq!(nearest_divisor(10, 20), 10);
    }
}
