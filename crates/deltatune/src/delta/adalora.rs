//! AdaLoRA (Zhang et al., 2023), reparameterization family: LoRA in SVD form,
//! `y = x W^T + b + s · dropout(x) (A ⊙ E)^T B^T` with right singular vectors `lora_A` (r, in),
//! singular values `lora_E` (r, 1), left singular vectors `lora_B` (out, r) and, as PEFT computes
//! it (`tuners/adalora/layer.py`, `SVDLinear`), `s = lora_alpha / (ranknum + 1e-5)` where
//! `ranknum` is the module's initial rank `init_r` and never changes — not even after pruning, nor
//! for a PEFT folder reloaded with its ranks trimmed (`lora_alpha` 0 means `init_r`). Init as PEFT:
//! E = 0, A and B ~ N(0, 0.02), so a fresh AdaLoRA leaves the model unchanged. Mergeable:
//! `W' = W + s · B (A ⊙ E)`.
//!
//! During training the group's [`Allocator`] (a [`GroupTrainer`]) adds PEFT's orthogonality
//! penalty `orth_reg_weight · mean over A and B of ‖P Pᵀ − I‖_F` (A Aᵀ, Bᵀ B) to the loss and,
//! after every optimizer step, runs PEFT's `RankAllocator.update_and_allocate` (0-based step
//! `t` = our 1-based step − 1):
//! - while `t < total_step − tfinal`: sensitivity `I = |p · ∇p|` of every A, E, B entry, smoothed
//!   `Ī ← β1 Ī + (1 − β1) I`, uncertainty `Ū ← β2 Ū + (1 − β2) |I − Ī|`;
//! - budget schedule: `t ≤ tinit`: every rank (`init_bgt` = Σ init ranks), no masking;
//!   `t > total_step − tfinal`: `target_bgt = target_r × modules`, masking; in between the cubic
//!   `int((init_bgt − target_bgt)(1 − (t − tinit)/(total_step − tfinal − tinit))³ + target_bgt)`,
//!   masking when `t % deltaT == 0`;
//! - masking: the score of rank i of a module is `Ī·Ū` of `E_i` plus the mean over the row `A_i`
//!   plus the mean over the column `B_{:,i}`; the threshold is the `(init_bgt − budget)`-th
//!   smallest score over all modules, and every `E_i` with a score ≤ threshold is set to 0 (masked
//!   ranks keep training and may come back at the next masking, as in PEFT);
//! - at `t = total_step − tfinal` a final masking to `target_bgt`, and the EMA state is dropped;
//!   after it, every step re-applies that final pattern.
//!
//! The current pattern lives in each site's `rank_mask` buffer (1 kept, 0 pruned; all ones before
//! the first masking) and is saved with the delta; our tensors keep all `init_r` ranks. A PEFT
//! export writes `rank_pattern` (`"<module>.lora_E"` → `init_r` booleans, or null when nothing was
//! ever pruned) and trims `lora_A`, `lora_E`, `lora_B` to the kept ranks, as PEFT's
//! `save_pretrained` does; import expands a trimmed folder back (zeros at the pruned ranks).
//! One deviation: at the run's last step the final pattern is re-applied even when that step is
//! not a masking step, so the saved delta computes exactly what its PEFT export computes.

