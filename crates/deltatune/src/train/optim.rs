//! Optimisation: AdamW with decoupled weight decay (PyTorch's `torch.optim.AdamW` update), learning
//! rate schedules with linear warm-up (transformers' `get_linear_schedule_with_warmup` /
//! `get_cosine_schedule_with_warmup`), gradient clipping by global norm (`clip_grad_norm_`), and
//! gradient accumulation. State exists only for trainable tensors; the frozen backbone has none.

use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which parameters get weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DecayRule {
    /// Every tensor except biases and layer-norm weights (the usual BERT recipe).
    #[default]
    NotBiasOrNorm,
    /// Every tensor (plain `AdamW(model.parameters())`, as the PEFT baseline does).
    All,
}

impl DecayRule {
    pub fn decays(self, name: &str) -> bool {
        match self {
            DecayRule::All => true,
            DecayRule::NotBiasOrNorm => !(name.ends_with("bias") || name.contains("LayerNorm")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decay_rule: DecayRule,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, decay_rule: DecayRule::NotBiasOrNorm }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    moments: Moments,
}

/// A parameter's first and second moments: plain buffers updated in place together with the
/// parameter in one pass (a contiguous f32 parameter on the CPU), or tensors updated by candle ops
/// (elsewhere; also the reference the one-pass update is tested against).
enum Moments {
    Host { m: Vec<f32>, v: Vec<f32> },
    Tensors { m: Tensor, v: Tensor },
}

impl Moments {
    fn new(var: &Var, host: bool) -> Result<Self> {
        let t = var.as_tensor();
        if host && matches!(t.device(), candle_core::Device::Cpu) && t.dtype() == candle_core::DType::F32 && t.is_contiguous() {
            let n = t.elem_count();
            return Ok(Moments::Host { m: vec![0.0; n], v: vec![0.0; n] });
        }
        let zeros = t.zeros_like()?;
        Ok(Moments::Tensors { m: zeros.clone(), v: zeros })
    }

    fn tensors(&self, shape: &[usize]) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Host { m, v } => {
                let dev = candle_core::Device::Cpu;
                (Tensor::from_slice(m, shape, &dev)?, Tensor::from_slice(v, shape, &dev)?)
            }
            Moments::Tensors { m, v } => (m.clone(), v.clone()),
        })
    }

    fn set(&mut self, which: &str, t: &Tensor) -> Result<()> {
        match self {
            Moments::Host { m, v } => {
                let data = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                *(if which == "m" { m } else { v }) = data;
            }
            Moments::Tensors { m, v } => *(if which == "m" { m } else { v }) = t.clone(),
        }
        Ok(())
    }
}

/// The scalars of one AdamW update, as f32 the way candle's scalar ops apply them.
#[derive(Clone, Copy)]
struct Coefs {
    /// `1 − lr · wd` when the parameter decays.
    decay: Option<f32>,
    b1: f32,
    one_m_b1: f32,
    b2: f32,
    one_m_b2: f32,
    /// 1 / sqrt(1 − β2^t).
    inv_bc2: f32,
    eps: f32,
    /// lr / (1 − β1^t).
    step: f32,
}

/// One parameter's AdamW update in place (the parameter is the op's destination, the gradient its
/// source, the moments held here): one parallel pass reading p, g, m, v and writing p, m, v —
/// where candle's ops make a dozen passes, each into a fresh buffer. Every number is the one those
/// ops give (the same f32 operations in the same order, no fused multiply-add).
struct OnePass<'a> {
    m: std::cell::RefCell<&'a mut [f32]>,
    v: std::cell::RefCell<&'a mut [f32]>,
    k: Coefs,
}

impl candle_core::InplaceOp2 for OnePass<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let bad = |what: &str| candle_core::Error::Msg(format!("adamw: {what}"));
        let candle_core::CpuStorage::F32(p) = s1 else { return Err(bad("parameter is not f32")) };
        let candle_core::CpuStorage::F32(g) = s2 else { return Err(bad("gradient is not f32")) };
        let ((p0, p1), (g0, g1)) = match (l1.contiguous_offsets(), l2.contiguous_offsets()) {
            (Some(a), Some(b)) => (a, b),
            _ => return Err(bad("non-contiguous parameter or gradient")),
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
            return Err(bad("gradient or moments differ in size from the parameter"));
        }
        let k = self.k;
        const CHUNK: usize = 1 << 14;
        p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(m.par_chunks_mut(CHUNK)).zip(v.par_chunks_mut(CHUNK)).for_each(
            |(((p, g), m), v)| {
                for i in 0..p.len() {
                    let gi = g[i];
                    let pi = match k.decay {
                        Some(d) => p[i] * d,
                        None => p[i],
                    };
                    let mi = m[i] * k.b1 + gi * k.one_m_b1;
                    let vi = v[i] * k.b2 + (gi * gi) * k.one_m_b2;
                    let denom = vi.sqrt() * k.inv_bc2 + k.eps;
                    p[i] = pi - (mi / denom) * k.step;
                    m[i] = mi;
                    v[i] = vi;
                }
            },
        );
        Ok(())
    }
}

