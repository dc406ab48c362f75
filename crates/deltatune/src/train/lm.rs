//! Causal-LM training of deltas on a decoder: (prompt, completion) pairs, plain text or chat
//! conversations, with the loss on the completion tokens only; the chat template applied on
//! request; right padding or packing into full-length rows; AdamW with warm-up and linear decay;
//! perplexity; and classification as text-to-text with a verbalizer (the label whose words the
//! model finds most likely after the prompt).

use crate::lm::LmTokenizer;
use crate::attach;
use crate::control::{Control, Event};
use crate::backbone::llama::LlamaModel;
use crate::core::ForwardCtx;
use crate::data::task::{Example, TaskData};
use crate::delta::DeltaSpec;
use crate::error::{check, Error, Result};
use crate::ops::{self, DropoutKey};
use super::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig, Decay};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::path::Path;

/// One training or evaluation example: the model reads `prompt` and learns to write `completion`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LmPair {
    pub prompt: String,
    pub completion: String,
}

/// The end-of-turn marker of the ChatML template (SmolLM2, Qwen), closing their chat completions.
pub const END_OF_TURN: &str = "<|im_end|>";

impl LmPair {
    /// The pair as one chat turn: the prompt as the user's message in the model's chat template
    /// (with the assistant header), the completion closed by the end-of-turn marker.
    pub fn to_chat(&self, tok: &LmTokenizer) -> Result<LmPair> {
        let before = [("user", self.prompt.as_str())];
        Ok(LmPair { prompt: tok.chat_prompt(&before)?, completion: tok.chat_completion(&before, &self.completion)? })
    }
}

/// Reads JSONL of `{"prompt": ..., "completion": ...}`, `{"text": ...}` (plain text: every token
/// is a target) or `{"messages": [{"role": ..., "content": ...}, ...]}` (a conversation ending
/// with the assistant's turn, the target). With `chat` (the model's tokenizer), prompt/completion
/// pairs become chat turns ([`LmPair::to_chat`]) and conversations go through the chat template;
/// conversations need it. Bad lines are errors naming the line.
pub fn read_jsonl(path: &Path, chat: Option<&LmTokenizer>) -> Result<Vec<LmPair>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::Data { file: path.to_path_buf(), line: i + 1, col: None, msg };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let pair = match (field("prompt"), field("completion"), field("text"), v.get("messages")) {
            (Some(p), Some(c), _, _) => {
                let pair = LmPair { prompt: p, completion: c };
                match chat {
                    Some(tok) => pair.to_chat(tok).map_err(|e| bad(e.to_string()))?,
                    None => pair,
                }
            }
            (None, None, Some(t), _) => LmPair { prompt: String::new(), completion: t },
            (None, None, None, Some(m)) => {
                let tok = chat.ok_or_else(|| bad("`messages` needs the chat template (--chat)".into()))?;
                conversation(tok, m).map_err(bad)?
            }
            _ => return Err(bad("expected string fields `prompt` and `completion`, `text`, or a `messages` list".into())),
        };
        if pair.completion.is_empty() {
            return Err(bad("empty completion".into()));
        }
        out.push(pair);
    }
    if out.is_empty() {
        return Err(Error::DataFile { file: path.to_path_buf(), msg: "no examples".into() });
    }
    Ok(out)
}

/// A `messages` list as a chat pair: the turns before the last in the chat template, the last
/// (the assistant's) as the completion.
fn conversation(tok: &LmTokenizer, m: &serde_json::Value) -> std::result::Result<LmPair, String> {
    let list = m.as_array().ok_or("`messages` must be a list")?;
    let mut turns = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let get = |k: &str| t.get(k).and_then(|x| x.as_str()).ok_or(format!("message {i} has no string `{k}`"));
        let role = get("role")?;
        if !matches!(role, "system" | "user" | "assistant") {
            return Err(format!("message {i} has role `{role}` (expected system, user or assistant)"));
        }
        turns.push((role, get("content")?));
    }
    match turns.split_last() {
        Some(((role, content), before)) if *role == "assistant" && !before.is_empty() => {
            let prompt = tok.chat_prompt(before).map_err(|e| e.to_string())?;
            let completion = tok.chat_completion(before, content).map_err(|e| e.to_string())?;
            Ok(LmPair { prompt, completion })
        }
        _ => Err("`messages` must end with an assistant turn after at least one other".into()),
    }
}