use super::method::{site_dims, BuildCtx, Family, Method};
use super::peft_fields::{PeftIn, PeftOut, PEFT_VERSION};
use super::targets::{query_value, Targets};
use crate::core::init;
use crate::core::{BackboneInfo, Delta, EngineHook, GroupTensors, GroupTrainer, HookCtx, Site, SiteKind};
use crate::error::{Error, Result};
use crate::ops;
use candle_core::{DType, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The buffer holding a site's current rank pattern.
pub const RANK_MASK: &str = "rank_mask";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdaLoraConfig {
    /// Rank every module starts with (PEFT default 12).
    pub init_r: usize,
    /// Average rank per module after allocation: the final budget is `target_r × modules` (8).
    pub target_r: usize,
    /// Scale numerator (8); the divisor is `init_r + 1e-5`.
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Steps of warm-up before any pruning (0).
    pub tinit: usize,
    /// Steps at the end with the final pattern fixed (0).
    pub tfinal: usize,
    /// Masking interval in the budgeting phase (1).
    #[serde(rename = "deltaT", alias = "delta_t")]
    pub delta_t: usize,
    /// EMA factor of the sensitivity (0.85).
    pub beta1: f64,
    /// EMA factor of the uncertainty (0.85).
    pub beta2: f64,
    /// Weight of the orthogonality penalty (0.5; must be positive, as PEFT requires).
    pub orth_reg_weight: f64,
    /// Length of the schedule in optimizer steps; `deltatune train` fills it in from the run
    /// (epochs × steps per epoch, or `--max-steps`) when not given.
    pub total_step: Option<usize>,
    /// PEFT's saved pattern (`"<module>.lora_E"` → `init_r` booleans), read from an imported
    /// folder; the sites start with it as their `rank_mask`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rank_pattern: BTreeMap<String, Vec<bool>>,
}

impl Default for AdaLoraConfig {
    fn default() -> Self {
        AdaLoraConfig {
            init_r: 12,
            target_r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: None,
            rank_pattern: BTreeMap::new(),
        }
    }
}

fn bad(msg: impl std::fmt::Display) -> Error {
    Error::Delta(format!("adalora: {msg}"))
}

impl AdaLoraConfig {
    /// PEFT's `scaling / ranknum`.
    pub fn scale(&self) -> f64 {
        let r = self.init_r as f64;
        (if self.lora_alpha > 0.0 { self.lora_alpha } else { r }) / (r + 1e-5)
    }

    /// The schedule's length: `total_step`, else the run's `run_total`.
    fn schedule_len(&self, run_total: usize) -> usize {
        self.total_step.unwrap_or(run_total)
    }

    /// PEFT's refusal of a schedule without a budgeting phase.
    fn check_schedule(&self, total: usize) -> Result<()> {
        if total == 0 {
            return Err(bad("total_step must be at least 1 (PEFT refuses a schedule without steps)"));
        }
        if self.tinit + self.tfinal >= total {
            return Err(bad(format!(
                "tinit ({}) + tfinal ({}) must be below total_step ({total}): the schedule leaves no budgeting phase (decrease tinit/tfinal or train longer)",
                self.tinit, self.tfinal
            )));
        }
        Ok(())
    }

    /// The site's pattern from [`AdaLoraConfig::rank_pattern`], if it has one.
    fn pattern_of(&self, site: &str) -> Option<&Vec<bool>> {
        self.rank_pattern.get(&format!("{site}.lora_E"))
    }

    /// The rank allocator of a group (also what [`Method::group_trainer`] returns).
    pub fn allocator(&self, tensors: GroupTensors) -> Result<Allocator> {
        Allocator::new(self.clone(), tensors)
    }
}

impl Method for AdaLoraConfig {
    const FAMILY: Family = Family::Reparameterization;
    const KEY_ALIASES: &'static [(&'static str, &'static str)] =
        &[("alpha", "lora_alpha"), ("dropout", "lora_dropout"), ("delta_t", "deltaT"), ("orth", "orth_reg_weight")];
    const PEFT_TYPE: Option<&'static str> = Some("ADALORA");

    fn kinds(&self) -> &'static [SiteKind] {
        &[SiteKind::Linear]
    }

    fn default_targets(&self, model_type: &str) -> Targets {
        // PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING for bert and llama.
        query_value(model_type)
    }

    fn validate(&self, _info: &BackboneInfo) -> Result<()> {
        if self.init_r == 0 {
            return Err(bad("init_r must be at least 1"));
        }
        if self.target_r == 0 || self.target_r > self.init_r {
            return Err(bad(format!("target_r must be between 1 and init_r ({}), got {}", self.init_r, self.target_r)));
        }
        if self.delta_t == 0 {
            return Err(bad("deltaT must be at least 1"));
        }
        for (k, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(v > 0.0 && v < 1.0) {
                return Err(bad(format!("{k} must be in (0, 1), got {v}")));
            }
        }
        if !(self.orth_reg_weight.is_finite() && self.orth_reg_weight > 0.0) {
            return Err(bad(format!("orth_reg_weight must be greater than 0 (PEFT refuses otherwise), got {}", self.orth_reg_weight)));
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha >= 0.0) {
            return Err(bad(format!("lora_alpha must be a non-negative number, got {}", self.lora_alpha)));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(bad(format!("lora_dropout {} is not in [0, 1)", self.lora_dropout)));
        }
        if let Some(t) = self.total_step {
            self.check_schedule(t)?;
        }
        for (k, p) in &self.rank_pattern {
            if !k.ends_with(".lora_E") {
                return Err(bad(format!("rank_pattern key `{k}` does not name a module's lora_E")));
            }
            if p.len() != self.init_r {
                return Err(bad(format!("rank_pattern `{k}` has {} entries, init_r is {}", p.len(), self.init_r)));
            }
        }
        Ok(())
    }

    fn set_run_length(&mut self, total_steps: usize) -> Result<()> {
        let total = self.total_step.unwrap_or(total_steps);
        self.check_schedule(total)?;
        self.total_step = Some(total);
        Ok(())
    }

    fn from_peft(p: &PeftIn) -> Result<(Self, Targets)> {
        p.refuse_true("use_dora", "DoRA")?;
        p.refuse_true("lora_bias", "a LoRA bias")?;
        p.refuse_true("use_rslora", "rsLoRA scaling (AdaLoRA ignores it)")?;
        p.refuse_pattern("alpha_pattern")?;
        if p.obj.get("loftq_config").and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(p.bad("`loftq_config` (LoftQ) is not supported"));
        }
        if let Some(b) = p.str("bias").filter(|b| *b != "none") {
            return Err(p.bad(format!("bias=\"{b}\" is not supported; attach a bitfit delta alongside")));
        }
        let d = AdaLoraConfig::default();
        let mut rank_pattern = BTreeMap::new();
        match p.obj.get("rank_pattern") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let bits = v.as_array().and_then(|a| a.iter().map(Value::as_bool).collect::<Option<Vec<bool>>>());
                    let bits = bits.ok_or_else(|| p.bad(format!("rank_pattern `{k}` must be a list of booleans")))?;
                    // The allocator names a task model's modules with its base prefix (`bert.`).
                    let k = ["bert.", "roberta."].iter().find_map(|pre| k.strip_prefix(pre)).unwrap_or(k);
                    rank_pattern.insert(k.to_string(), bits);
                }
            }
            Some(other) => return Err(p.bad(format!("rank_pattern must be an object, got {other}"))),
        }
        let total_step = match p.obj.get("total_step") {
            None | Some(Value::Null) => return Err(p.bad("`total_step` is missing (PEFT refuses an AdaLoRA config without it)")),
            Some(_) => p.usize("total_step")?,
        };
        let cfg = AdaLoraConfig {
            init_r: p.usize_or("init_r", d.init_r)?,
            target_r: p.usize_or("target_r", d.target_r)?,
            lora_alpha: p.num_or("lora_alpha", d.lora_alpha),
            lora_dropout: p.num_or("lora_dropout", 0.0),
            tinit: p.usize_or("tinit", 0)?,
            tfinal: p.usize_or("tfinal", 0)?,
            delta_t: p.usize_or("deltaT", 1)?,
            beta1: p.num_or("beta1", d.beta1),
            beta2: p.num_or("beta2", d.beta2),
            orth_reg_weight: p.num_or("orth_reg_weight", d.orth_reg_weight),
            total_step: Some(total_step),
            rank_pattern,
        };
        cfg.validate(&p.info).map_err(|e| p.bad(e.to_string()))?;
        Ok((cfg, p.targets()?))
    }

    fn to_peft(&self, targets: &Targets, p: &PeftOut) -> Result<Value> {
        if self.lora_alpha.fract() != 0.0 {
            return Err(bad("PEFT stores lora_alpha as an integer in practice; export needs an integer alpha"));
        }
        let total_step = self.total_step.ok_or_else(|| bad("export needs total_step (PEFT refuses an AdaLoRA config without it)"))?;
        let (target_modules, exclude_modules) = p.target_fields(targets, &self.default_targets(p.model_type));
        let rank_pattern = if self.rank_pattern.is_empty() { Value::Null } else { json!(self.rank_pattern) };
        let mut v = json!({
            "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null, "auto_mapping": null,
            "base_model_name_or_path": p.base_model, "beta1": self.beta1, "beta2": self.beta2, "bias": "none",
            "corda_config": null, "deltaT": self.delta_t, "ensure_weight_tying": false, "eva_config": null,
            "exclude_modules": exclude_modules, "fan_in_fan_out": false, "inference_mode": true,
            "init_lora_weights": true, "init_r": self.init_r, "kasa_config": null, "layer_replication": null,
            "layers_pattern": null, "layers_to_transform": targets.layers_to_transform, "loftq_config": {},
        });
        let rest = json!({
            "lora_alpha": self.lora_alpha as i64, "lora_bias": false, "lora_dropout": self.lora_dropout, "lora_ga_config": null,
            "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": p.modules_to_save,
            "monteclora_config": null, "orth_reg_weight": self.orth_reg_weight, "peft_type": "ADALORA",
            "peft_version": PEFT_VERSION, "qalora_group_size": 16, "r": 8, "rank_pattern": rank_pattern,
            "revision": null, "target_modules": target_modules, "target_parameters": null, "target_r": self.target_r,
            "task_type": "FEATURE_EXTRACTION", "tfinal": self.tfinal, "tinit": self.tinit, "total_step": total_step,
            "trainable_token_indices": null, "use_bdlora": null, "use_dora": false, "use_qalora": false,
            "use_rslora": false, "velora_config": null
        });
        // Two literals: one would exceed json!'s macro recursion limit.
        if let (Some(a), Value::Object(b)) = (v.as_object_mut(), rest) {
            a.extend(b);
        }
        Ok(v)
    }

    fn peft_shape(&self, site: &str, param: &str, dims: &[usize]) -> Option<Vec<usize>> {
        let kept = self.pattern_of(site).map(|p| p.iter().filter(|b| **b).count());
        match (param, kept) {
            (RANK_MASK, _) => None,
            ("lora_A" | "lora_E", Some(k)) => Some([&[k], &dims[1..]].concat()),
            ("lora_B", Some(k)) => Some(vec![dims[0], k]),
            _ => Some(dims.to_vec()),
        }
    }

    fn from_peft_tensor(&self, site: &str, param: &str, t: Tensor) -> Result<Tensor> {
        let Some(pattern) = self.pattern_of(site) else { return Ok(t) };
        let axis = if param == "lora_B" { 1 } else { 0 };
        expand(&t, pattern, axis)
    }

    fn to_peft_tensors(&self, tensors: &mut Vec<(String, String, Tensor)>, config: &mut Value) -> Result<()> {
        let masks: BTreeMap<String, Vec<bool>> = tensors
            .iter()
            .filter(|(_, p, _)| p == RANK_MASK)
            .map(|(s, _, t)| Ok((s.clone(), mask_bits(t)?)))
            .collect::<Result<_>>()?;
        tensors.retain(|(_, p, _)| p != RANK_MASK);
        if masks.values().all(|m| m.iter().all(|b| *b)) {
            // Never pruned: PEFT writes no pattern and full tensors.
            config["rank_pattern"] = Value::Null;
            return Ok(());
        }
        for (site, param, t) in tensors.iter_mut() {
            let Some(bits) = masks.get(site.as_str()) else { continue };
            let axis = if param == "lora_B" { 1 } else { 0 };
            *t = trim(t, bits, axis)?;
        }
        let pattern: serde_json::Map<String, Value> = masks.into_iter().map(|(s, b)| (format!("{s}.lora_E"), json!(b))).collect();
        config["rank_pattern"] = Value::Object(pattern);
        Ok(())
    }

    fn param_estimate(&self, inp: usize, out: usize, _info: &BackboneInfo) -> Option<u128> {
        Some(self.init_r as u128 * (inp as u128 + out as u128 + 1))
    }

    fn build(&self, site: &Site, ctx: &mut BuildCtx) -> Result<Box<dyn Delta>> {
        let (inp, out) = site_dims(site, &ctx.info)?;
        let (dev, r) = (&ctx.device, self.init_r);
        let a = ctx.stream(site.path(), "lora_A").normal(&[r, inp], 0.0, 0.02, dev)?;
        let b = ctx.stream(site.path(), "lora_B").normal(&[out, r], 0.0, 0.02, dev)?;
        let mask: Vec<f32> = match self.pattern_of(site.path()) {
            Some(p) => p.iter().map(|k| if *k { 1.0 } else { 0.0 }).collect(),
            None => vec![1.0; r],
        };
        let mask = Tensor::from_vec(mask, (r, 1), dev)?;
        Ok(Box::new(AdaLora {
            a: Var::from_tensor(&a)?,
            e: Var::from_tensor(&init::zeros(&[r, 1], dev)?)?,
            b: Var::from_tensor(&b)?,
            mask: Var::from_tensor(&mask)?,
            scale: self.scale(),
            dropout: self.lora_dropout as f32,
        }))
    }

    fn group_trainer(&self, tensors: GroupTensors) -> Result<Option<Box<dyn GroupTrainer>>> {
        if tensors.trainable.is_empty() {
            return Ok(None);
        }
        Ok(Some(Box::new(self.allocator(tensors)?)))
    }
}

