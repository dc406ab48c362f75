//! The bi-level search loop and its outputs.
//!
//! The training set is split 50/50 (seeded) into a weight half and a gate half. Every step takes
//! one batch of each: an AdamW step on the architecture parameters α with the gate-half loss
//! (lr ≈ 0.1), then an AdamW step on the delta weights (and head) with the weight-half loss, each
//! under freshly sampled relaxed-Bernoulli gates. `second_order` replaces the α gradient by the
//! DARTS unrolled one: `∇α L_val(w', α) − ξ·(∇α L_trn(w⁺) − ∇α L_trn(w⁻)) / 2ε` with the virtual
//! step `w' = w − ξ ∇w L_trn(w)`, `w± = w ± ε ∇w' L_val`, `ε = 0.01 / ‖∇w' L_val‖` — the variant
//! the reference's published results used (its code takes an AdamW virtual step but the SGD form
//! of the correction; we take the SGD virtual step throughout, which is the consistent form).

use super::gates::{select, GateConfig, Gates};
use super::space::Candidate;
use crate::attach::{self, AttachOptions};
use crate::data::batching::batch_order;
use crate::data::rng::{shuffle, SplitMix64};
use crate::error::{check, Error, Result};
use crate::ops::DropoutKey;
use crate::control::{Control, Event};
use crate::train::log::MetricsLog;
use crate::train::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig, Decay, DecayRule, GradAccumulator};
use crate::train::prepared::{Prepared, Scorer};
use crate::artifacts::TaskModel;
use crate::core::{Backbone, ForwardCtx};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// The parameter budget: a share of the backbone's parameters or an absolute count. The task head
/// is outside the budget.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    Percent(f64),
    Absolute(usize),
}

impl Budget {
    /// `0.01%` or `3157`.
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim();
        match t.strip_suffix('%') {
            Some(p) => {
                let v: f64 = p.trim().parse().map_err(|_| Error::arg("--budget", format!("`{s}`: `{p}` before the % sign is not a number")))?;
                if !(v > 0.0 && v < 100.0) {
                    return Err(Error::arg("--budget", format!("`{s}`: a share of the backbone must be above 0% and below 100%")));
                }
                Ok(Budget::Percent(v))
            }
            None => {
                let v: i128 = t.replace('_', "").parse().map_err(|_| {
                    Error::arg("--budget", format!("`{s}` is neither a percentage like 0.0139% nor a whole number of parameters like 3157"))
                })?;
                if v <= 0 {
                    return Err(Error::arg("--budget", format!("`{s}`: a parameter budget must be at least 1")));
                }
                Ok(Budget::Absolute(usize::try_from(v).unwrap_or(usize::MAX)))
            }
        }
    }

    /// The budget in parameters for a backbone of `total` parameters.
    pub fn params(self, total: usize) -> f64 {
        match self {
            Budget::Percent(p) => total as f64 * p / 100.0,
            Budget::Absolute(n) => n as f64,
        }
    }
}

impl std::str::FromStr for Budget {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Budget::parse(s)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SearchConfig {
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    /// Learning rate of the delta weights (and head).
    pub lr: f64,
    /// Learning rate of the architecture parameters α.
    pub alpha_lr: f64,
    pub gates: GateConfig,
    pub second_order: bool,
    /// Gradient-norm clipping, separately for weights and α (2.0 in the reference).
    pub max_grad_norm: f64,
    pub seed: u64,
    pub eval_every: Option<usize>,
    pub eval_batch_size: usize,
    pub dropout: bool,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            epochs: 1,
            max_steps: None,
            batch_size: 32,
            lr: 3e-4,
            alpha_lr: 0.1,
            gates: GateConfig::default(),
            second_order: false,
            max_grad_norm: 2.0,
            seed: 42,
            eval_every: None,
            eval_batch_size: 64,
            dropout: true,
        }
    }
}

impl SearchConfig {
    /// Checks every setting against its range; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        check::positive("--lr", self.lr)?;
        check::positive("--alpha-lr", self.alpha_lr)?;
        check::positive("--beta", self.gates.beta)?;
        check::positive("--tau", self.gates.tau)?;
        match self.max_steps {
            Some(n) => check::at_least("--max-steps", n, 1)?,
            None => check::at_least("--epochs", self.epochs, 1)?,
        }
        check::at_least("--batch-size", self.batch_size, 1)?;
        check::at_least("--eval-batch-size", self.eval_batch_size, 1)?;
        check::positive("max_grad_norm", self.max_grad_norm)?;
        if let Some(e) = self.eval_every {
            check::at_least("--eval-every", e, 1)?;
        }
        Ok(())
    }
}

