//! The decoder training job: deltas on a causal LM trained on completions — a classification task
//! as text-to-text (scored by verbalizer accuracy) or prompt/completion pairs (scored by
//! perplexity) — before/after scores, and the trained deltas saved with their metrics.

use super::common::decoder_path;
use crate::artifacts::delta_dir;
use crate::attach::{self, AttachOptions};
use crate::control::Control;
use crate::data::readers::load_task;
use crate::data::task::{Example, TaskOptions};
use crate::delta::DeltaSpec;
use crate::error::{Error, Result};
use crate::io::atomic::{check_output, StagedDir};
use crate::lm::causal::CausalLm;
use crate::train::lm::{self as lmt, LmPair, LmTrainConfig, Verbalizer};
use candle_core::Device;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// What a decoder trains on.
#[derive(Clone, Debug)]
pub enum LmData {
    /// A named classification task from a data root, as text-to-text: `template` (with `{text}`,
    /// `{text_b}`) and label words (`verbalizer`: one entry per label, in label order, or given
    /// as `label=words` pairs) override the task's defaults.
    Task { name: String, root: PathBuf, template: Option<String>, verbalizer: Option<Vec<(String, String)>> },
    /// JSONL prompt/completion pairs (or `text` lines, or with `chat` `messages` conversations);
    /// `dev` defaults to the training pairs.
    Pairs { train: PathBuf, dev: Option<PathBuf> },
}

/// `deltatune train-lm`.
#[derive(Clone, Debug)]
pub struct TrainLmSpec {
    pub model: Option<PathBuf>,
    /// Deltas to train (empty: LoRA r = 8, lora_alpha 16 on q_proj and v_proj).
    pub deltas: Vec<DeltaSpec>,
    pub data: LmData,
    pub max_train: Option<usize>,
    pub max_dev: Option<usize>,
    /// Apply the model's chat format (prompt = the user's turn, completion = the reply).
    pub chat: bool,
    pub config: LmTrainConfig,
    /// Score the untuned model first.
    pub baseline: bool,
    /// Where to save the trained deltas and `metrics.jsonl`.
    pub out: Option<PathBuf>,
    /// Replace an existing non-empty `out`.
    pub overwrite: bool,
}

/// What a decoder training run did (also saved with the deltas).
#[derive(Clone, Debug, Serialize)]
pub struct TrainLmResult {
    pub model: String,
    pub data: String,
    pub trainable_params: usize,
    pub steps: usize,
    pub rows: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub train_seconds: f64,
    /// `accuracy` (tasks) or `perplexity` (pairs).
    pub metric: String,
    pub before: Option<f64>,
    pub after: f64,
    pub config: LmTrainConfig,
    /// Processes that trained together (1 alone).
    pub ranks: usize,
    /// Seconds spent exchanging gradients between ranks (0 alone).
    pub comm_seconds: f64,
}

enum Eval {
    Accuracy(Verbalizer, Vec<Example>),
    Perplexity(Vec<LmPair>),
}