/// The booleans of a `rank_mask` buffer.
fn mask_bits(t: &Tensor) -> Result<Vec<bool>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.into_iter().map(|v| v > 0.5).collect())
}

/// The slices of `t` along `axis` whose bit is set.
fn trim(t: &Tensor, bits: &[bool], axis: usize) -> Result<Tensor> {
    let idx: Vec<u32> = bits.iter().enumerate().filter(|(_, b)| **b).map(|(i, _)| i as u32).collect();
    if idx.len() == bits.len() {
        return Ok(t.clone());
    }
    if idx.is_empty() {
        let mut dims = t.dims().to_vec();
        dims[axis] = 0;
        return Ok(Tensor::zeros(dims, t.dtype(), t.device())?);
    }
    Ok(t.index_select(&Tensor::new(idx, t.device())?, axis)?)
}

/// `t` (kept slices only, along `axis`) spread back over `pattern`, zeros at the pruned slices.
fn expand(t: &Tensor, pattern: &[bool], axis: usize) -> Result<Tensor> {
    let mut slices = Vec::with_capacity(pattern.len());
    let mut next = 0;
    let mut zero_dims = t.dims().to_vec();
    zero_dims[axis] = 1;
    for keep in pattern {
        if *keep {
            slices.push(t.narrow(axis, next, 1)?);
            next += 1;
        } else {
            slices.push(Tensor::zeros(zero_dims.clone(), t.dtype(), t.device())?);
        }
    }
    Ok(Tensor::cat(&slices, axis)?)
}

