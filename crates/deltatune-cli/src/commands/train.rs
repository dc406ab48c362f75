//! `deltatune train`: deltas + head on a real task, resumable, with progress and a summary.

use crate::args::TrainArgs;
use anyhow::{Context, Result};
use deltatune::api::{self, Cancel, DeltaSource, RunMode, TrainSpec};
use deltatune::train::optim::{AdamWConfig, DecayRule};
use deltatune::train::TrainConfig;

pub fn run(a: TrainArgs, cancel: &Cancel, world: Option<&dyn deltatune::dist::Collective>) -> Result<()> {
    let data = super::data_source(&a.data).ok_or_else(|| {
        anyhow::anyhow!("invalid --task/--data: name a task (--task sst2, --task bbc-news) or give --data PATH / --train FILE")
    })?;
    let (specs, dirs) = DeltaSource::split(&super::delta_sources(&a.deltas)?);
    if !dirs.is_empty() {
        anyhow::bail!("invalid --delta: training starts from delta specs (e.g. lora:r=8), not saved deltas");
    }
    if !(a.max_grad_norm.is_finite() && a.max_grad_norm >= 0.0) {
        anyhow::bail!("invalid --max-grad-norm: {} (expected a positive number, or 0 for no clipping)", a.max_grad_norm);
    }
    let train = TrainConfig {
        lr: a.lr,
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        warmup_ratio: a.warmup_ratio,
        warmup_steps: a.warmup_steps,
        decay: a.schedule,
        adamw: AdamWConfig {
            weight_decay: a.weight_decay,
            decay_rule: if a.decay_all { DecayRule::All } else { DecayRule::NotBiasOrNorm },
            ..Default::default()
        },
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        max_length: a.max_length,
        seed: a.deltas.seed,
        eval_every: a.eval_every,
        eval_batch_size: a.eval_batch_size,
        patience: a.patience,
        bucketed: !a.no_bucket,
        dropout: !a.no_dropout,
        checkpoint_every: a.checkpoint_every,
        pooling: a.pooling,
        cache_frozen: a.cache_frozen,
        frozen_prefix_dropout: !a.no_frozen_dropout && !a.cache_frozen,
        cache_mb: a.cache_mb,
    };
    let model = super::with_control(a.quiet, None, |ctl| api::encoder_dir(a.model.model.as_deref(), ctl))?;
    let model = std::path::absolute(&model).with_context(|| format!("resolving --model {}", model.display()))?;
    let method = specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join("+");
    let out = a.out.clone().unwrap_or_else(|| format!("runs/{}-{}-s{}", data.label(), method, a.deltas.seed).into());
    let spec = TrainSpec { model, data, data_options: super::task_options(&a.data), deltas: specs, train };
    let mode = if a.resume {
        RunMode::Resume
    } else if a.overwrite {
        RunMode::Overwrite
    } else {
        RunMode::Fresh
    };
    let s = super::train_ranks(a.data_parallel, a.quiet, cancel, world, |ctl| api::train(&spec, &out, mode, ctl))?;
    if world.is_some_and(|w| w.rank() > 0) {
        return Ok(()); // rank 0 reports the run
    }
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!(
            "{}: {} {} = {:.4} (best at step {}, {} steps, {:.0} s)",
            s.task,
            s.method,
            s.metric,
            s.score,
            s.best_step.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
            s.steps,
            s.seconds
        );
        let others: Vec<String> = s.scores.iter().filter(|(k, _)| **k != s.metric).map(|(k, v)| format!("{k} {v:.4}")).collect();
        if !others.is_empty() {
            println!("  also: {}", others.join(", "));
        }
        println!(
            "  trainable {} of {} parameters (delta {} + head); run in {}",
            s.trainable_params,
            s.total_params,
            s.delta_params,
            s.run_dir.display()
        );
        if s.ranks > 1 {
            println!("  data-parallel over {} ranks; {:.1} s exchanging gradients", s.ranks, s.comm_seconds);
        }
    }
    Ok(())
}