/// AdamW over a fixed list of named variables.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        Self::with_moments(params, cfg, true)
    }

    /// `host`: the one-pass update where it applies (otherwise candle ops everywhere).
    fn with_moments(params: Vec<(String, Var)>, cfg: AdamWConfig, host: bool) -> Result<Self> {
        let mut seen = std::collections::BTreeSet::new();
        let mut slots = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                return Err(Error::Delta(format!("optimizer: parameter `{name}` listed twice")));
            }
            let moments = Moments::new(&var, host)?;
            slots.push(Slot { decay: cfg.decay_rule.decays(&name), name, moments, var });
        }
        Ok(AdamW { cfg, slots, step: 0 })
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Number of scalars with optimizer state (2 moments each).
    pub fn num_params(&self) -> usize {
        self.slots.iter().map(|s| s.var.elem_count()).sum()
    }

    /// One update with learning rate `lr` from `grads` (missing gradients count as zero).
    pub fn step(&mut self, grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let decays = self.cfg.weight_decay != 0.0;
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.name) else { continue };
            match &mut s.moments {
                Moments::Host { m, v } => {
                    let k = Coefs {
                        decay: (s.decay && decays).then_some((1.0 - lr * self.cfg.weight_decay) as f32),
                        b1: b1 as f32,
                        one_m_b1: (1.0 - b1) as f32,
                        b2: b2 as f32,
                        one_m_b2: (1.0 - b2) as f32,
                        inv_bc2: (1.0 / bc2_sqrt) as f32,
                        eps: self.cfg.eps as f32,
                        step: (lr / bc1) as f32,
                    };
                    let g = g.to_dtype(candle_core::DType::F32)?.contiguous()?;
                    if g.dims() != s.var.dims() {
                        return Err(Error::Delta(format!("optimizer: gradient of `{}` is {:?}, the parameter {:?}", s.name, g.dims(), s.var.dims())));
                    }
                    let op = OnePass { m: std::cell::RefCell::new(m), v: std::cell::RefCell::new(v), k };
                    s.var.as_tensor().inplace_op2(&g, &op)?;
                }
                Moments::Tensors { m, v } => {
                    let mut p = s.var.as_tensor().clone();
                    if s.decay && decays {
                        p = (p * (1.0 - lr * self.cfg.weight_decay))?;
                    }
                    *m = ((&*m * b1)? + (g * (1.0 - b1))?)?;
                    *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    // PyTorch: denom = sqrt(v) / sqrt(bc2) + eps; p -= lr / bc1 * m / denom.
                    let denom = ((v.sqrt()? / bc2_sqrt)? + self.cfg.eps)?;
                    let update = (m.div(&denom)? * (lr / bc1))?;
                    s.var.set(&p.sub(&update)?)?;
                }
            }
        }
        Ok(())
    }

    /// Moments and step for checkpoints: `m.<name>`, `v.<name>`.
    pub fn state(&self) -> (BTreeMap<String, Tensor>, u64) {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            // A host buffer always converts (its length is the parameter's).
            if let Ok((m, v)) = s.moments.tensors(s.var.dims()) {
                out.insert(format!("m.{}", s.name), m);
                out.insert(format!("v.{}", s.name), v);
            }
        }
        (out, self.step)
    }

    /// Restores [`AdamW::state`]; every moment must be present with the right shape.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, step: u64, origin: &str) -> Result<()> {
        for s in &mut self.slots {
            for which in ["m", "v"] {
                let key = format!("{which}.{}", s.name);
                let t = state.get(&key).ok_or_else(|| Error::MissingTensor { file: origin.into(), key: key.clone() })?;
                if t.dims() != s.var.dims() {
                    return Err(Error::ShapeMismatch { file: origin.into(), key, expected: s.var.dims().to_vec(), got: t.dims().to_vec() });
                }
                s.moments.set(which, t)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Learning-rate shape after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    #[default]
    Linear,
    Cosine,
    Constant,
}

impl std::str::FromStr for Decay {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Decay::Linear),
            "cosine" => Ok(Decay::Cosine),
            "constant" => Ok(Decay::Constant),
            other => Err(Error::arg("--schedule", format!("`{other}` (linear, cosine, constant)"))),
        }
    }
}