/// What a search produces.
#[derive(Clone, Debug, Serialize)]
pub struct SearchResult {
    pub budget: f64,
    pub steps: usize,
    pub seconds: f64,
    /// α and p of every candidate, at the best supernet dev score (or the end).
    pub alphas: Vec<f64>,
    pub probs: Vec<f64>,
    pub selected: Vec<usize>,
    pub selected_params: usize,
    pub best_dev: Option<f64>,
    pub best_step: Option<usize>,
}

fn grads_of(params: &[(String, Var)], g: &candle_core::backprop::GradStore) -> Result<BTreeMap<String, Tensor>> {
    let mut acc = GradAccumulator::default();
    acc.add(params, g)?;
    acc.take(1.0)
}

/// What a search trains and scores: an encoder's task loss through its head
/// ([`EncoderObjective`]) or a decoder's causal-LM loss on completions (the decoder search of
/// `api::search_lm`). Examples are addressed by index; the loop splits them into the two halves.
pub trait Objective {
    /// Training examples.
    fn len(&self) -> usize;
    /// Token length of each training example (length-bucketed batches).
    fn lengths(&self) -> Vec<usize>;
    /// The loss of training examples `ids` under `ctx` (which carries the gates and dropout).
    fn loss(&self, ids: &[usize], ctx: &ForwardCtx) -> Result<Tensor>;
    /// What the weight step trains: every candidate's delta (and a task head).
    fn params(&self) -> Vec<(String, Var)>;
    /// Dev score of the supernet with the gates fixed to `z` (higher is better); `None` without a
    /// dev set.
    fn dev_score(&self, z: &Tensor) -> Result<Option<f64>>;
    fn device(&self) -> Device;
}

/// The encoder's objective: task loss through the head on prepared examples, scored by `scorer`.
pub struct EncoderObjective<'a> {
    pub model: &'a TaskModel,
    pub train: &'a Prepared,
    pub dev: Option<&'a Prepared>,
    pub scorer: &'a Scorer<'a>,
    pub pad_id: u32,
    pub eval_batch_size: usize,
}

impl Objective for EncoderObjective<'_> {
    fn len(&self) -> usize {
        self.train.len()
    }
    fn lengths(&self) -> Vec<usize> {
        self.train.lengths()
    }
    fn loss(&self, ids: &[usize], ctx: &ForwardCtx) -> Result<Tensor> {
        let (batch, targets) = self.train.batch(ids, self.model.head.config.kind, self.pad_id, self.model.backbone.device())?;
        let logits = self.model.logits(&batch, ctx)?;
        self.model.head.loss(&logits, &targets)
    }
    fn params(&self) -> Vec<(String, Var)> {
        self.model.params()
    }
    fn dev_score(&self, z: &Tensor) -> Result<Option<f64>> {
        match self.dev {
            Some(dev) => Ok(Some(supernet_score(self.model, dev, z, self.eval_batch_size, self.pad_id, self.scorer)?)),
            None => Ok(None),
        }
    }
    fn device(&self) -> Device {
        self.model.backbone.device().clone()
    }
}

/// A decoder's objective: the causal-LM loss on the label words of a classification task as
/// text-to-text (mean over the batch's target tokens), scored by verbalizer accuracy on `dev`.
pub struct DecoderObjective<'a> {
    pub model: &'a crate::backbone::llama::LlamaModel,
    pub tokenizer: &'a crate::lm::tokenizer::LmTokenizer,
    pub rows: &'a [crate::train::lm::LmRow],
    pub verbalizer: &'a crate::train::lm::Verbalizer,
    pub dev: &'a [crate::data::task::Example],
    pub max_length: usize,
    pub eval_batch_size: usize,
}

impl Objective for DecoderObjective<'_> {
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn lengths(&self) -> Vec<usize> {
        self.rows.iter().map(|r| r.ids.len()).collect()
    }
    fn loss(&self, ids: &[usize], ctx: &ForwardCtx) -> Result<Tensor> {
        use crate::train::lm::{batch_nll, make_row_batch};
        let rows: Vec<_> = ids.iter().map(|&i| self.rows[i].clone()).collect();
        let batch = make_row_batch(&rows, self.tokenizer.pad_id.unwrap_or(0), self.model.device())?;
        if batch.num_targets == 0 {
            return Err(Error::Delta("a search batch has no target tokens (every completion was cut off)".into()));
        }
        Ok((batch_nll(self.model, &batch, ctx)? / batch.num_targets as f64)?)
    }
    fn params(&self) -> Vec<(String, Var)> {
        attach::trainable_vars(self.model)
    }
    fn dev_score(&self, z: &Tensor) -> Result<Option<f64>> {
        if self.dev.is_empty() {
            return Ok(None);
        }
        let ctx = ForwardCtx::eval().with_gates(z);
        Ok(Some(crate::train::lm::verbalizer_accuracy_with(self.model, self.tokenizer, self.verbalizer, self.dev, self.eval_batch_size.min(16), self.max_length, &ctx)?))
    }
    fn device(&self) -> Device {
        self.model.device().clone()
    }
}

