//! `config.json` of BERT-family encoders, read in two stages: an on-disk struct where everything is
//! optional, then a resolved [`BertConfig`] with no options left (missing required fields are errors
//! naming the file and the field).

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// Which member of the BERT family: decides position ids and name prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Bert,
    Roberta,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// Exact erf GELU (HF "gelu").
    Gelu,
    /// tanh approximation (HF "gelu_new" / "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
}

#[derive(Deserialize, Debug, Default)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    hidden_act: Option<String>,
    hidden_dropout_prob: Option<f64>,
    attention_probs_dropout_prob: Option<f64>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    pad_token_id: Option<u32>,
    position_embedding_type: Option<String>,
}

/// A resolved BERT-family configuration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BertConfig {
    pub family: Family,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: HiddenAct,
    pub hidden_dropout_prob: f32,
    pub attention_probs_dropout_prob: f32,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
}

impl BertConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// First position id of real tokens: RoBERTa counts positions from `pad_token_id + 1`.
    pub fn position_offset(&self) -> usize {
        match self.family {
            Family::Bert => 0,
            Family::Roberta => self.pad_token_id as usize + 1,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let value = crate::io::read_json(path)?;
        let raw: RawConfig = serde_json::from_value(value)
            .map_err(|e| Error::Json { file: path.to_path_buf(), msg: e.to_string() })?;
        Self::resolve(raw, path)
    }

    fn resolve(raw: RawConfig, path: &Path) -> Result<Self> {
        let missing = |field: &str| Error::MissingField { file: path.to_path_buf(), field: field.into() };
        let bad = |msg: String| Error::Config { file: path.to_path_buf(), msg };
        let model_type = raw.model_type.clone().unwrap_or_default();
        let archs = raw.architectures.clone().unwrap_or_default();
        let family = match model_type.as_str() {
            "bert" => Family::Bert,
            "roberta" | "xlm-roberta" | "camembert" => Family::Roberta,
            "" if archs.iter().any(|a| a.starts_with("Roberta") || a.starts_with("XLMRoberta")) => {
                Family::Roberta
            }
            "" if archs.iter().any(|a| a.starts_with("Bert")) => Family::Bert,
            "" => return Err(missing("model_type")),
            other => {
                return Err(bad(format!(
                    "model_type `{other}` is not supported (supported: bert, roberta, xlm-roberta)"
                )))
            }
        };
        let hidden_act = match raw.hidden_act.as_deref().unwrap_or("gelu") {
            "gelu" => HiddenAct::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => HiddenAct::GeluTanh,
            "relu" => HiddenAct::Relu,
            other => return Err(bad(format!("hidden_act `{other}` is not supported"))),
        };
        if let Some(p) = raw.position_embedding_type.as_deref() {
            if p != "absolute" {
                return Err(bad(format!(
                    "position_embedding_type `{p}` is not supported (only `absolute`)"
                )));
            }
        }
        let cfg = BertConfig {
            family,
            model_type: if model_type.is_empty() { format!("{family:?}").to_lowercase() } else { model_type },
            vocab_size: raw.vocab_size.ok_or_else(|| missing("vocab_size"))?,
            hidden_size: raw.hidden_size.ok_or_else(|| missing("hidden_size"))?,
            num_hidden_layers: raw.num_hidden_layers.ok_or_else(|| missing("num_hidden_layers"))?,
            num_attention_heads: raw.num_attention_heads.ok_or_else(|| missing("num_attention_heads"))?,
            intermediate_size: raw.intermediate_size.ok_or_else(|| missing("intermediate_size"))?,
            hidden_act,
            hidden_dropout_prob: raw.hidden_dropout_prob.unwrap_or(0.1) as f32,
            attention_probs_dropout_prob: raw.attention_probs_dropout_prob.unwrap_or(0.1) as f32,
            max_position_embeddings: raw
                .max_position_embeddings
                .ok_or_else(|| missing("max_position_embeddings"))?,
            type_vocab_size: raw.type_vocab_size.unwrap_or(2),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-12),
            pad_token_id: raw.pad_token_id.unwrap_or(if family == Family::Roberta { 1 } else { 0 }),
        };
        if cfg.hidden_size == 0 || cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(bad(format!(
                "hidden_size {} is not a positive multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        for (name, p) in [
            ("hidden_dropout_prob", cfg.hidden_dropout_prob),
            ("attention_probs_dropout_prob", cfg.attention_probs_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(bad(format!("{name} = {p} is not in [0, 1)")));
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<BertConfig> {
        let raw: RawConfig = serde_json::from_str(json).unwrap();
        BertConfig::resolve(raw, Path::new("config.json"))
    }

    #[test]
    fn missing_field_is_named() {
        let err = parse(r#"{"model_type":"bert","vocab_size":10,"num_hidden_layers":1}"#).unwrap_err();
        assert_eq!(err.to_string(), "config.json: missing field `hidden_size`");
    }

    #[test]
    fn roberta_from_architectures() {
        let c = parse(
            r#"{"architectures":["RobertaModel"],"vocab_size":10,"hidden_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"intermediate_size":16,"max_position_embeddings":20,"type_vocab_size":1}"#,
        )
        .unwrap();
        assert_eq!(c.family, Family::Roberta);
        assert_eq!(c.position_offset(), 2);
    }

    #[test]
    fn unsupported_type() {
        let err = parse(r#"{"model_type":"gpt2"}"#).unwrap_err();
        assert!(err.to_string().contains("model_type `gpt2` is not supported"), "{err}");
    }
}