/// The learning rate of optimizer step `step` (0-based) out of `total`, with `warmup` warm-up
/// steps — transformers' schedules, which give step 0 a learning rate of 0 when warming up.
pub fn lr_at(base: f64, step: usize, total: usize, warmup: usize, decay: Decay) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    match decay {
        Decay::Constant => base,
        Decay::Linear => base * (1.0 - progress).max(0.0),
        Decay::Cosine => base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

/// Sums gradients of named variables over micro-batches.
#[derive(Default)]
pub struct GradAccumulator {
    sums: BTreeMap<String, Tensor>,
}

impl GradAccumulator {
    /// Adds the gradients of `params` found in `grads`.
    pub fn add(&mut self, params: &[(String, Var)], grads: &GradStore) -> Result<()> {
        for (name, var) in params {
            if let Some(g) = grads.get(var) {
                let g = g.detach();
                let entry = match self.sums.remove(name) {
                    Some(acc) => acc.add(&g)?,
                    None => g,
                };
                self.sums.insert(name.clone(), entry);
            }
        }
        Ok(())
    }

    /// The accumulated gradients, scaled by `scale`.
    pub fn take(&mut self, scale: f64) -> Result<BTreeMap<String, Tensor>> {
        let sums = std::mem::take(&mut self.sums);
        if scale == 1.0 {
            return Ok(sums);
        }
        sums.into_iter().map(|(k, g)| Ok((k, (g * scale)?))).collect()
    }
}

/// Global L2 norm of all gradients.
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sq.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (PyTorch's `clip_grad_norm_`,
/// which multiplies by `max_norm / (norm + 1e-6)` when the norm exceeds `max_norm`). Returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_match_transformers() {
        // get_linear_schedule_with_warmup(warmup=15, total=250) at lr 5e-4.
        assert_eq!(lr_at(5e-4, 0, 250, 15, Decay::Linear), 0.0);
        assert!((lr_at(5e-4, 5, 250, 15, Decay::Linear) - 5e-4 / 3.0).abs() < 1e-15);
        assert_eq!(lr_at(5e-4, 15, 250, 15, Decay::Linear), 5e-4);
        assert!((lr_at(5e-4, 249, 250, 15, Decay::Linear) - 5e-4 / 235.0).abs() < 1e-15);
        assert_eq!(lr_at(1.0, 10, 10, 0, Decay::Linear), 0.0);
        assert!((lr_at(1.0, 5, 10, 0, Decay::Cosine) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(2.0, 7, 10, 2, Decay::Constant), 2.0);
    }

    #[test]
    fn adamw_matches_hand_computation() {
        // One scalar, lr 0.1, wd 0.5, grad 2 at p = 1:
        // p = 1 * (1 - 0.05) = 0.95; m = 0.2; v = 0.004; m̂ = 2, v̂ = 4; p -= 0.1 * 2 / (2 + 1e-8).
        let v = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let cfg = AdamWConfig { weight_decay: 0.5, ..Default::default() };
        let mut opt = AdamW::new(vec![("w".into(), v.clone())], cfg).unwrap();
        let g: BTreeMap<String, Tensor> = [("w".to_string(), Tensor::new(&[2.0f32], &Device::Cpu).unwrap())].into();
        opt.step(&g, 0.1).unwrap();
        let p = v.to_vec1::<f32>().unwrap()[0];
        assert!((p - (0.95 - 0.1)).abs() < 1e-6, "{p}");
        assert!(DecayRule::NotBiasOrNorm.decays("lora.x.lora_A.weight"));
        assert!(!DecayRule::NotBiasOrNorm.decays("head.bias"));
        assert!(!DecayRule::NotBiasOrNorm.decays("full.encoder.layer.0.output.LayerNorm.weight"));
    }

    /// The one-pass update gives candle's ops' numbers to the bit, with and without decay, over
    /// several steps; its state round-trips through `state` / `load_state`.
    #[test]
    fn one_pass_update_is_the_tensor_update() {
        let n = 40_000; // more than one parallel chunk
        let init: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let params = |tag: &str| -> Vec<(String, Var)> {
            vec![
                (format!("{tag}.weight"), Var::from_vec(init.clone(), (200, n / 200), &Device::Cpu).unwrap()),
                (format!("{tag}.bias"), Var::from_vec(init[..300].to_vec(), 300, &Device::Cpu).unwrap()),
            ]
        };
        let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let (pa, pb) = (params("x"), params("x"));
        let mut a = AdamW::with_moments(pa.clone(), cfg.clone(), true).unwrap();
        let mut b = AdamW::with_moments(pb.clone(), cfg, false).unwrap();
        assert!(matches!(a.slots[0].moments, Moments::Host { .. }));
        assert!(matches!(b.slots[0].moments, Moments::Tensors { .. }));
        for step in 0..4 {
            let grads: BTreeMap<String, Tensor> = pa
                .iter()
                .map(|(name, v)| {
                    let g: Vec<f32> = (0..v.elem_count()).map(|i| (((i + step * 31) * 104_729 % 2001) as f32 - 1000.0) * 1e-3).collect();
                    (name.clone(), Tensor::from_vec(g, v.dims(), &Device::Cpu).unwrap())
                })
                .collect();
            a.step(&grads, 1e-3).unwrap();
            b.step(&grads, 1e-3).unwrap();
            for ((_, va), (name, vb)) in pa.iter().zip(&pb) {
                let (x, y) = (va.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vb.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                assert!(x == y, "{name} differs after step {step}");
            }
        }
        let (sa, sb) = (a.state().0, b.state().0);
        for (k, t) in &sb {
            assert_eq!(sa[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(), t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{k}");
        }
        let mut c = AdamW::with_moments(params("x"), AdamWConfig::default(), true).unwrap();
        c.load_state(&sa, 4, "test").unwrap();
        assert_eq!(c.state().0["m.x.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap(), sa["m.x.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn clipping() {
        let mut g: BTreeMap<String, Tensor> = [("a".to_string(), Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap())].into();
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let after = global_norm(&g).unwrap();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }
}