/// Runs the search on an encoder task. `model` must already carry one attached delta per
/// candidate (named as in `cands[i].spec.name`, gated by index); see [`prepare`].
#[allow(clippy::too_many_arguments)]
pub fn search(
    model: &mut TaskModel,
    cands: &[Candidate],
    budget: f64,
    train: &Prepared,
    dev: Option<&Prepared>,
    scorer: &Scorer,
    cfg: &SearchConfig,
    out_dir: &Path,
    pad_id: u32,
    ctl: &Control,
) -> Result<SearchResult> {
    cfg.validate()?;
    if !cfg.dropout {
        model.backbone.set_dropout(0.0, 0.0);
    }
    let obj = EncoderObjective { model, train, dev, scorer, pad_id, eval_batch_size: cfg.eval_batch_size };
    search_objective(&obj, cands, budget, cfg, out_dir, ctl)
}

/// The search loop over any [`Objective`] whose model carries the gated candidates (dropout as
/// the caller set it).
pub fn search_objective(obj: &dyn Objective, cands: &[Candidate], budget: f64, cfg: &SearchConfig, out_dir: &Path, ctl: &Control) -> Result<SearchResult> {
    cfg.validate()?;
    if obj.len() < 2 {
        return Err(Error::arg("--train", "the search needs at least two training examples"));
    }
    let device = obj.device();
    let n: Vec<usize> = cands.iter().map(|c| c.params).collect();
    let gates = Gates::new(n.clone(), budget, cfg.gates.clone(), &device)?;
    // Weight half / gate half.
    let mut idx: Vec<usize> = (0..obj.len()).collect();
    shuffle(&mut idx, &mut SplitMix64::new(cfg.seed ^ 0x5EA2_C400));
    let half = idx.len() / 2;
    let (w_half, a_half) = (&idx[..half], &idx[half..half * 2]);
    let params = obj.params();
    let wcfg = AdamWConfig { weight_decay: 0.0, decay_rule: DecayRule::All, ..Default::default() };
    let mut w_opt = AdamW::new(params.clone(), wcfg.clone())?;
    let alpha_params = vec![("alpha".to_string(), gates.alpha.clone())];
    let mut a_opt = AdamW::new(alpha_params.clone(), wcfg)?;
    let steps_per_epoch = w_half.len().div_ceil(cfg.batch_size);
    let total = cfg.max_steps.unwrap_or(cfg.epochs.max(1) * steps_per_epoch);
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let mut log = MetricsLog::open(&out_dir.join("search_metrics.jsonl"), Some(0))?;
    ctl.emit(Event::Start { what: "search".into(), total, done: 0 });
    let t0 = Instant::now();
    let (mut best_dev, mut best_step, mut best_alpha): (Option<f64>, Option<usize>, Option<Vec<f64>>) = (None, None, None);
    let lengths = obj.lengths();
    let (wl, al): (Vec<usize>, Vec<usize>) = (w_half.iter().map(|&i| lengths[i]).collect(), a_half.iter().map(|&i| lengths[i]).collect());
    let mut step = 0usize;
    let mut epoch = 0u64;
    // Batches are positions within a half; `global` maps them to example indices.
    let global = |half: &[usize], pos: &[usize]| -> Vec<usize> { pos.iter().map(|&p| half[p]).collect() };
    let loss_of = |ids: &[usize], z: &Tensor, key: DropoutKey| -> Result<Tensor> { obj.loss(ids, &ForwardCtx::train(key).with_gates(z)) };
    while step < total {
        let w_order = batch_order(&wl, cfg.batch_size, cfg.seed, epoch, true);
        let a_order = batch_order(&al, cfg.batch_size, cfg.seed ^ 0xA1FA, epoch, true);
        for (wb, ab) in w_order.iter().zip(a_order.iter().cycle()) {
            if step >= total {
                break;
            }
            if let Err(e) = ctl.check(|| format!("search at step {step}/{total}")) {
                ctl.emit(Event::Finish);
                return Err(e);
            }
            let key = DropoutKey(cfg.seed).derive("search").derive_n(step as u64);
            let (lr_w, lr_a) = (lr_at(cfg.lr, step, total, 0, Decay::Linear), lr_at(cfg.alpha_lr, step, total, 0, Decay::Linear));
            // --- α step on the gate half.
            let z = gates.sample(key.derive("u-alpha"))?;
            let (wb, ab) = (global(w_half, wb), global(a_half, ab));
            let mut a_grad = if cfg.second_order {
                second_order_alpha_grad(&params, &gates, &z, &wb, &ab, lr_w, key, &loss_of)?
            } else {
                let l = loss_of(&ab, &z, key.derive("drop-alpha"))?;
                grads_of(&alpha_params, &l.backward()?)?
            };
            clip_grad_norm(&mut a_grad, cfg.max_grad_norm)?;
            a_opt.step(&a_grad, lr_a)?;
            // --- weight step on the weight half, fresh gates from the updated α.
            let z = gates.sample(key.derive("u-weight"))?.detach();
            let l = loss_of(&wb, &z, key.derive("drop-weight"))?;
            let lv = l.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                return Err(Error::NonFinite(format!(
                    "search loss is {lv} at step {}; lower --lr (now {}) or --alpha-lr (now {})",
                    step + 1,
                    cfg.lr,
                    cfg.alpha_lr
                )));
            }
            let mut g = grads_of(&params, &l.backward()?)?;
            clip_grad_norm(&mut g, cfg.max_grad_norm)?;
            w_opt.step(&g, lr_w)?;
            step += 1;
            let expected = gates.expected_params()?;
            let p = gates.probs()?.to_vec1::<f32>()?;
            let mut top: Vec<usize> = (0..p.len()).collect();
            top.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let top3: Vec<String> = top.iter().take(3).map(|&i| format!("{}@{} {:.2}", cands[i].method, short(&cands[i].path), p[i])).collect();
            log.write(&crate::train::log::Record::Search {
                step,
                loss: lv,
                lr: lr_w,
                alpha_lr: lr_a,
                expected_params: expected,
                top: top3.clone(),
                elapsed_s: t0.elapsed().as_secs_f64(),
            })?;
            ctl.emit(Event::Step { step, total, loss: lv, lr: lr_w, examples_per_s: 0.0, eta_s: 0.0 });
            if step.is_multiple_of((total / 10).max(1)) || step == total {
                ctl.message(format!("step {step}/{total}: loss {lv:.4}, budget use {expected:.0}/{budget:.0}, top: {}", top3.join(", ")));
            }
            let eval_due = cfg.eval_every.is_some_and(|e| step.is_multiple_of(e)) || step == total;
            // Supernet score with deterministic gates z = p.
            let score = if eval_due { obj.dev_score(&gates.probs()?.detach())? } else { None };
            if let Some(score) = score {
                let best = best_dev.is_none_or(|b| score > b);
                ctl.emit(Event::Eval { step, metric: "supernet dev score".into(), score, loss: f64::NAN, best });
                if best {
                    best_dev = Some(score);
                    best_step = Some(step);
                    best_alpha = Some(gates.alphas()?);
                }
            }
        }
        epoch += 1;
    }
    ctl.emit(Event::Finish);
    log.flush()?;
    if let Some(a) = &best_alpha {
        gates.alpha.set(&Tensor::from_vec(a.iter().map(|&x| x as f32).collect::<Vec<_>>(), a.len(), &device)?)?;
    }
    let alphas = gates.alphas()?;
    let probs: Vec<f64> = gates.probs()?.to_vec1::<f32>()?.into_iter().map(|x| x as f64).collect();
    let selected = select(&probs, &n, budget);
    let selected_params = selected.iter().map(|&i| n[i]).sum();
    Ok(SearchResult { budget, steps: step, seconds: t0.elapsed().as_secs_f64(), alphas, probs, selected, selected_params, best_dev, best_step })
}

