//! The training loop: seeded, resumable at any optimizer step, with evaluation, early stopping and
//! the best checkpoint kept.
//!
//! Determinism: the batch order is a function of (seed, epoch), every dropout mask of (seed, step,
//! micro-batch), and the model and optimizer state are restored bit-exactly from the last
//! checkpoint — so a run killed at any moment and resumed ends with the same delta as an
//! uninterrupted one.
//!
//! Data-parallel (a [`crate::dist::Collective`] in the control with more than one rank): every
//! rank computes its contiguous shard of each micro-batch, padded to the whole micro-batch's
//! length and with the dropout masks those rows get in the whole batch
//! ([`crate::ops::in_batch_rows`]); the step's gradients are summed over ranks in one exchange;
//! every rank applies the same update. Rank 0 alone evaluates (its scores are broadcast) and
//! writes the log, checkpoints and deltas. The state is the same whatever the number of ranks,
//! so a run resumes on any number.

use super::checkpoint::{self, LoopState};
use super::log::{MetricsLog, Record};
use super::optim::{clip_grad_norm, global_norm, lr_at, AdamW, GradAccumulator};
use super::config::TrainConfig;
use super::eval::evaluate;
use super::prepared::{Prepared, Scorer, Scores};
use crate::data::batching::batch_order;
use crate::data::tokenize::Padding;
use crate::dist::{self, GradExchange, StepTotals};
use crate::artifacts::delta_dir as store;
use crate::control::{Control, Event};
use crate::error::{Error, Result};
use crate::io::TensorFile;
use crate::ops::DropoutKey;
use crate::artifacts::TaskModel;
use crate::core::{Backbone, ForwardCtx};
use candle_core::Var;
use serde_json::{Map, Value};
use std::path::Path;
use std::time::Instant;

pub struct FitOptions<'a> {
    /// Where progress goes, and the flag that stops the loop (after a checkpoint) between steps.
    pub ctl: &'a Control<'a>,
    pub cfg: &'a TrainConfig,
    pub train: &'a Prepared,
    pub dev: Option<&'a Prepared>,
    pub scorer: &'a Scorer<'a>,
    /// Holds `metrics.jsonl`, `checkpoints/last`, `best/` and `final/`.
    pub run_dir: &'a Path,
    /// Where the run ends up: `run_dir` itself, or the destination a staged run (one replacing
    /// an older run) is moved to when it completes. Only for messages.
    pub final_dir: &'a Path,
    /// Continue from `checkpoints/last`.
    pub resume: bool,
    /// Saved with every delta (task, label map, training config).
    pub meta: Map<String, Value>,
    pub pad_id: u32,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct FitResult {
    pub steps: usize,
    pub examples: usize,
    pub seconds: f64,
    pub best_score: Option<f64>,
    pub best_step: Option<usize>,
    /// Scores of the best evaluation (all metrics).
    pub best_scores: Option<Scores>,
    pub stopped_early: bool,
    pub resumed_from: Option<usize>,
    pub final_train_loss: Option<f64>,
    /// What the group trainers did (AdaLoRA's kept ranks and trainable budget).
    pub reports: Vec<String>,
    /// Processes that trained (1 alone).
    pub ranks: usize,
    /// Seconds spent exchanging gradients between ranks (0 alone).
    pub comm_seconds: f64,
}

/// Copies the saved values of a delta directory (with head) into `params`.
fn restore(params: &[(String, Var)], dir: &Path, device: &candle_core::Device) -> Result<()> {
    let file = TensorFile::load(&dir.join(store::WEIGHTS_FILE), device)?;
    for (name, var) in params {
        let key = if name.starts_with("head.") { name.clone() } else { format!("deltas.{name}") };
        var.set(&file.get_f32(&key, var.dims())?)?;
    }
    Ok(())
}

/// What a stopped run leaves behind, for error messages.
fn resume_hint(run_dir: &Path, final_dir: &Path) -> String {
    if run_dir == final_dir {
        format!("the last good checkpoint is in {} (`--resume` continues from it)", checkpoint::last_dir(run_dir).display())
    } else {
        format!("nothing of this run is kept; the previous run in {} is unchanged", final_dir.display())
    }
}