/// How a classification example becomes text: `template` with `{text}` (and `{text_b}`), and one
/// verbalizer (answer words) per label index.
#[derive(Clone, Debug, Serialize)]
pub struct Verbalizer {
    pub template: String,
    pub words: Vec<String>,
}

impl Verbalizer {
    /// Defaults for the sentiment, acceptability, entailment and question-type tasks of the shared
    /// data.
    pub fn for_task(task: &TaskData) -> Result<Self> {
        let labels = task.labels.as_ref().ok_or_else(|| Error::arg("--task", format!("{} is a regression task", task.name)))?;
        let (template, by_name): (&str, &[(&str, &str)]) = match task.name.as_str() {
            "sst2" | "mr" | "cr" => ("Review: {text}\nSentiment:", &[("0", " negative"), ("1", " positive")]),
            "cola" => ("Sentence: {text}\nIs this sentence grammatical? Answer:", &[("0", " no"), ("1", " yes")]),
            "rte" => (
                "{text}\nQuestion: Does this imply that \"{text_b}\"? Answer:",
                &[("entailment", " yes"), ("not_entailment", " no")],
            ),
            "trec" => (
                "Question: {text}\nThe answer is a kind of:",
                &[("ABBR", " abbreviation"), ("DESC", " description"), ("ENTY", " thing"), ("HUM", " person"), ("LOC", " place"), ("NUM", " number")],
            ),
            other => {
                return Err(Error::arg(
                    "--verbalizer",
                    format!("no default verbalizer for `{other}`; pass --template and --verbalizer label=words,..."),
                ))
            }
        };
        let mut words = vec![String::new(); labels.len()];
        for (name, w) in by_name {
            if let Some(i) = labels.index(name) {
                words[i] = w.to_string();
            }
        }
        if let Some(i) = words.iter().position(|w| w.is_empty()) {
            return Err(Error::arg("--verbalizer", format!("no words for label `{}`", labels.name(i).unwrap_or("?"))));
        }
        Ok(Verbalizer { template: template.into(), words })
    }

    pub fn prompt(&self, e: &Example) -> String {
        self.template.replace("{text}", &e.text_a).replace("{text_b}", e.text_b.as_deref().unwrap_or(""))
    }

    /// Training pairs: the prompt and the gold label's words.
    pub fn pairs(&self, split: &[Example]) -> Result<Vec<LmPair>> {
        split
            .iter()
            .map(|e| {
                let c = e.label.class().and_then(|c| self.words.get(c)).ok_or_else(|| Error::Delta("example without a class label".into()))?;
                Ok(LmPair { prompt: self.prompt(e), completion: c.clone() })
            })
            .collect()
    }
}

/// Token ids of a pair, truncated to `max_len` by dropping the start of the prompt; and the index
/// where the completion starts.
pub fn encode_pair(tok: &LmTokenizer, p: &LmPair, max_len: usize) -> Result<(Vec<u32>, usize)> {
    let mut prompt = if p.prompt.is_empty() { Vec::new() } else { tok.encode(&p.prompt)? };
    let completion = tok.encode(&p.completion)?;
    // The BOS token, for models that want one (Gemma), stays first when the prompt is cut.
    let bos = if p.prompt.is_empty() { tok.start_id(&p.completion) } else { tok.start_id(&p.prompt) };
    let reserved = completion.len() + usize::from(bos.is_some());
    if reserved >= max_len {
        return Err(Error::arg("--max-length", format!("a completion of {} tokens does not fit in {max_len}", completion.len())));
    }
    let room = max_len - reserved;
    if prompt.len() > room {
        prompt.drain(..prompt.len() - room);
    }
    if let Some(b) = bos {
        prompt.insert(0, b);
    }
    let start = prompt.len();
    prompt.extend(completion);
    Ok((prompt, start))
}

/// A right-padded batch and its completion targets.
pub struct LmBatch {
    /// (b, t) u32
    pub ids: Tensor,
    /// (b, t) f32, 1 for real tokens
    pub mask: Tensor,
    /// Flat indices (row * t + position) of the positions whose next token is a target.
    pub positions: Tensor,
    /// The target ids, aligned with `positions`.
    pub targets: Tensor,
    pub num_targets: usize,
}