#[derive(Debug)]
pub struct AdaLora {
    a: Var,    // (r, in)
    e: Var,    // (r, 1)
    b: Var,    // (out, r)
    mask: Var, // (r, 1), 1 kept / 0 pruned
    scale: f64,
    dropout: f32,
}

impl AdaLora {
    /// `A ⊙ E`, (r, in).
    fn ae(&self) -> Result<Tensor> {
        Ok(self.a.as_tensor().broadcast_mul(self.e.as_tensor())?)
    }
}

impl Delta for AdaLora {
    fn method(&self) -> &'static str {
        "adalora"
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("lora_A".into(), self.a.clone()), ("lora_E".into(), self.e.clone()), ("lora_B".into(), self.b.clone())]
    }

    fn buffers(&self) -> Vec<(String, Var)> {
        vec![(RANK_MASK.into(), self.mask.clone())]
    }

    fn post(&self, x: &Tensor, y: &Tensor, h: &HookCtx) -> Result<Option<Tensor>> {
        let x = if h.train && self.dropout > 0.0 { ops::dropout(x, self.dropout, h.key)? } else { x.clone() };
        let b = h.gated((self.b.as_tensor() * self.scale)?)?;
        let d = ops::linear(&ops::linear(&x, &self.ae()?, None)?, &b, None)?;
        Ok(Some(y.add(&d)?))
    }

    /// For a block engine: the update is `(x (A ⊙ E)ᵀ) (s B)ᵀ`, a low-rank one; with dropout in
    /// training, on the dropped input.
    fn engine_hook(&self, h: &HookCtx) -> Result<Option<EngineHook>> {
        if h.inference {
            return Ok(None);
        }
        let drop = (h.train && self.dropout > 0.0).then_some((self.dropout, h.key));
        Ok(Some(EngineHook::LowRank(self.ae()?, h.gated((self.b.as_tensor() * self.scale)?)?, drop)))
    }

    fn merged(&self, base: &[(String, Tensor)]) -> Result<Option<Vec<(String, Tensor)>>> {
        let Some((_, w)) = base.iter().find(|(n, _)| n == "weight") else { return Ok(None) };
        let dw = (self.b.as_tensor().matmul(&self.ae()?)? * self.scale)?;
        Ok(Some(vec![("weight".into(), w.add(&dw)?)]))
    }
}

