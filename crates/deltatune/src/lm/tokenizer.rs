//! Decoder tokenizers: `tokenizer.json` when the model directory has one, else built from GGUF
//! metadata (`tokenizer.ggml.*`: vocabulary, merges, token types, special ids, chat template).

use crate::error::{Error, Result};
use crate::io::gguf::GgufFile;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// A decoder's tokenizer with its special ids and chat template.
pub struct LmTokenizer {
    tokenizer: Tokenizer,
    source: PathBuf,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub pad_id: Option<u32>,
    /// Whether a sequence starts with `bos_id` (Gemma, Llama 2: `add_bos_token`).
    pub add_bos: bool,
    /// Jinja chat template, when the model ships one.
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for LmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmTokenizer").field("source", &self.source).field("eos_ids", &self.eos_ids).finish()
    }
}

/// GGUF pre-tokenizer names whose digit handling is "each digit alone" before the GPT-2 byte-level split.
const DIGIT_SPLIT_PRE: &[&str] = &["smollm", "smaug-bpe", "starcoder", "refact", "qwen2", "deepseek-llm", "llama-bpe", "llama3"];

impl LmTokenizer {
    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.model` = `gpt2`, byte-level BPE).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let file = g.path().to_path_buf();
        let terr = |msg: String| Error::Tokenizer { file: file.clone(), msg };
        let model = g.string("tokenizer.ggml.model")?;
        if model == "llama" {
            return Self::from_gguf_spm(g);
        }
        if model != "gpt2" {
            return Err(terr(format!(
                "tokenizer model `{model}` is not supported (supported: byte-level BPE `gpt2`, SentencePiece-style `llama`); put a tokenizer.json beside the model"
            )));
        }
        let tokens = g.strings("tokenizer.ggml.tokens")?;
        let merges = g.strings("tokenizer.ggml.merges")?;
        let types = g.ints_opt("tokenizer.ggml.token_type")?.unwrap_or_default();
        let pre = g.string("tokenizer.ggml.pre").unwrap_or("default");
        let mut vocab = Map::new();
        let mut added = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            vocab.insert((*t).to_string(), json!(id));
            // 3 = control, 4 = user-defined: matched whole, before the BPE.
            let ty = types.get(id).copied().unwrap_or(1);
            if ty == 3 || ty == 4 {
                added.push(json!({
                    "id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": ty == 3,
                }));
            }
        }
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = if DIGIT_SPLIT_PRE.contains(&pre) {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
        } else {
            byte_level.clone()
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": Value::Object(vocab), "merges": merges,
            },
        });
        let tokenizer: Tokenizer = spec.to_string().parse().map_err(|e: tokenizers::Error| terr(e.to_string()))?;
        let id = |k: &str| g.usize(k).ok().map(|v| v as u32);
        let eos_ids = with_turn_ends(&tokenizer, id("tokenizer.ggml.eos_token_id"));
        Ok(LmTokenizer {
            tokenizer,
            source: file.clone(),
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_ids,
            pad_id: id("tokenizer.ggml.padding_token_id"),
            add_bos: g.bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
            chat_template: g.string("tokenizer.chat_template").ok().map(str::to_string),
        })
    }

    /// A SentencePiece-style vocabulary (`tokenizer.ggml.model` = `llama`: pieces, scores, token
    /// types, byte fallback), built as transformers builds it from the same file (see [`super::spm`]).
    fn from_gguf_spm(g: &GgufFile) -> Result<Self> {
        let file = g.path().to_path_buf();
        let terr = |msg: String| Error::Tokenizer { file: file.clone(), msg };
        let tokens = g.strings("tokenizer.ggml.tokens")?;
        let scores = g.floats_opt("tokenizer.ggml.scores")?.unwrap_or_default();
        let types = g.ints_opt("tokenizer.ggml.token_type")?.unwrap_or_default();
        let arch = g.string("general.architecture").unwrap_or("");
        let gemma = arch.starts_with("gemma");
        let id = |k: &str| g.usize(k).ok().map(|v| v as u32);
        let unk = id("tokenizer.ggml.unknown_token_id").and_then(|i| tokens.get(i as usize).copied());
        let spec = super::spm::tokenizer_json(&super::spm::SpmVocab {
            tokens: &tokens,
            scores: &scores,
            types: &types,
            rank_by_position: gemma,
            respell_spaces: gemma,
            add_space_prefix: g.bool_opt("tokenizer.ggml.add_space_prefix")?.unwrap_or(!gemma),
            unk,
        });
        let tokenizer: Tokenizer = spec.to_string().parse().map_err(|e: tokenizers::Error| terr(e.to_string()))?;
        let eos_ids = with_turn_ends(&tokenizer, id("tokenizer.ggml.eos_token_id"));
        Ok(LmTokenizer {
            tokenizer,
            source: file.clone(),
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_ids,
            pad_id: id("tokenizer.ggml.padding_token_id"),
            add_bos: g.bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(true),
            chat_template: g.string("tokenizer.chat_template").ok().map(str::to_string),
        })
    }

    /// Loads `tokenizer.json` (plus `tokenizer_config.json` for special tokens and template, if present).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::NotFound { path, what: "tokenizer.json".into() });
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer { file: path.clone(), msg: e.to_string() })?;
        let cfg = dir.join("tokenizer_config.json");
        let cfg = if cfg.is_file() { crate::io::read_json(&cfg)? } else { Value::Null };
        let tok_id = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let s = v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            tokenizer.token_to_id(s)
        };
        let eos_ids = with_turn_ends(&tokenizer, tok_id("eos_token"));
        Ok(LmTokenizer {
            add_bos: cfg.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(false),
            bos_id: tok_id("bos_token"),
            pad_id: tok_id("pad_token"),
            eos_ids,
            chat_template: cfg.get("chat_template").and_then(|c| c.as_str()).map(str::to_string),
            source: path,
            tokenizer,
        })
    }

    /// Writes tokenizer.json and tokenizer_config.json (special tokens, chat template) into `dir`.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        let json = self.tokenizer.to_string(false).map_err(|e| Error::Tokenizer { file: path.clone(), msg: e.to_string() })?;
        crate::io::write_atomic(&path, json.as_bytes())?;
        let name = |id: Option<u32>| id.and_then(|i| self.tokenizer.id_to_token(i));
        let mut cfg = serde_json::Map::new();
        if let Some(b) = name(self.bos_id) {
            cfg.insert("bos_token".into(), b.into());
        }
        if let Some(e) = name(self.eos_ids.first().copied()) {
            cfg.insert("eos_token".into(), e.into());
        }
        if let Some(p) = name(self.pad_id) {
            cfg.insert("pad_token".into(), p.into());
        }
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), t.clone().into());
        }
        cfg.insert("add_bos_token".into(), self.add_bos.into());
        cfg.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        crate::io::write_json_atomic(&dir.join("tokenizer_config.json"), &Value::Object(cfg))
    }

    /// Token ids of `text`, special-token strings matched as single tokens, nothing added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer { file: self.source.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of the start of a sequence: [`Self::encode`] with the BOS token in front when the
    /// model wants one (`add_bos`).
    pub fn encode_start(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.start_id(text).into_iter().collect();
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// The BOS id to put before `text`: when the model wants one and `text` (e.g. a rendered chat
    /// template) does not already start with it.
    pub fn start_id(&self, text: &str) -> Option<u32> {
        let bos = self.bos_id.filter(|_| self.add_bos)?;
        match self.tokenizer.id_to_token(bos) {
            Some(t) if text.starts_with(&t) => None,
            _ => Some(bos),
        }
    }

    /// Text of `ids` (special tokens kept unless `skip_special`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer { file: self.source.clone(), msg: e.to_string() })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The chat template: the model's own, or for a Gemma vocabulary without one our Gemma
    /// turn format ([`super::chat::GEMMA_TEMPLATE`]).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref().or_else(|| self.token_to_id("<start_of_turn>").map(|_| super::chat::GEMMA_TEMPLATE))
    }

    fn render_chat(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        let tpl = self.chat_template().ok_or_else(|| {
            Error::arg("--chat", format!("{} has no chat template; pass the formatted prompt with --prompt instead", self.source.display()))
        })?;
        let name = |id: Option<u32>| id.and_then(|i| self.tokenizer.id_to_token(i));
        let (bos, eos) = (name(self.bos_id), name(self.eos_ids.first().copied()));
        super::chat::render(tpl, messages, add_generation_prompt, bos.as_deref(), eos.as_deref())
    }

    /// The prompt for `messages` (role, content) in the model's chat template, ending with the
    /// header of the assistant's turn (`add_generation_prompt`).
    pub fn chat_prompt(&self, messages: &[(&str, &str)]) -> Result<String> {
        self.render_chat(messages, true)
    }

    /// What the template writes for the assistant's `reply` after `before` (the turns before it):
    /// the reply and its end-of-turn marker (trailing whitespace after the marker dropped), i.e.
    /// the conversation rendered with the reply minus [`Self::chat_prompt`] of `before`.
    pub fn chat_completion(&self, before: &[(&str, &str)], reply: &str) -> Result<String> {
        let prompt = self.chat_prompt(before)?;
        let mut all: Vec<(&str, &str)> = before.to_vec();
        all.push(("assistant", reply));
        let full = self.render_chat(&all, false)?;
        match full.strip_prefix(&prompt) {
            Some(rest) => Ok(rest.trim_end().to_string()),
            None => Err(Error::arg(
                "--chat",
                "the chat template renders a conversation that does not start with its own generation prompt; cannot split the reply off",
            )),
        }
    }
}

/// The declared end-of-sequence id (first) followed by the end-of-turn tokens chat models use
/// (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|endoftext|>`, `</s>`) that the vocabulary has.
fn with_turn_ends(tokenizer: &Tokenizer, eos: Option<u32>) -> Vec<u32> {
    let mut ids: Vec<u32> = eos.into_iter().collect();
    for t in ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "</s>"] {
        if let Some(i) = tokenizer.token_to_id(t) {
            if !ids.contains(&i) {
                ids.push(i);
            }
        }
    }
    ids
}