/// One training row: token ids and, per token, whether it is a target (a completion token).
#[derive(Clone, Debug, PartialEq)]
pub struct LmRow {
    pub ids: Vec<u32>,
    pub target: Vec<bool>,
}

impl From<(Vec<u32>, usize)> for LmRow {
    /// An [`encode_pair`] result: targets from the completion start on.
    fn from((ids, start): (Vec<u32>, usize)) -> Self {
        let target = (0..ids.len()).map(|i| i >= start).collect();
        LmRow { ids, target }
    }
}

/// Packs rows into rows of exactly `max_len` tokens (the last one shorter): each row followed by
/// `separator` (a target when the row's last token is one, so the model learns to stop), all
/// concatenated and cut, as in transformers' causal-LM example. Rows attend across the joins
/// (no per-example mask), the usual trade for no padding.
pub fn pack(rows: &[LmRow], max_len: usize, separator: Option<u32>) -> Vec<LmRow> {
    let (mut ids, mut target) = (Vec::new(), Vec::new());
    for r in rows {
        ids.extend_from_slice(&r.ids);
        target.extend_from_slice(&r.target);
        if let Some(sep) = separator {
            ids.push(sep);
            target.push(r.target.last().copied().unwrap_or(false));
        }
    }
    ids.chunks(max_len.max(1)).zip(target.chunks(max_len.max(1))).map(|(i, t)| LmRow { ids: i.to_vec(), target: t.to_vec() }).collect()
}

/// A right-padded batch of [`encode_pair`] results.
pub fn make_batch(encoded: &[(Vec<u32>, usize)], pad_id: u32, device: &Device) -> Result<LmBatch> {
    let rows: Vec<LmRow> = encoded.iter().cloned().map(LmRow::from).collect();
    make_row_batch(&rows, pad_id, device)
}

/// A right-padded batch of rows.
pub fn make_row_batch(rows: &[LmRow], pad_id: u32, device: &Device) -> Result<LmBatch> {
    make_row_batch_to(rows, 0, pad_id, device)
}

/// [`make_row_batch`] padded to at least `min_len` positions (a data-parallel shard is padded
/// to the length of its whole batch).
pub fn make_row_batch_to(rows: &[LmRow], min_len: usize, pad_id: u32, device: &Device) -> Result<LmBatch> {
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0).max(min_len);
    let b = rows.len();
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0f32; b * t];
    let (mut pos, mut tgt) = (Vec::new(), Vec::new());
    for (r, row) in rows.iter().enumerate() {
        ids[r * t..r * t + row.ids.len()].copy_from_slice(&row.ids);
        mask[r * t..r * t + row.ids.len()].iter_mut().for_each(|m| *m = 1.0);
        // Position p predicts token p + 1; targets are the completion tokens (a target at the
        // very start has no position to predict it from).
        for p in 1..row.ids.len() {
            if row.target[p] {
                pos.push((r * t + p - 1) as u32);
                tgt.push(row.ids[p]);
            }
        }
    }
    let n = pos.len();
    Ok(LmBatch {
        ids: Tensor::from_vec(ids, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, t), device)?,
        positions: Tensor::from_vec(pos, n, device)?,
        targets: Tensor::from_vec(tgt, n, device)?,
        num_targets: n,
    })
}

/// Log-probability of each target token (n,), with logits computed only at target positions.
fn target_logprobs(model: &LlamaModel, batch: &LmBatch, ctx: &ForwardCtx) -> Result<Tensor> {
    let hidden = model.forward(&batch.ids, Some(&batch.mask), None, ctx)?;
    let (b, t, h) = hidden.dims3()?;
    let sel = hidden.reshape((b * t, h))?.index_select(&batch.positions, 0)?;
    match model.frozen_head(ctx)? {
        // Head and loss as one op: no (targets, vocabulary) logits or gradient.
        Some(w) => ops::head_log_prob(&sel, &w, &batch.targets),
        None => ops::picked_log_prob(&model.logits(&sel, ctx)?, &batch.targets),
    }
}

