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
        if model != "gpt2" {
            return Err(terr(format!(
                "tokenizer model `{model}` is not supported yet (only byte-level BPE, `gpt2`); put a tokenizer.json beside the model"
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

    /// A ChatML prompt (`<|im_start|>role\ncontent<|im_end|>\n` per message, then the assistant
    /// header) when the model's template is ChatML, which is what SmolLM2 and Qwen ship.
    pub fn chat_prompt(&self, messages: &[(&str, &str)]) -> Result<String> {
        let tpl = self.chat_template.as_deref().unwrap_or("");
        if !tpl.contains("<|im_start|>") {
            return Err(Error::arg(
                "--chat",
                "the model's chat template is not ChatML; pass the formatted prompt with --prompt instead",
            ));
        }
        let mut s = String::new();
        // SmolLM2's template adds its default system prompt when the first message is not one.
        if messages.first().is_some_and(|(r, _)| *r != "system") {
            if let Some(default) = default_system(tpl) {
                s.push_str(&format!("<|im_start|>system\n{default}<|im_end|>\n"));
            }
        }
        for (role, content) in messages {
            s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
        }
        s.push_str("<|im_start|>assistant\n");
        Ok(s)
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

/// The default system message a ChatML template inserts (`... '<|im_start|>system\nTEXT<|im_end|>` literal).
/// The newline after `system` may be a real newline or a `\n` escape inside the Jinja string.
fn default_system(tpl: &str) -> Option<String> {
    ["'<|im_start|>system\n", "'<|im_start|>system\\n"].iter().find_map(|marker| {
        let start = tpl.find(marker)? + marker.len();
        let end = tpl[start..].find("<|im_end|>")? + start;
        Some(tpl[start..end].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::default_system;

    #[test]
    fn default_system_message_from_either_newline_form() {
        let real = "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}";
        let escaped = "{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}";
        assert_eq!(default_system(real).as_deref(), Some("You are helpful"));
        assert_eq!(default_system(escaped).as_deref(), Some("You are helpful"));
        assert_eq!(default_system("{{ messages }}"), None);
    }
}