fn short(path: &str) -> String {
    path.replace("encoder.layer.", "L").replace("attention.", "").replace(".dense", "")
}

/// Dev score of the supernet with gates fixed to `z`.
fn supernet_score(model: &TaskModel, dev: &Prepared, z: &Tensor, batch: usize, pad_id: u32, scorer: &Scorer) -> Result<f64> {
    let kind = model.head.config.kind;
    let mut preds = vec![0f32; dev.len()];
    let ctx = ForwardCtx::eval().with_gates(z);
    let ids: Vec<usize> = (0..dev.len()).collect();
    for chunk in ids.chunks(batch.max(1)) {
        let (b, _) = dev.batch(chunk, kind, pad_id, model.backbone.device())?;
        let logits = model.logits(&b, &ctx)?;
        let p: Vec<f32> = match kind {
            crate::head::HeadKind::Classification { .. } => logits.argmax(candle_core::D::Minus1)?.to_dtype(candle_core::DType::F32)?.to_vec1()?,
            crate::head::HeadKind::Regression => logits.squeeze(candle_core::D::Minus1)?.to_vec1()?,
        };
        for (&i, v) in chunk.iter().zip(p) {
            preds[i] = v;
        }
    }
    Ok(scorer(&preds, &dev.targets)?.primary_value())
}