/// Summed negative log-likelihood of the batch's targets.
pub fn batch_nll(model: &LlamaModel, batch: &LmBatch, ctx: &ForwardCtx) -> Result<Tensor> {
    Ok(target_logprobs(model, batch, ctx)?.sum_all()?.neg()?)
}

/// Training settings.
#[derive(Clone, Debug, Serialize)]
pub struct LmTrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_length: usize,
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    /// Pack examples into full `max_length` rows ([`pack`]) instead of padding each.
    pub pack: bool,
}

impl Default for LmTrainConfig {
    fn default() -> Self {
        LmTrainConfig {
            epochs: 1,
            batch_size: 8,
            lr: 1e-3,
            warmup_ratio: 0.06,
            weight_decay: 0.0,
            max_length: 128,
            max_grad_norm: Some(1.0),
            seed: 42,
            pack: false,
        }
    }
}

impl LmTrainConfig {
    /// Checks every setting against its range; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        check::positive("--lr", self.lr)?;
        check::at_least("--epochs", self.epochs, 1)?;
        check::at_least("--batch-size", self.batch_size, 1)?;
        check::at_least("--max-length", self.max_length, 2)?;
        check::in_range("--warmup-ratio", self.warmup_ratio, 0.0, 1.0, false)?;
        check::non_negative("--weight-decay", self.weight_decay)?;
        if let Some(n) = self.max_grad_norm {
            check::positive("--max-grad-norm", n)?;
        }
        Ok(())
    }
}

/// The rows [`train_rows`] trains on: each pair encoded (truncated to `max_length`), packed when
/// the config says so (separated by the tokenizer's end-of-sequence token).
pub fn training_rows(tok: &LmTokenizer, pairs: &[LmPair], cfg: &LmTrainConfig) -> Result<Vec<LmRow>> {
    let rows: Vec<LmRow> = pairs.iter().map(|p| encode_pair(tok, p, cfg.max_length).map(LmRow::from)).collect::<Result<_>>()?;
    Ok(if cfg.pack { pack(&rows, cfg.max_length, tok.eos_ids.first().copied()) } else { rows })
}

/// One optimizer step's record.
#[derive(Clone, Debug, Serialize)]
pub struct LmStep {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Data-parallel runs: seconds this step spent exchanging gradients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm_s: Option<f64>,
}

/// Trains the deltas attached to `model` (`specs`: the attached groups) on `pairs`; returns every step's record. The order of
/// examples in each epoch is a seeded shuffle.
pub fn train(model: &LlamaModel, specs: &[DeltaSpec], tok: &LmTokenizer, pairs: &[LmPair], cfg: &LmTrainConfig, ctl: &Control) -> Result<Vec<LmStep>> {
    let rows = training_rows(tok, pairs, cfg)?;
    train_rows(model, specs, tok.pad_id.unwrap_or(0), &rows, cfg, ctl)
}

/// Target tokens of a row: completion tokens that have a position before them.
fn row_targets(r: &LmRow) -> usize {
    r.target.iter().skip(1).filter(|&&t| t).count()
}