/// Runs `train-lm`. Data-parallel when `ctl` has a world of several ranks: every rank loads
/// and checks everything and the ranks agree on it before the first step; rank 0 alone scores
/// the model and writes `out` (the other ranks return `after` = NaN).
pub fn train_lm(spec: &TrainLmSpec, ctl: &Control) -> Result<TrainLmResult> {
    let p = crate::dist::agree(ctl.world, "loading the model and data", prepare(spec, ctl))?;
    let mut h = crate::ops::hash_str(&format!("{:?}{:?}", spec.config, p.specs));
    for r in &p.rows {
        for (&id, &t) in r.ids.iter().zip(&r.target) {
            h = (h ^ (u64::from(id) << 1 | u64::from(t))).wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    crate::dist::check_same(ctl.world, "settings or data", h)?;
    let LmPrepared { lm, specs, rows, eval, what, path, baseline, trainable } = p;
    let max_length = spec.config.max_length;
    let t0 = Instant::now();
    let log = lmt::train_rows(&lm.model, &specs, lm.tokenizer.pad_id.unwrap_or(0), &rows, &spec.config, ctl)?;
    let train_seconds = t0.elapsed().as_secs_f64();
    let (metric, after) = if ctl.writes() { score(&lm, &eval, max_length)? } else { (String::new(), f64::NAN) };
    let result = TrainLmResult {
        model: path.display().to_string(),
        data: what,
        trainable_params: trainable,
        steps: log.len(),
        rows: rows.len(),
        first_loss: log.first().map(|s| s.loss),
        last_loss: log.last().map(|s| s.loss),
        train_seconds: (train_seconds * 10.0).round() / 10.0,
        metric,
        before: baseline.as_ref().map(|b| b.1),
        after,
        config: spec.config.clone(),
        ranks: ctl.rank_size().1,
        comm_seconds: (log.iter().filter_map(|s| s.comm_s).sum::<f64>() * 1000.0).round() / 1000.0,
    };
    if let (Some(out), true) = (&spec.out, ctl.writes()) {
        // The delta and its metrics are written side by side in one staging directory, moved
        // into place together.
        let staging = StagedDir::new(out)?;
        let mut meta = serde_json::Map::new();
        meta.insert("train_lm".into(), serde_json::to_value(&result).map_err(|e| Error::Delta(e.to_string()))?);
        delta_dir::write_into(staging.path(), &lm.model, &specs, &Default::default(), &meta)?;
        let mut lines = String::new();
        for s in &log {
            lines.push_str(&serde_json::to_string(s).map_err(|e| Error::Delta(e.to_string()))?);
            lines.push('\n');
        }
        crate::io::atomic::write_atomic(&staging.path().join("metrics.jsonl"), lines.as_bytes())?;
        staging.commit(spec.overwrite)?;
    }
    Ok(result)
}

/// The metric of `eval` on the model as it is now.
fn score(lm: &CausalLm, eval: &Eval, max_length: usize) -> Result<(String, f64)> {
    Ok(match eval {
        Eval::Accuracy(v, dev) => ("accuracy".into(), lmt::verbalizer_accuracy(&lm.model, &lm.tokenizer, v, dev, 16, max_length)?),
        Eval::Perplexity(dev) => ("perplexity".into(), lmt::perplexity(&lm.model, &lm.tokenizer, dev, 8, max_length)?),
    })
}

/// What every rank loads before training.
struct LmPrepared {
    lm: CausalLm,
    specs: Vec<DeltaSpec>,
    rows: Vec<lmt::LmRow>,
    eval: Eval,
    what: String,
    path: PathBuf,
    baseline: Option<(String, f64)>,
    trainable: usize,
}

/// Everything before the first step (every rank does it): the model, the data, the deltas, and
/// rank 0's untuned score.
fn prepare(spec: &TrainLmSpec, ctl: &Control) -> Result<LmPrepared> {
    spec.config.validate()?;
    let path = decoder_path(spec.model.as_deref(), ctl)?;
    if let Some(out) = &spec.out {
        let mut inputs: Vec<(&str, &std::path::Path)> = vec![("--model", path.as_path())];
        match &spec.data {
            LmData::Task { root, .. } => inputs.push(("--data-dir", root.as_path())),
            LmData::Pairs { train, dev } => {
                inputs.push(("--train", train.as_path()));
                inputs.extend(dev.as_deref().map(|d| ("--dev", d)));
            }
        }
        check_output(out, "--out", spec.overwrite, &inputs)?;
    }
    if let LmData::Task { template: Some(t), .. } = &spec.data {
        if !t.contains("{text}") {
            return Err(Error::arg("--template", format!("`{t}` has no {{text}} placeholder, so every prompt would be the same")));
        }
    }
    let mut lm = CausalLm::load(&path, &Device::Cpu)?;
    let specs: Vec<DeltaSpec> = if spec.deltas.is_empty() { vec![DeltaSpec::parse_cli("lora:r=8,lora_alpha=16,target=q_proj+v_proj")?] } else { spec.deltas.clone() };
    let (pairs, eval, what) = match &spec.data {
        LmData::Task { name, root, template, verbalizer } => {
            let opts = TaskOptions { seed: 42, max_train: spec.max_train, max_dev: spec.max_dev, ..Default::default() };
            let data = load_task(name, root, &opts)?;
            let mut v = Verbalizer::for_task(&data).or_else(|e| match (template, verbalizer) {
                (Some(_), Some(_)) => Ok(Verbalizer { template: String::new(), words: Vec::new() }),
                _ => Err(e),
            })?;
            if let Some(t) = template {
                v.template = t.clone();
            }
            if let Some(items) = verbalizer {
                let labels = data.labels.as_ref().ok_or_else(|| Error::arg("--verbalizer", "needs a classification task"))?;
                let mut words = vec![String::new(); labels.len()];
                for (l, w) in items {
                    let i = labels.index(l.trim()).ok_or_else(|| Error::arg("--verbalizer", format!("unknown label `{l}`")))?;
                    words[i] = w.clone();
                }
                if let Some(i) = words.iter().position(|w| w.is_empty()) {
                    return Err(Error::arg("--verbalizer", format!("no words for label `{}`", labels.name(i).unwrap_or("?"))));
                }
                v.words = words;
            }
            if spec.chat {
                // The filled-in template is the user's message; the label words are the reply.
                v.template = lm.tokenizer.chat_prompt(&[("user", &v.template)])?;
                v.words = v.words.iter().map(|w| w.trim_start().to_string()).collect();
            }
            let what = format!("{} ({} train, {} dev)", data.name, data.train.len(), data.dev.len());
            (v.pairs(&data.train)?, Eval::Accuracy(v, data.dev.clone()), what)
        }
        LmData::Pairs { train, dev } => {
            let chat = spec.chat.then_some(&lm.tokenizer);
            let mut pairs = lmt::read_jsonl(train, chat)?;
            if let Some(n) = spec.max_train {
                pairs.truncate(n);
            }
            let mut dev_pairs = match dev {
                Some(d) => lmt::read_jsonl(d, chat)?,
                None => pairs.clone(),
            };
            if let Some(n) = spec.max_dev {
                dev_pairs.truncate(n);
            }
            let what = format!("{} ({} pairs)", train.display(), pairs.len());
            (pairs, Eval::Perplexity(dev_pairs), what)
        }
    };
    let max_length = spec.config.max_length;
    let baseline = if spec.baseline && ctl.writes() { Some(score(&lm, &eval, max_length)?) } else { None };
    if let Some((m, v)) = &baseline {
        ctl.message(format!("untuned {m}: {v:.4}"));
    }
    attach::attach(&mut lm.model, &specs, AttachOptions { seed: spec.config.seed, tokenizer: None })?;
    let trainable = attach::count_trainable(&lm.model);
    let rows = lmt::training_rows(&lm.tokenizer, &pairs, &spec.config)?;
    let packed = if spec.config.pack { format!(", packed into {} rows of {} tokens", rows.len(), max_length) } else { String::new() };
    let steps = rows.len().div_ceil(spec.config.batch_size.max(1)) * spec.config.epochs;
    ctl.message(format!("training {trainable} parameters on {what}{packed}: {steps} steps"));
    Ok(LmPrepared { lm, specs, rows, eval, what, path, baseline, trainable })
}