type LossFn<'a> = dyn Fn(&[usize], &Tensor, DropoutKey) -> Result<Tensor> + 'a;

/// The DARTS second-order α gradient (see the module docs): `trn` the weight-half batch, `val`
/// the gate-half batch.
#[allow(clippy::too_many_arguments)]
fn second_order_alpha_grad(
    params: &[(String, Var)],
    gates: &Gates,
    z: &Tensor,
    trn: &[usize],
    val: &[usize],
    xi: f64,
    key: DropoutKey,
    loss_of: &LossFn,
) -> Result<BTreeMap<String, Tensor>> {
    let alpha_params = vec![("alpha".to_string(), gates.alpha.clone())];
    let saved: Vec<Tensor> = params.iter().map(|(_, v)| v.as_tensor().copy()).collect::<candle_core::Result<_>>()?;
    let restore = || -> Result<()> {
        for ((_, v), t) in params.iter().zip(&saved) {
            v.set(t)?;
        }
        Ok(())
    };
    // Virtual step w' = w − ξ ∇w L_trn(w). The gates are held fixed (z detached) inside it.
    let zd = z.detach();
    let g_trn = grads_of(params, &loss_of(trn, &zd, key.derive("v-trn"))?.backward()?)?;
    for (name, v) in params {
        if let Some(g) = g_trn.get(name) {
            v.set(&(v.as_tensor() - (g * xi)?)?)?;
        }
    }
    // ∇α and ∇w' of the validation loss at w'.
    let lv = loss_of(val, z, key.derive("v-val"))?;
    let gs = lv.backward()?;
    let d_alpha = grads_of(&alpha_params, &gs)?;
    let d_w = grads_of(params, &gs)?;
    restore()?;
    let norm = crate::train::optim::global_norm(&d_w)?;
    let eps = 0.01 / (norm + 1e-6);
    let alpha_grad_at = |sign: f64| -> Result<BTreeMap<String, Tensor>> {
        for (name, v) in params {
            if let Some(d) = d_w.get(name) {
                v.set(&(v.as_tensor() + (d * (sign * eps))?)?)?;
            }
        }
        let z2 = gates.sample(key.derive("u-alpha"))?; // same noise → same z, fresh graph
        let g = grads_of(&alpha_params, &loss_of(trn, &z2, key.derive("v-trn"))?.backward()?)?;
        restore()?;
        Ok(g)
    };
    let g_plus = alpha_grad_at(1.0)?;
    let g_minus = alpha_grad_at(-1.0)?;
    let mut out = BTreeMap::new();
    if let (Some(da), Some(gp), Some(gm)) = (d_alpha.get("alpha"), g_plus.get("alpha"), g_minus.get("alpha")) {
        let h = ((gp - gm)? / (2.0 * eps))?;
        out.insert("alpha".to_string(), (da - (h * xi)?)?);
    }
    Ok(out)
}

/// Attaches every candidate of `cands` to the backbone with its gate index.
pub fn prepare(model: &mut TaskModel, cands: &[Candidate], seed: u64) -> Result<()> {
    model.specs = prepare_backbone(&mut model.backbone, cands, seed)?;
    Ok(())
}

/// [`prepare`] for any backbone (a decoder's search has no task head): attaches every candidate
/// gated by its index and returns their specs.
pub fn prepare_backbone(backbone: &mut dyn Backbone, cands: &[Candidate], seed: u64) -> Result<Vec<crate::delta::DeltaSpec>> {
    let specs: Vec<crate::delta::DeltaSpec> = cands.iter().map(|c| c.spec.clone()).collect();
    attach::attach(backbone, &specs, AttachOptions { seed, tokenizer: None })?;
    for c in cands {
        for s in backbone.sites_mut() {
            for a in s.deltas.iter_mut().filter(|a| a.name == c.spec.name) {
                a.gate = Some(c.id);
            }
        }
    }
    Ok(specs)
}