/// One module's triplet as the allocator sees it.
struct Module {
    site: String,
    a: Var,
    e: Var,
    b: Var,
    mask: Var,
    keys: [String; 3], // gradient keys of A, E, B
}

/// What one [`GroupTrainer::after_step`] did, for tests and reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepRecord {
    /// PEFT's 0-based step.
    pub step: usize,
    /// `budget_schedule(step)`.
    pub budget: usize,
    pub mask_ind: bool,
    /// Per site, the triplet scores of a masking step.
    pub scores: Option<BTreeMap<String, Vec<f32>>>,
    /// The budget a masking step pruned to.
    pub mask_budget: Option<usize>,
}

/// PEFT's `RankAllocator` plus the orthogonality penalty, for one AdaLoRA group.
pub struct Allocator {
    cfg: AdaLoraConfig,
    modules: Vec<Module>,
    /// Smoothed sensitivity and uncertainty, by gradient key.
    ema: BTreeMap<String, Tensor>,
    unc: BTreeMap<String, Tensor>,
    init_bgt: usize,
    target_bgt: usize,
    last: StepRecord,
    group: String,
}

impl Allocator {
    fn new(cfg: AdaLoraConfig, t: GroupTensors) -> Result<Self> {
        let find = |list: &[(String, String, Var)], site: &str, p: &str| {
            list.iter().find(|(s, n, _)| s == site && n == p).map(|(_, _, v)| v.clone()).ok_or_else(|| bad(format!("{site} has no {p}")))
        };
        let mut sites: Vec<String> = t.trainable.iter().filter(|(_, p, _)| p == "lora_A").map(|(s, _, _)| s.clone()).collect();
        sites.sort();
        let mut modules = Vec::with_capacity(sites.len());
        for site in sites {
            modules.push(Module {
                a: find(&t.trainable, &site, "lora_A")?,
                e: find(&t.trainable, &site, "lora_E")?,
                b: find(&t.trainable, &site, "lora_B")?,
                mask: find(&t.buffers, &site, RANK_MASK)?,
                keys: [t.key(&site, "lora_A"), t.key(&site, "lora_E"), t.key(&site, "lora_B")],
                site,
            });
        }
        let init_bgt = modules.iter().map(|m| m.a.dims()[0]).sum();
        let target_bgt = cfg.target_r * modules.len();
        Ok(Allocator { cfg, modules, ema: BTreeMap::new(), unc: BTreeMap::new(), init_bgt, target_bgt, last: StepRecord::default(), group: t.name })
    }