/// Trains on prepared rows ([`training_rows`]), `ceil(rows / batch_size)` steps per epoch.
/// Progress goes to `ctl` as step events; a cancellation stops before the next step. `specs`
/// are the attached groups whose methods have training-time behaviour of their own.
///
/// Data-parallel when `ctl` has a world of several ranks: each rank computes its contiguous
/// shard of every batch (padded to the whole batch's length, with the whole batch's dropout
/// masks), its summed token losses divided by the *whole* batch's target count, so that the
/// ranks' gradients sum to the one-process gradient; one exchange per step.
pub fn train_rows(model: &LlamaModel, specs: &[DeltaSpec], pad: u32, encoded: &[LmRow], cfg: &LmTrainConfig, ctl: &Control) -> Result<Vec<LmStep>> {
    let _pool = crate::ops::pool::ClearOnDrop;
    cfg.validate()?;
    let params = attach::trainable_vars(model);
    if params.is_empty() {
        return Err(Error::arg("--delta", "no trainable delta is attached"));
    }
    let steps_per_epoch = encoded.len().div_ceil(cfg.batch_size);
    let total = steps_per_epoch * cfg.epochs;
    let warmup = (total as f64 * cfg.warmup_ratio).ceil() as usize;
    let mut opt = AdamW::new(params.clone(), AdamWConfig { weight_decay: cfg.weight_decay, ..Default::default() })?;
    let root = DropoutKey(cfg.seed).derive("lm-train");
    let mut trainers = attach::group_trainers(model, specs)?;
    let mut log = Vec::with_capacity(total);
    let mut step = 0;
    let world = ctl.world.filter(|w| w.size() > 1);
    let (rank, ranks) = crate::dist::rank_size(world);
    let mut exchange = world.map(|_| crate::dist::GradExchange::new(&params));
    let mut stop_all = false;
    ctl.emit(Event::Start { what: "training".into(), total, done: 0 });
    let t0 = std::time::Instant::now();
    let result = (|| -> Result<()> {
    for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        let key = root.derive_n(epoch as u64);
        // Fisher-Yates with the counter-based generator: the same order for the same seed.
        for i in (1..order.len()).rev() {
            let j = ((key.uniform(i as u64) as f64) * (i + 1) as f64) as usize;
            order.swap(i, j.min(i));
        }
        for chunk in order.chunks(cfg.batch_size) {
            // Data-parallel ranks stop together, after the step whose exchange carried the flag.
            if world.is_some() && stop_all {
                return Err(Error::Cancelled(format!("training at step {step}/{total}")));
            }
            ctl.check(|| format!("training at step {step}/{total}"))?;
            let whole_targets: usize = chunk.iter().map(|&i| row_targets(&encoded[i])).sum();
            if whole_targets == 0 {
                continue;
            }
            let part = crate::dist::shard(chunk.len(), rank, ranks);
            let longest = chunk.iter().map(|&i| encoded[i].ids.len()).max().unwrap_or(0);
            let rows: Vec<LmRow> = chunk[part.clone()].iter().map(|&i| encoded[i].clone()).collect();
            let ctx = ForwardCtx::train(root.derive_n(1_000_000 + step as u64));
            let mut g = std::collections::BTreeMap::new();
            let mut value = 0f64;
            let batch = make_row_batch_to(&rows, if ranks > 1 { longest } else { 0 }, pad, model.device())?;
            if batch.num_targets > 0 {
                let nll = crate::ops::in_batch_rows(part.start, part.len(), || batch_nll(model, &batch, &ctx))?;
                let loss = (nll / whole_targets as f64)?;
                value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
                if !value.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "training loss is {value} at step {} (epoch {epoch}); stopped before changing the deltas further — try a lower --lr (now {})",
                        step + 1,
                        cfg.lr
                    )));
                }
                // Regularizers count once per step in all: each rank adds its share of the rows.
                let share = part.len() as f64 / chunk.len() as f64;
                let mut total_loss = loss.clone();
                for t in &trainers {
                    if let Some(r) = t.regularizer()? {
                        total_loss = (total_loss + (r * share)?)?;
                    }
                }
                let grads = total_loss.backward()?;
                for (name, var) in &params {
                    if let Some(t) = grads.get(var) {
                        g.insert(name.clone(), t.clone());
                    }
                }
            }
            let comm_before = exchange.as_ref().map(|e| e.comm);
            if let (Some(w), Some(ex)) = (world, exchange.as_mut()) {
                let totals = crate::dist::StepTotals { loss_sum: value, count: 0.0, stop: ctl.cancelled() };
                let (sum, t) = ex.all_reduce(w, g, totals, model.device())?;
                g = sum;
                value = t.loss_sum;
                stop_all = t.stop;
            }
            let norm = match cfg.max_grad_norm {
                Some(m) => clip_grad_norm(&mut g, m)?,
                None => crate::train::optim::global_norm(&g)?,
            };
            let lr = lr_at(cfg.lr, step, total, warmup, Decay::Linear);
            opt.step(&g, lr)?;
            for t in &mut trainers {
                t.after_step(step + 1, total, &g)?;
            }
            let comm_s = exchange.as_ref().zip(comm_before).map(|(e, b)| (e.comm - b).as_secs_f64());
            let rec = LmStep { step, epoch, loss: value, lr, grad_norm: norm, comm_s };
            log.push(rec);
            step += 1;
            let secs = t0.elapsed().as_secs_f64();
            let examples_per_s = (step * cfg.batch_size) as f64 / secs.max(1e-9);
            ctl.emit(Event::Step { step, total, loss: value, lr, examples_per_s, eta_s: secs / step as f64 * (total - step) as f64 });
        }
    }
    Ok(())
    })();
    ctl.emit(Event::Finish);
    result.map(|()| log)
}

