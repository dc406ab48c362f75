//! `deltatune train-lm`: deltas on a decoder LM with the causal-LM loss on completions.

use crate::args::TrainLmArgs;
use anyhow::{Context, Result};
use deltatune::attach::{self, AttachOptions};
use deltatune::data::readers::load_task;
use deltatune::delta::{store, DeltaSpec};
use deltatune::lm::train::{self as lmt, LmTrainConfig, Verbalizer};
use deltatune::lm::CausalLm;
use deltatune::{assets, Device, TaskOptions};
use serde_json::json;
use std::time::Instant;

pub fn run(a: TrainLmArgs) -> Result<()> {
    let path = match &a.model {
        Some(p) => p.clone(),
        None => assets::default_decoder(&mut super::progress)?,
    };
    let mut lm = CausalLm::load(&path, &Device::Cpu).with_context(|| format!("loading {}", path.display()))?;
    let specs: Vec<DeltaSpec> = if a.delta.is_empty() {
        vec![DeltaSpec::parse_cli("lora:r=8,lora_alpha=16,target=q_proj+v_proj")?]
    } else {
        a.delta.iter().map(|s| DeltaSpec::parse_cli(s)).collect::<deltatune::Result<_>>()?
    };
    // What to train on and how to score it.
    enum Eval {
        Accuracy(Verbalizer, Vec<deltatune::Example>),
        Perplexity(Vec<lmt::LmPair>),
    }
    let (pairs, eval, what) = match (&a.task, &a.train) {
        (Some(task), None) => {
            let opts = TaskOptions { seed: 42, max_train: a.max_train, max_dev: a.max_dev, ..Default::default() };
            let data = load_task(task, &a.data_dir, &opts)?;
            let mut v = Verbalizer::for_task(&data).or_else(|e| match (&a.template, &a.verbalizer) {
                (Some(_), Some(_)) => Ok(Verbalizer { template: String::new(), words: Vec::new() }),
                _ => Err(e),
            })?;
            if let Some(t) = &a.template {
                v.template = t.clone();
            }
            if let Some(spec) = &a.verbalizer {
                let labels = data.labels.as_ref().context("--verbalizer needs a classification task")?;
                let mut words = vec![String::new(); labels.len()];
                for item in spec.split(',') {
                    let (l, w) = item.split_once('=').with_context(|| format!("invalid --verbalizer: `{item}` is not label=words"))?;
                    let i = labels.index(l.trim()).with_context(|| format!("invalid --verbalizer: unknown label `{l}`"))?;
                    words[i] = w.to_string();
                }
                if let Some(i) = words.iter().position(|w| w.is_empty()) {
                    anyhow::bail!("invalid --verbalizer: no words for label `{}`", labels.name(i).unwrap_or("?"));
                }
                v.words = words;
            }
            if a.chat {
                // The filled-in template is the user's message; the label words are the reply.
                v.template = lm.tokenizer.chat_prompt(&[("user", &v.template)])?;
                v.words = v.words.iter().map(|w| w.trim_start().to_string()).collect();
            }
            (v.pairs(&data.train)?, Eval::Accuracy(v, data.dev.clone()), format!("{} ({} train, {} dev)", data.name, data.train.len(), data.dev.len()))
        }
        (None, Some(train)) => {
            let chat = a.chat.then_some(&lm.tokenizer);
            let mut pairs = lmt::read_jsonl(train, chat)?;
            if let Some(n) = a.max_train {
                pairs.truncate(n);
            }
            let mut dev = match &a.dev {
                Some(d) => lmt::read_jsonl(d, chat)?,
                None => pairs.clone(),
            };
            if let Some(n) = a.max_dev {
                dev.truncate(n);
            }
            let what = format!("{} ({} pairs)", train.display(), pairs.len());
            (pairs, Eval::Perplexity(dev), what)
        }
        _ => anyhow::bail!("give --task or --train"),
    };
    let score = |lm: &CausalLm| -> Result<(String, f64)> {
        Ok(match &eval {
            Eval::Accuracy(v, dev) => ("accuracy".into(), lmt::verbalizer_accuracy(&lm.model, &lm.tokenizer, v, dev, 16, a.max_length)?),
            Eval::Perplexity(dev) => ("perplexity".into(), lmt::perplexity(&lm.model, &lm.tokenizer, dev, 8, a.max_length)?),
        })
    };
    let baseline = if a.no_baseline { None } else { Some(score(&lm)?) };
    if let (Some((m, v)), false) = (&baseline, a.json) {
        eprintln!("untuned {m}: {v:.4}");
    }
    attach::attach(&mut lm.model, &specs, AttachOptions { seed: a.seed, tokenizer: None })?;
    let trainable = attach::count_trainable(&lm.model);
    let cfg = LmTrainConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        max_length: a.max_length,
        seed: a.seed,
        pack: a.pack,
        ..Default::default()
    };
    let rows = lmt::training_rows(&lm.tokenizer, &pairs, &cfg)?;
    let steps = rows.len().div_ceil(a.batch_size.max(1)) * a.epochs;
    let packed = if a.pack { format!(", packed into {} rows of {} tokens", rows.len(), a.max_length) } else { String::new() };
    if !a.json {
        eprintln!("training {trainable} parameters on {what}{packed}: {steps} steps");
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    if a.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let t0 = Instant::now();
    let log = lmt::train_rows(&lm.model, lm.tokenizer.pad_id.unwrap_or(0), &rows, &cfg, &mut |s| {
        bar.set_message(format!("loss {:.4}", s.loss));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    let train_seconds = t0.elapsed().as_secs_f64();
    let (metric, after) = score(&lm)?;
    let result = json!({
        "model": path.display().to_string(),
        "data": what,
        "trainable_params": trainable,
        "steps": log.len(),
        "rows": rows.len(),
        "first_loss": log.first().map(|s| s.loss),
        "last_loss": log.last().map(|s| s.loss),
        "train_seconds": (train_seconds * 10.0).round() / 10.0,
        "metric": metric,
        "before": baseline.as_ref().map(|b| b.1),
        "after": after,
        "config": cfg,
    });
    if let Some(out) = &a.out {
        let mut meta = serde_json::Map::new();
        meta.insert("train_lm".into(), result.clone());
        store::save(out, &lm.model, &specs, &Default::default(), &meta)?;
        let mut lines = String::new();
        for s in &log {
            lines.push_str(&serde_json::to_string(s)?);
            lines.push('\n');
        }
        deltatune::io::write_atomic(&out.join("metrics.jsonl"), lines.as_bytes())?;
    }
    if a.json {
        println!("{result}");
    } else {
        match &baseline {
            Some((_, b)) => println!("{metric}: {b:.4} -> {after:.4} after {} steps ({train_seconds:.0} s)", log.len()),
            None => println!("{metric}: {after:.4} after {} steps ({train_seconds:.0} s)", log.len()),
        }
    }
    Ok(())
}