/// Whether every value of `t` is finite (`t - t` is zero exactly where `t` is finite).
fn finite(t: &candle_core::Tensor) -> Result<bool> {
    let s = (t - t)?.sum_all()?.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
    Ok(s == 0.0)
}

/// Appends to the run's log where this rank keeps one.
fn write(log: &mut Option<MetricsLog>, r: &Record) -> Result<()> {
    log.as_mut().map_or(Ok(()), |l| l.write(r))
}

/// Optimizer steps of a run over `examples` training examples: `--max-steps`, else epochs ×
/// steps per epoch (batches of `batch_size`, `grad_accum` of them per step).
pub fn total_steps(cfg: &TrainConfig, examples: usize) -> usize {
    let micro_per_epoch = examples.div_ceil(cfg.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(cfg.grad_accum);
    cfg.max_steps.unwrap_or(cfg.epochs * steps_per_epoch)
}

/// Trains `model` (its deltas and head) as configured.
pub fn fit(model: &mut TaskModel, o: FitOptions) -> Result<FitResult> {
    let _pool = crate::ops::pool::ClearOnDrop;
    let cfg = o.cfg;
    cfg.validate()?;
    if o.train.is_empty() {
        return Err(Error::arg("--train", "the training split is empty"));
    }
    if o.dev.is_some_and(|d| d.is_empty()) {
        return Err(Error::arg("--dev", "the dev split is empty"));
    }
    if !cfg.dropout {
        model.backbone.set_dropout(0.0, 0.0);
    }
    let device = model.backbone.device().clone();
    let kind = model.head.config.kind;
    let params = model.params();
    let world = o.ctl.world.filter(|w| w.size() > 1);
    let (rank, ranks) = dist::rank_size(world);
    // Only rank 0 writes; the other ranks keep nothing but a private spill for the frozen cache.
    let writer = rank == 0;
    let private_dir = if writer { None } else { Some(tempfile::tempdir().map_err(|e| Error::io_op(std::env::temp_dir(), "creating a directory in", e))?) };
    let spill_dir = private_dir.as_ref().map_or(o.run_dir, |d| d.path());
    let mut exchange = world.map(|_| GradExchange::new(&params));
    let mut opt = AdamW::new(params.clone(), cfg.adamw.clone())?;
    let lengths = o.train.lengths();
    let total = total_steps(cfg, o.train.len());
    let warmup = cfg.warmup_steps.unwrap_or((cfg.warmup_ratio * total as f64).ceil() as usize);
    let mut st = LoopState {
        step: 0,
        epoch: 0,
        next_batch: 0,
        best_score: None,
        best_step: None,
        evals_since_best: 0,
        elapsed_s: 0.0,
        seed: cfg.seed,
        examples: 0,
    };
    let mut resumed_from = None;
    if o.resume {
        let (state, moments, delta_dir) = checkpoint::load(o.run_dir, &device)?.ok_or_else(|| {
            Error::arg("--resume", format!("{} has no checkpoint to resume from", o.run_dir.display()))
        })?;
        if state.seed != cfg.seed {
            return Err(Error::arg("--resume", format!("the run was started with seed {}, not {}", state.seed, cfg.seed)));
        }
        restore(&params, &delta_dir, &device)?;
        // Buffers saved with the deltas (AdaLoRA's rank pattern) come back too.
        let trained: std::collections::BTreeSet<&String> = params.iter().map(|(n, _)| n).collect();
        let buffers: Vec<(String, Var)> = crate::attach::saved_vars(&model.backbone).into_iter().filter(|(n, _)| !trained.contains(n)).collect();
        restore(&buffers, &delta_dir, &device)?;
        opt.load_state(&moments, state.step as u64, &checkpoint::last_dir(o.run_dir).join("optimizer.safetensors").display().to_string())?;
        resumed_from = Some(state.step);
        st = state;
    }
    let mut log = if writer {
        std::fs::create_dir_all(o.run_dir).map_err(|e| Error::io_op(o.run_dir, "creating", e))?;
        Some(MetricsLog::open(&o.run_dir.join("metrics.jsonl"), Some(st.step))?)
    } else {
        None
    };
    let ctl = o.ctl;
    if let Some(s) = resumed_from {
        ctl.message(format!("resuming at step {s}/{total} (epoch {}, batch {})", st.epoch, st.next_batch));
    }
    let t0 = Instant::now();
    let (elapsed0, examples0) = (st.elapsed_s, st.examples);
    // Frozen prefix: layers below the lowest delta, run without dropout, optionally cached.
    let k = crate::attach::frozen_prefix_layers(&model.backbone);
    let prefix_fixed = k > 0 && (cfg.cache_frozen || !cfg.frozen_prefix_dropout);
    let mut cache_seconds = 0f64;
    let cache = if cfg.cache_frozen && k > 0 {
        let t = Instant::now();
        let c = super::cache::FrozenCache::build(&model.backbone, o.train, k, cfg.eval_batch_size, o.pad_id, cfg.cache_mb << 20, spill_dir)?;
        ctl.message(format!(
            "cached layers 0-{} for {} examples in {:.1} s ({:.0} MiB in memory, {:.0} MiB on disk)",
            k - 1,
            o.train.len(),
            t.elapsed().as_secs_f64(),
            c.bytes_in_memory as f64 / 1048576.0,
            c.bytes_on_disk as f64 / 1048576.0
        ));
        cache_seconds = t.elapsed().as_secs_f64();
        Some(c)
    } else {
        if cfg.cache_frozen {
            ctl.message("note: a delta sits below the first layer; nothing to cache");
        }
        None
    };
    let mut acc = GradAccumulator::default();
    let mut trainers = crate::attach::group_trainers(&model.backbone, &model.specs)?;
    let mut best_scores: Option<Scores> = None;
    let mut stopped_early = false;
    let mut recent_loss: Vec<f64> = Vec::new();
    let save_ckpt = |st: &LoopState, opt: &AdamW, model: &TaskModel| -> Result<()> {
        if !writer {
            return Ok(());
        }
        let (moments, _) = opt.state();
        // A checkpoint is only ever the last *good* state: refuse to write non-finite values.
        for (name, t) in moments.iter().chain(params.iter().map(|(n, v)| (n, v.as_tensor()))) {
            if !finite(t)? {
                return Err(Error::NonFinite(format!(
                    "`{name}` is no longer finite at step {} (try a lower --lr, now {}); {}",
                    st.step,
                    cfg.lr,
                    resume_hint(o.run_dir, o.final_dir)
                )));
            }
        }
        checkpoint::save(o.run_dir, st, &moments, |d| model.save(d, &o.meta))
    };
    // A checkpoint before the first step: a kill at any moment leaves something to resume.
    if resumed_from.is_none() {
        save_ckpt(&st, &opt, model)?;
    }

    let mut epoch_train = 0f64; // training seconds in the current epoch (evaluations excluded)
    ctl.emit(Event::Start { what: "training".into(), total, done: st.step });
    let result = (|| -> Result<()> {
    'epochs: while st.step < total {
        let order = batch_order(&lengths, cfg.batch_size, cfg.seed, st.epoch as u64, cfg.bucketed);
        while st.next_batch < order.len() {
            let step_t0 = Instant::now();
            let group_end = (st.next_batch + cfg.grad_accum).min(order.len());
            let group_examples: usize = order[st.next_batch..group_end].iter().map(|b| b.len()).sum();
            let mut loss_sum = 0f64;
            for (mb, whole) in order.iter().enumerate().take(group_end).skip(st.next_batch) {
                // This rank's rows of the micro-batch (all of them alone), padded like the whole.
                let rows = dist::shard(whole.len(), rank, ranks);
                let idx = &whole[rows.clone()];
                if idx.is_empty() {
                    continue;
                }
                let padding = if ranks > 1 { Padding::Fixed(o.train.longest(whole)) } else { Padding::Longest };
                let (batch, targets) = o.train.batch_padded(idx, kind, o.pad_id, padding, &device)?;
                let key = DropoutKey(cfg.seed).derive("train").derive_n(st.step as u64).derive_n(mb as u64);
                let ctx = ForwardCtx::train(key);
                let logits = crate::ops::in_batch_rows(rows.start, rows.len(), || -> Result<_> {
                    Ok(match (&cache, prefix_fixed) {
                        (Some(c), _) => {
                            let (h, m) = c.batch_to(idx, if ranks > 1 { o.train.longest(whole) } else { 0 }, &device)?;
                            model.head.forward(&model.backbone.forward_layers(h, m, 0, k, &ctx, Vec::new())?)?
                        }
                        (None, true) => {
                            let (h, m, nv) = model.backbone.forward_until(&batch, k, &ForwardCtx::eval(), &mut Vec::new())?;
                            model.head.forward(&model.backbone.forward_layers(h, m, nv, k, &ctx, Vec::new())?)?
                        }
                        (None, false) => model.logits(&batch, &ctx)?,
                    })
                })?;
                let loss = model.head.loss(&logits, &targets)?;
                let lv = loss.to_scalar::<f32>()? as f64;
                if !lv.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "training loss is {lv} at step {} (epoch {}, batch {mb}); stopped — try a lower --lr (now {}) or --max-grad-norm; {}",
                        st.step + 1,
                        st.epoch,
                        cfg.lr,
                        resume_hint(o.run_dir, o.final_dir)
                    )));
                }
                // Weight each micro-batch by its share of examples: accumulation = one big batch.
                // Group regularizers (AdaLoRA's orthogonality) count once per step in all.
                let share = idx.len() as f64 / group_examples as f64;
                let mut total_loss = (loss * share)?;
                for t in &trainers {
                    if let Some(r) = t.regularizer()? {
                        total_loss = (total_loss + (r * share)?)?;
                    }
                }
                let grads = total_loss.backward()?;
                acc.add(&params, &grads)?;
                loss_sum += lv * idx.len() as f64;
            }
            let mut grads = acc.take(1.0)?;
            // Data-parallel: the sum of every rank's gradients (each already weighted by its
            // share of the step's examples) is the whole step's gradient.
            let mut stop_all = ctl.cancelled();
            let comm_before = exchange.as_ref().map(|e| e.comm);
            if let (Some(w), Some(ex)) = (world, exchange.as_mut()) {
                let totals = StepTotals { loss_sum, count: 0.0, stop: stop_all };
                let (g, t) = ex.all_reduce(w, grads, totals, &device)?;
                grads = g;
                loss_sum = t.loss_sum;
                stop_all = t.stop;
            }
            let comm_s = exchange.as_ref().zip(comm_before).map(|(e, b)| (e.comm - b).as_secs_f64());
            let norm = match cfg.max_grad_norm {
                Some(m) => clip_grad_norm(&mut grads, m)?,
                None => global_norm(&grads)?,
            };
            if !norm.is_finite() {
                return Err(Error::NonFinite(format!(
                    "gradient norm is {norm} at step {}; stopped — try a lower --lr (now {}); {}",
                    st.step + 1,
                    cfg.lr,
                    resume_hint(o.run_dir, o.final_dir)
                )));
            }
            let lr = lr_at(cfg.lr, st.step, total, warmup, cfg.decay);
            opt.step(&grads, lr)?;
            st.step += 1;
            for t in &mut trainers {
                t.after_step(st.step, total, &grads)?;
            }
            st.next_batch = group_end;
            st.examples += group_examples;
            let loss = loss_sum / group_examples as f64;
            recent_loss.push(loss);
            let secs = t0.elapsed().as_secs_f64();
            let eps = (st.examples - examples0) as f64 / secs.max(1e-9);
            write(&mut log, &Record::Train { step: st.step, epoch: st.epoch, loss, lr, grad_norm: norm, examples_per_s: eps, elapsed_s: elapsed0 + secs, comm_s })?;
            let steps_done = (st.step - resumed_from.unwrap_or(0)).max(1);
            let eta_s = secs / steps_done as f64 * (total - st.step) as f64;
            ctl.emit(Event::Step { step: st.step, total, loss, lr, examples_per_s: eps, eta_s });

            epoch_train += step_t0.elapsed().as_secs_f64();
            let epoch_done = st.next_batch >= order.len();
            if epoch_done {
                let secs = epoch_train + if st.epoch == 0 { cache_seconds } else { 0.0 };
                write(&mut log, &Record::Epoch { step: st.step, epoch: st.epoch, train_seconds: secs })?;
                epoch_train = 0.0;
            }
            let eval_due = o.dev.is_some() && (cfg.eval_every.map_or(epoch_done, |e| st.step.is_multiple_of(e)) || st.step == total);
            if let (true, Some(dev)) = (eval_due, o.dev) {
                // Rank 0 evaluates; the others take its score (the models are identical).
                let (scores, ev_loss) = if writer {
                    let ev = evaluate(model, dev, cfg.eval_batch_size, o.pad_id, o.scorer)?;
                    (ev.scores.clone().unwrap_or(Scores { primary: String::new(), values: Default::default() }), ev.loss)
                } else {
                    (Scores { primary: String::new(), values: Default::default() }, 0.0)
                };
                let (score, ev_loss) = match world {
                    Some(w) => {
                        let mut b = [scores.primary_value(), ev_loss];
                        w.broadcast_f64(&mut b)?;
                        (b[0], b[1])
                    }
                    None => (scores.primary_value(), ev_loss),
                };
                let values: Map<String, Value> = scores.values.iter().map(|(k, v)| (k.clone(), Value::from(*v))).collect();
                write(&mut log, &Record::Eval { step: st.step, epoch: st.epoch, metric: scores.primary.clone(), score, scores: values, loss: ev_loss })?;
                let improved = st.best_score.is_none_or(|b| score > b);
                ctl.emit(Event::Eval { step: st.step, metric: scores.primary.clone(), score, loss: ev_loss, best: improved });
                if improved {
                    if writer {
                        model.save(&o.run_dir.join("best"), &o.meta)?;
                    }
                    st.best_score = Some(score);
                    st.best_step = Some(st.step);
                    st.evals_since_best = 0;
                    best_scores = Some(scores);
                } else {
                    st.evals_since_best += 1;
                }
            }
            if epoch_done {
                st.epoch += 1;
                st.next_batch = 0;
            }
            let stop_early = cfg.patience.is_some_and(|p| st.evals_since_best >= p);
            // Alone: the flag now; data-parallel: whether any rank had it at this step's exchange,
            // so that all ranks stop after the same step.
            let cancelled = if world.is_some() { stop_all } else { ctl.cancelled() };
            if st.step.is_multiple_of(cfg.checkpoint_every) || eval_due || st.step >= total || epoch_done || stop_early || cancelled {
                st.elapsed_s = elapsed0 + t0.elapsed().as_secs_f64();
                save_ckpt(&st, &opt, model)?;
                if let Some(l) = log.as_mut() {
                    l.flush()?;
                }
            }
            if cancelled {
                return Err(Error::Cancelled(format!("at step {}/{total}; {}", st.step, resume_hint(o.run_dir, o.final_dir))));
            }
            if stop_early {
                ctl.message(format!("early stop: no improvement in {} evaluations", st.evals_since_best));
                stopped_early = true;
                break 'epochs;
            }
            if st.step >= total {
                break 'epochs;
            }
            if epoch_done {
                break;
            }
        }
    }
    Ok(())
    })();
    ctl.emit(Event::Finish);
    result?;
    let reports: Vec<String> = trainers.iter().filter_map(|t| t.report()).collect();
    for r in &reports {
        ctl.message(r.clone());
    }
    if writer {
        model.save(&o.run_dir.join("final"), &o.meta)?;
        if o.dev.is_none() {
            model.save(&o.run_dir.join("best"), &o.meta)?;
        }
    }
    if writer && best_scores.is_none() && st.best_score.is_some() {
        // Resumed after the best evaluation: recover its scores from the log.
        best_scores = super::log::read_records(&o.run_dir.join("metrics.jsonl"))?.into_iter().rev().find_map(|r| match r {
            Record::Eval { step, metric, scores, .. } if Some(step) == st.best_step => Some(Scores {
                primary: metric,
                values: scores.into_iter().filter_map(|(k, v)| v.as_f64().map(|f| (k, f))).collect(),
            }),
            _ => None,
        });
    }
    let tail = recent_loss.len().saturating_sub(50);
    Ok(FitResult {
        steps: st.step,
        examples: st.examples,
        seconds: elapsed0 + t0.elapsed().as_secs_f64(),
        best_score: st.best_score,
        best_step: st.best_step,
        best_scores,
        stopped_early,
        resumed_from,
        reports,
        ranks,
        comm_seconds: exchange.map_or(0.0, |e| e.comm.as_secs_f64()),
        final_train_loss: (!recent_loss.is_empty()).then(|| recent_loss[tail..].iter().sum::<f64>() / (recent_loss.len() - tail) as f64),
    })
}