/// Perplexity of the completions of `pairs` (exp of the mean token NLL).
pub fn perplexity(model: &LlamaModel, tok: &LmTokenizer, pairs: &[LmPair], batch_size: usize, max_len: usize) -> Result<f64> {
    let ctx = ForwardCtx::eval();
    let pad = tok.pad_id.unwrap_or(0);
    let (mut nll, mut n) = (0f64, 0usize);
    for chunk in pairs.chunks(batch_size.max(1)) {
        let enc: Vec<(Vec<u32>, usize)> = chunk.iter().map(|p| encode_pair(tok, p, max_len)).collect::<Result<_>>()?;
        let batch = make_batch(&enc, pad, model.device())?;
        if batch.num_targets == 0 {
            continue;
        }
        nll += batch_nll(model, &batch, &ctx)?.to_scalar::<f32>()? as f64;
        n += batch.num_targets;
    }
    if n == 0 {
        return Err(Error::Delta("no completion tokens to score".into()));
    }
    Ok((nll / n as f64).exp())
}

/// For each prompt, the index of the verbalizer whose tokens have the highest total
/// log-probability after it (teacher-forced; one forward per prompt and label).
pub fn classify(model: &LlamaModel, tok: &LmTokenizer, prompts: &[String], words: &[String], batch_size: usize, max_len: usize) -> Result<Vec<usize>> {
    classify_with(model, tok, prompts, words, batch_size, max_len, &ForwardCtx::eval())
}

/// [`classify`] under `ctx` (the structure search scores its supernet with the gates in it).
pub fn classify_with(model: &LlamaModel, tok: &LmTokenizer, prompts: &[String], words: &[String], batch_size: usize, max_len: usize, ctx: &ForwardCtx) -> Result<Vec<usize>> {
    let pad = tok.pad_id.unwrap_or(0);
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch_size.max(1)) {
        let mut enc = Vec::with_capacity(chunk.len() * words.len());
        for p in chunk {
            for w in words {
                enc.push(encode_pair(tok, &LmPair { prompt: p.clone(), completion: w.clone() }, max_len)?);
            }
        }
        // Score each (prompt, label) row separately: per-row sums of target log-probabilities.
        let batch = make_batch(&enc, pad, model.device())?;
        let (b, t) = batch.ids.dims2()?;
        let picked = target_logprobs(model, &batch, ctx)?.to_vec1::<f32>()?;
        let rows: Vec<u32> = batch.positions.to_vec1::<u32>()?.iter().map(|p| p / t as u32).collect();
        let mut scores = vec![0f64; b];
        for (r, v) in rows.iter().zip(picked) {
            scores[*r as usize] += v as f64;
        }
        for i in 0..chunk.len() {
            let s = &scores[i * words.len()..(i + 1) * words.len()];
            let best = s.iter().enumerate().fold((0, f64::NEG_INFINITY), |acc, (j, &v)| if v > acc.1 { (j, v) } else { acc }).0;
            out.push(best);
        }
    }
    Ok(out)
}

/// Accuracy of [`classify`] on labelled examples.
pub fn verbalizer_accuracy(model: &LlamaModel, tok: &LmTokenizer, v: &Verbalizer, split: &[Example], batch_size: usize, max_len: usize) -> Result<f64> {
    verbalizer_accuracy_with(model, tok, v, split, batch_size, max_len, &ForwardCtx::eval())
}

/// [`verbalizer_accuracy`] under `ctx`.
pub fn verbalizer_accuracy_with(model: &LlamaModel, tok: &LmTokenizer, v: &Verbalizer, split: &[Example], batch_size: usize, max_len: usize, ctx: &ForwardCtx) -> Result<f64> {
    let prompts: Vec<String> = split.iter().map(|e| v.prompt(e)).collect();
    let pred = classify_with(model, tok, &prompts, &v.words, batch_size, max_len, ctx)?;
    let correct = pred.iter().zip(split).filter(|(p, e)| e.label.class() == Some(**p)).count();
    Ok(correct as f64 / split.len().max(1) as f64)
}