    /// Σ initial ranks and `target_r × modules`.
    pub fn budgets(&self) -> (usize, usize) {
        (self.init_bgt, self.target_bgt)
    }

    /// PEFT's `budget_schedule(step)` (0-based) for a schedule of `total` steps.
    pub fn budget_schedule(&self, step: usize, total: usize) -> (usize, bool) {
        let (ti, tf) = (self.cfg.tinit, self.cfg.tfinal);
        if step <= ti {
            (self.init_bgt, false)
        } else if step + tf > total {
            (self.target_bgt, true)
        } else {
            let mul = 1.0 - (step - ti) as f64 / (total - tf - ti) as f64;
            let budget = ((self.init_bgt - self.target_bgt) as f64 * mul.powi(3) + self.target_bgt as f64) as usize;
            (budget, step.is_multiple_of(self.cfg.delta_t))
        }
    }

    /// The smoothed sensitivity and uncertainty of a tensor (by gradient key), while kept.
    pub fn ema(&self, key: &str) -> Option<(&Tensor, &Tensor)> {
        Some((self.ema.get(key)?, self.unc.get(key)?))
    }

    /// What the last step did.
    pub fn last_step(&self) -> &StepRecord {
        &self.last
    }

    /// The current pattern per site (all kept before the first masking).
    pub fn pattern(&self) -> Result<BTreeMap<String, Vec<bool>>> {
        self.modules.iter().map(|m| Ok((m.site.clone(), mask_bits(m.mask.as_tensor())?))).collect()
    }

