//! Text generation with a key-value cache: greedy, or temperature / top-k / top-p sampling from a
//! seeded generator; stop tokens and stop strings; the text streamed to a callback as it grows.

use super::causal::CausalLm;
use crate::backbone::llama::{last_position, KvCache};
use crate::core::ForwardCtx;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use crate::ops::DropoutKey;
use serde::Serialize;
use std::time::Instant;

/// How to pick tokens and when to stop.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this total probability (1 = all).
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
    /// Generation ends after any of these ids (the tokenizer's end-of-turn ids are added).
    pub stop_ids: Vec<u32>,
    /// Generation ends when the text contains any of these; the text is cut before it.
    pub stop_strings: Vec<String>,
    /// Do not stop at the tokenizer's end-of-sequence / end-of-turn ids (benchmarks: always
    /// `max_new_tokens`).
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 42,
            stop_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// What a generation produced, with timings.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// `eos` (a stop id), `stop` (a stop string) or `length`.
    pub stop_reason: String,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Generated tokens per second of decoding (after the first token).
    pub tokens_per_second: f64,
}

/// Picks the next token from `logits` (vocab,); `draw` is a uniform number in [0, 1).
pub fn sample(logits: &[f32], opts: &GenerateOptions, draw: f64) -> Result<u32> {
    if logits.iter().any(|v| v.is_nan()) {
        return Err(Error::NonFinite("next-token logits".into()));
    }
    let argmax = || logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
    if opts.temperature <= 0.0 {
        return Ok(argmax());
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opts.top_k > 0 {
        idx.truncate(opts.top_k);
    }
    let t = opts.temperature as f32;
    let max = logits[idx[0]] / t;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] / t - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if opts.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (n, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= opts.top_p {
                keep = n + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = draw * total;
    for (p, &i) in probs.iter().zip(&idx) {
        if r < *p {
            return Ok(i as u32);
        }
        r -= p;
    }
    Ok(idx[idx.len() - 1] as u32)
}

/// Generates a continuation of `prompt_ids`, calling `on_text` with each new piece of text.
pub fn generate(lm: &CausalLm, prompt_ids: &[u32], opts: &GenerateOptions, on_text: &mut dyn FnMut(&str)) -> Result<Generation> {
    if prompt_ids.is_empty() {
        return Err(Error::arg("--prompt", "the prompt has no tokens"));
    }
    let virtual_tokens = lm.model.num_virtual_tokens();
    let ctx_len = lm.model.config.max_position_embeddings.saturating_sub(virtual_tokens);
    if prompt_ids.len() >= ctx_len {
        let with = if virtual_tokens > 0 { format!(" besides the delta's {virtual_tokens} virtual tokens") } else { String::new() };
        return Err(Error::arg(
            "--prompt",
            format!("the prompt has {} tokens; the model's context holds {ctx_len}{with}", prompt_ids.len()),
        ));
    }
    let max_new = opts.max_new_tokens.min(ctx_len - prompt_ids.len());
    let mut stop_ids = opts.stop_ids.clone();
    if !opts.ignore_eos {
        stop_ids.extend(lm.tokenizer.eos_ids.iter().copied());
    }
    let dev = lm.model.device().clone();
    let ctx = ForwardCtx::inference();
    let key = DropoutKey(opts.seed).derive("generate");
    let mut cache = KvCache::new(lm.model.num_layers());
    let t0 = Instant::now();
    let ids = Tensor::new(prompt_ids, &dev)?.unsqueeze(0)?;
    let hidden = lm.model.forward(&ids, None, Some(&mut cache), &ctx)?;
    let mut logits = lm.model.logits(&last_position(&hidden)?, &ctx)?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut stream = TextStream::new(&opts.stop_strings);
    let mut reason = "length";
    for step in 0..max_new {
        let row = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let next = sample(&row, opts, key.uniform(step as u64) as f64)?;
        if stop_ids.contains(&next) {
            reason = "eos";
            break;
        }
        let (piece, stopped) = stream.push(&lm.tokenizer, next)?;
        if !piece.is_empty() {
            on_text(&piece);
        }
        if stopped {
            reason = "stop";
            break;
        }
        if step + 1 == max_new {
            break;
        }
        let ids = Tensor::new(&[next], &dev)?.unsqueeze(0)?;
        let hidden = lm.model.forward(&ids, None, Some(&mut cache), &ctx)?;
        logits = lm.model.logits(&last_position(&hidden)?, &ctx)?;
    }
    let decode = t1.elapsed().as_secs_f64();
    let (text, rest) = stream.finish(&lm.tokenizer, reason == "stop")?;
    if !rest.is_empty() {
        on_text(&rest);
    }
    let out = stream.tokens;
    Ok(Generation {
        text,
        prompt_tokens: prompt_ids.len(),
        stop_reason: reason.into(),
        prefill_seconds: prefill,
        decode_seconds: decode,
        tokens_per_second: if decode > 0.0 { out.len() as f64 / decode } else { 0.0 },
        tokens: out,
    })
}

/// Incremental detokenisation with stop strings: generated tokens go in one at a time, settled
/// text comes out. Text that could be the start of a stop string is held back until the next
/// tokens settle it; a stop string ends the text before it.
#[derive(Clone, Debug, Default)]
pub struct TextStream {
    /// Tokens pushed so far.
    pub tokens: Vec<u32>,
    /// Everything decoded so far; its first `emitted` bytes have been handed out.
    text: String,
    emitted: usize,
    stops: Vec<String>,
    longest_stop: usize,
    // Decoding a window (out[prefix..]), not a lone token, keeps the spacing rules of tokenizers
    // that treat a sequence's first token specially; the text of out[prefix..] beyond that of
    // out[prefix..read] is new.
    prefix: usize,
    read: usize,
}

impl TextStream {
    pub fn new(stop_strings: &[String]) -> Self {
        let stops: Vec<String> = stop_strings.iter().filter(|s| !s.is_empty()).cloned().collect();
        let longest_stop = stops.iter().map(String::len).max().unwrap_or(0);
        TextStream { stops, longest_stop, ..Default::default() }
    }

    /// Adds token `next`; returns the newly settled text and whether a stop string was hit.
    pub fn push(&mut self, tok: &super::tokenizer::LmTokenizer, next: u32) -> Result<(String, bool)> {
        self.tokens.push(next);
        let out = &self.tokens;
        let before = tok.decode(&out[self.prefix..self.read], true)?;
        let window = tok.decode(&out[self.prefix..], true)?;
        // Hold back an incomplete UTF-8 sequence (shown as U+FFFD) until the next token completes it.
        if window.ends_with('\u{FFFD}') || window.len() <= before.len() || !window.starts_with(&before) {
            return Ok((String::new(), false));
        }
        let searched = floor_boundary(&self.text, self.emitted.saturating_sub(self.longest_stop));
        self.text.push_str(&window[before.len()..]);
        (self.prefix, self.read) = (self.read, out.len());
        let stops: Vec<&str> = self.stops.iter().map(String::as_str).collect();
        let hit = stops.iter().filter_map(|s| self.text[searched..].find(s).map(|p| searched + p)).min();
        let until = match hit {
            Some(pos) => pos,
            None => self.text.len() - held_back(&self.text, &stops),
        };
        let mut piece = String::new();
        if until > self.emitted {
            piece = self.text[self.emitted..until].to_string();
            self.emitted = until;
        }
        if hit.is_some() {
            self.text.truncate(self.emitted);
        }
        Ok((piece, hit.is_some()))
    }

    /// The final text and the part of it not handed out yet. After a stop string the text ends
    /// before it; otherwise it is the decoding of every token.
    pub fn finish(&mut self, tok: &super::tokenizer::LmTokenizer, stopped: bool) -> Result<(String, String)> {
        if stopped {
            return Ok((self.text.clone(), String::new()));
        }
        let text = tok.decode(&self.tokens, true)?;
        let rest = if text.len() > self.emitted && text.is_char_boundary(self.emitted) { text[self.emitted..].to_string() } else { String::new() };
        self.emitted = text.len();
        self.text = text.clone();
        Ok((text, rest))
    }
}

/// Bytes at the end of `text` that are a proper prefix of some stop string (held back from the
/// stream until the next tokens settle it).
fn held_back(text: &str, stops: &[&str]) -> usize {
    stops
        .iter()
        .flat_map(|s| s.char_indices().skip(1).map(|(k, _)| &s[..k]))
        .filter(|p| text.ends_with(p))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

/// The largest char boundary of `s` at or below `i`.
fn floor_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