    fn update_ipt(&mut self, grads: &BTreeMap<String, Tensor>) -> Result<()> {
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        for m in &self.modules {
            for (key, var) in m.keys.iter().zip([&m.a, &m.e, &m.b]) {
                let Some(g) = grads.get(key) else { continue };
                let ipt = var.as_tensor().mul(g)?.abs()?;
                let ema = match self.ema.get(key) {
                    Some(prev) => ((prev * b1)? + (&ipt * (1.0 - b1))?)?,
                    None => (&ipt * (1.0 - b1))?,
                };
                let dev = (&ipt - &ema)?.abs()?;
                let unc = match self.unc.get(key) {
                    Some(prev) => ((prev * b2)? + (dev * (1.0 - b2))?)?,
                    None => (dev * (1.0 - b2))?,
                };
                self.ema.insert(key.clone(), ema);
                self.unc.insert(key.clone(), unc);
            }
        }
        Ok(())
    }

    fn element_score(&self, key: &str, shape: &[usize], dev: &candle_core::Device) -> Result<Tensor> {
        match (self.ema.get(key), self.unc.get(key)) {
            (Some(e), Some(u)) => Ok(e.mul(u)?),
            _ => Ok(Tensor::zeros(shape, DType::F32, dev)?),
        }
    }

    /// PEFT's `mask_to_budget`: scores every triplet, zeroes E below the threshold, records the
    /// pattern in the `rank_mask` buffers.
    fn mask_to_budget(&mut self, budget: usize) -> Result<()> {
        let mut scores = BTreeMap::new();
        for m in &self.modules {
            let dev = m.a.device();
            let sa = self.element_score(&m.keys[0], m.a.dims(), dev)?.mean(D::Minus1)?.to_vec1::<f32>()?;
            let se = self.element_score(&m.keys[1], m.e.dims(), dev)?.flatten_all()?.to_vec1::<f32>()?;
            let sb = self.element_score(&m.keys[2], m.b.dims(), dev)?.mean(0)?.to_vec1::<f32>()?;
            // PEFT: ipt_E + (ipt_A + ipt_B), in float32.
            let s: Vec<f32> = se.iter().zip(sa.iter().zip(&sb)).map(|(e, (a, b))| e + (a + b)).collect();
            scores.insert(m.site.clone(), s);
        }
        let k = self.init_bgt.saturating_sub(budget);
        let threshold = if k == 0 {
            None
        } else {
            let mut all: Vec<f32> = scores.values().flatten().copied().collect();
            all.sort_by(f32::total_cmp);
            Some(all[k - 1])
        };
        for m in &self.modules {
            let keep: Vec<f32> = scores[&m.site].iter().map(|s| if threshold.is_some_and(|t| *s <= t) { 0.0 } else { 1.0 }).collect();
            let keep = Tensor::from_vec(keep, m.mask.dims(), m.mask.device())?;
            m.e.set(&m.e.as_tensor().mul(&keep)?)?;
            m.mask.set(&keep)?;
        }
        self.last.scores = Some(scores);
        self.last.mask_budget = Some(budget);
        Ok(())
    }

    /// PEFT's `mask_using_rank_pattern` with the pattern in the buffers.
    fn apply_pattern(&self) -> Result<()> {
        for m in &self.modules {
            m.e.set(&m.e.as_tensor().mul(m.mask.as_tensor())?)?;
        }
        Ok(())
    }

    /// Kept ranks in all and trainable scalars they hold (what a PEFT export saves).
    pub fn kept(&self) -> Result<(usize, usize)> {
        let (mut ranks, mut params) = (0, 0);
        for m in &self.modules {
            let k = mask_bits(m.mask.as_tensor())?.iter().filter(|b| **b).count();
            ranks += k;
            params += k * (m.a.dims()[1] + 1 + m.b.dims()[0]);
        }
        Ok((ranks, params))
    }
}

impl GroupTrainer for Allocator {
    fn regularizer(&self) -> Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        let mut n = 0usize;
        for m in &self.modules {
            let a = m.a.as_tensor();
            let b = m.b.as_tensor();
            for cov in [a.matmul(&a.t()?)?, b.t()?.matmul(b)?] {
                let eye = Tensor::eye(cov.dim(0)?, cov.dtype(), cov.device())?;
                let fro = (cov - eye)?.sqr()?.sum_all()?.sqrt()?;
                total = Some(match total {
                    Some(t) => (t + fro)?,
                    None => fro,
                });
                n += 1;
            }
        }
        Ok(match total {
            Some(t) => Some((t * (self.cfg.orth_reg_weight / n as f64))?),
            None => None,
        })
    }

    fn after_step(&mut self, step: usize, total: usize, grads: &BTreeMap<String, Tensor>) -> Result<()> {
        let t = step.saturating_sub(1);
        let len = self.cfg.schedule_len(total);
        let end = len.saturating_sub(self.cfg.tfinal);
        let (budget, mask_ind) = self.budget_schedule(t, len);
        self.last = StepRecord { step: t, budget, mask_ind, scores: None, mask_budget: None };
        if t < end {
            self.update_ipt(grads)?;
            if mask_ind {
                self.mask_to_budget(budget)?;
            }
        } else if t == end {
            self.mask_to_budget(budget)?;
            self.ema.clear();
            self.unc.clear();
        } else {
            self.apply_pattern()?;
        }
        if step == total {
            // The saved delta computes what its (trimmed) PEFT export computes.
            self.apply_pattern()?;
        }
        Ok(())
    }

    fn report(&self) -> Option<String> {
        let (ranks, params) = self.kept().ok()?;
        let full: usize = self.modules.iter().map(|m| m.a.dims()[0] * (m.a.dims()[1] + 1 + m.b.dims()[0])).sum();
        Some(format!(
            "adalora `{}`: {ranks} of {} ranks kept over {} modules (target {} = target_r {} × {}); trainable budget {params} of {full} parameters",
            self.group,
            self.init_bgt,
            self.modules.len(),
            self.target_bgt,
            self.cfg.target_r,
            self.modules.len()
        ))
    }
}
