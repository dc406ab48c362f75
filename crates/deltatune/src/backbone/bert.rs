//! The BERT family encoder (BERT, MiniLM, RoBERTa), written bottom-up so that every module is a
//! [`Site`] at its HF path. Mirrors transformers' `modeling_bert.py` (eager attention):
//! `BertEmbeddings`, `BertSelfAttention`, `BertSelfOutput`, `BertAttention`, `BertIntermediate`,
//! `BertOutput`, `BertLayer`, `BertEncoder`, `BertPooler`, `BertModel`.
//!
//! Shapes: b = batch, t = tokens, v = soft-prompt tokens, h = hidden size, i = intermediate size.

use super::config::{BertConfig, Family, HiddenAct};
use crate::core::{Backbone, ForwardCtx, ModelOutput, Site, SiteKind};
use crate::data::tokenize::EncodedBatch;
use crate::error::{Error, Result};
use crate::io::TensorFile;
use crate::ops;
use candle_core::{DType, Device, IndexOp, Tensor};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The files of a local HF model directory.
#[derive(Clone, Debug)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
}

impl ModelDir {
    /// Checks that `dir` holds config.json, model.safetensors and tokenizer.json.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound { path: dir.to_path_buf(), what: "model directory".into() });
        }
        let md = ModelDir {
            dir: dir.to_path_buf(),
            config: dir.join("config.json"),
            weights: dir.join("model.safetensors"),
            tokenizer: dir.join("tokenizer.json"),
        };
        for (p, what) in [(&md.config, "config.json"), (&md.weights, "model.safetensors"), (&md.tokenizer, "tokenizer.json")] {
            if !p.is_file() {
                let hint = if what == "model.safetensors" && dir.join("pytorch_model.bin").exists() {
                    " (only pytorch_model.bin is present; convert it to safetensors)"
                } else {
                    ""
                };
                return Err(Error::NotFound { path: p.clone(), what: format!("{what}{hint}") });
            }
        }
        Ok(md)
    }
}

/// Reads tensors under an optional name prefix (`bert.`, `roberta.`) with shape checks.
struct Loader<'a> {
    file: &'a TensorFile,
    prefix: &'a str,
}

impl Loader<'_> {
    fn get(&self, path: &str, shape: &[usize]) -> Result<Tensor> {
        self.file.get_f32(&format!("{}{path}", self.prefix), shape)
    }

    fn linear(&self, path: &str, out: usize, inp: usize, layer: Option<usize>) -> Result<Linear> {
        Ok(Linear {
            site: Site::new(path, SiteKind::Linear, layer)
                .with_param("weight", self.get(&format!("{path}.weight"), &[out, inp])?)
                .with_param("bias", self.get(&format!("{path}.bias"), &[out])?),
        })
    }

    fn layer_norm(&self, path: &str, h: usize, eps: f64, layer: Option<usize>) -> Result<LayerNorm> {
        Ok(LayerNorm {
            site: Site::new(path, SiteKind::LayerNorm, layer)
                .with_param("weight", self.get(&format!("{path}.weight"), &[h])?)
                .with_param("bias", self.get(&format!("{path}.bias"), &[h])?),
            eps,
        })
    }

    fn embedding(&self, path: &str, n: usize, h: usize) -> Result<Embedding> {
        Ok(Embedding {
            site: Site::new(path, SiteKind::Embedding, None)
                .with_param("weight", self.get(&format!("{path}.weight"), &[n, h])?),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Leaf modules.

#[derive(Debug)]
struct Linear {
    site: Site,
}

impl Linear {
    /// (..., in) -> (..., out)
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let s = &self.site;
        let x = s.pre(x, ctx)?;
        let w = s.require("weight", ctx)?;
        let b = s.resolve("bias", ctx)?;
        if let Some((a, bm)) = s.sole_low_rank(ctx)? {
            // LoRA alone on this layer: base product and update as one op.
            return ops::lora_linear(&x, &w, b.as_ref(), &a, &bm);
        }
        let y = ops::linear(&x, &w, b.as_ref())?;
        s.post(&x, y, ctx)
    }
}

#[derive(Debug)]
struct LayerNorm {
    site: Site,
    eps: f64,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let s = &self.site;
        let x = s.pre(x, ctx)?;
        let y = ops::layer_norm(&x, &s.require("weight", ctx)?, &s.require("bias", ctx)?, self.eps)?;
        s.post(&x, y, ctx)
    }
}

#[derive(Debug)]
struct Embedding {
    site: Site,
}

impl Embedding {
    /// ids (b, t) u32 -> (b, t, h)
    fn forward(&self, ids: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let w = self.site.require("weight", ctx)?;
        let (b, t) = ids.dims2()?;
        let h = w.dim(1)?;
        let y = w.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, h))?;
        self.site.post(ids, y, ctx)
    }
}

// ---------------------------------------------------------------------------------------------
// Embeddings.

#[derive(Debug)]
struct BertEmbeddings {
    site: Site,
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Option<Embedding>,
    layer_norm: LayerNorm,
    family: Family,
    pad_id: usize,
    max_positions: usize,
    dropout: f32,
}

impl BertEmbeddings {
    /// Returns the embeddings (b, v + t, h) and the 0/1 mask (b, v + t) including soft prompts.
    /// `past` is the prefix length: real positions start after it, as with transformers' cache.
    fn forward(&self, batch: &EncodedBatch, past: usize, ctx: &ForwardCtx) -> Result<(Tensor, Tensor)> {
        let (b, t) = batch.input_ids.dims2()?;
        let dev = batch.input_ids.device();
        let words = self.word_embeddings.forward(&batch.input_ids, ctx)?;
        // Soft prompts from the block and from the word-embedding table, in that order.
        let prompts = match (self.site.prompts(b, ctx)?, self.word_embeddings.site.prompts(b, ctx)?) {
            (Some(a), Some(w)) => Some(Tensor::cat(&[&a, &w], 1)?),
            (a, w) => a.or(w),
        };
        let v = prompts.as_ref().map(|p| p.dim(1)).transpose()?.unwrap_or(0);
        let (inputs, mask) = match &prompts {
            Some(p) => (
                Tensor::cat(&[p, &words], 1)?,
                Tensor::cat(&[&Tensor::ones((b, v), DType::F32, dev)?, &batch.attention_mask.to_dtype(DType::F32)?], 1)?,
            ),
            None => (words, batch.attention_mask.to_dtype(DType::F32)?),
        };
        let len = v + t;
        let positions: Vec<u32> = match self.family {
            Family::Bert => (0..b).flat_map(|_| (past..past + len).map(|p| p as u32)).collect(),
            Family::Roberta => {
                // create_position_ids_from_input_ids: pad + cumsum(mask) on real tokens, pad elsewhere.
                let m = mask.to_vec2::<f32>()?;
                m.iter()
                    .flat_map(|row| {
                        let mut c = 0usize;
                        row.iter()
                            .map(|&x| {
                                if x > 0.5 {
                                    c += 1;
                                    (self.pad_id + past + c) as u32
                                } else {
                                    self.pad_id as u32
                                }
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect()
            }
        };
        if let Some(&max) = positions.iter().max() {
            if max as usize >= self.max_positions {
                return Err(Error::arg(
                    "--max-length",
                    format!(
                        "position id {max} ({t} tokens + {v} prompt + {past} prefix) exceeds the model's \
                         max_position_embeddings {}",
                        self.max_positions
                    ),
                ));
            }
        }
        let pos_ids = Tensor::from_vec(positions, (b, len), dev)?;
        let mut e = inputs.add(&self.position_embeddings.forward(&pos_ids, ctx)?)?;
        if let Some(tt) = &self.token_type_embeddings {
            let types = match v {
                0 => batch.token_type_ids.clone(),
                _ => Tensor::cat(&[&Tensor::zeros((b, v), DType::U32, dev)?, &batch.token_type_ids], 1)?,
            };
            e = e.add(&tt.forward(&types, ctx)?)?;
        }
        let e = self.layer_norm.forward(&e, ctx)?;
        let e = if ctx.train { ops::dropout(&e, self.dropout, self.site.dropout_key(ctx, 0))? } else { e };
        Ok((self.site.post(&batch.input_ids, e, ctx)?, mask))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention block.

#[derive(Debug)]
struct BertSelfAttention {
    site: Site,
    query: Linear,
    key: Linear,
    value: Linear,
    heads: usize,
    dropout: f32,
}

impl BertSelfAttention {
    /// (b, t, h) -> context (b, t, h). `bias` is the additive key mask (b, tk) including prefix keys.
    fn forward(&self, x: &Tensor, bias: &Tensor, prefix: Option<&(Tensor, Tensor)>, ctx: &ForwardCtx) -> Result<Tensor> {
        let x = self.site.pre(x, ctx)?;
        let q = self.query.forward(&x, ctx)?;
        let mut k = self.key.forward(&x, ctx)?;
        let mut v = self.value.forward(&x, ctx)?;
        if let Some((pk, pv)) = prefix {
            k = Tensor::cat(&[pk, &k], 1)?;
            v = Tensor::cat(&[pv, &v], 1)?;
        }
        let drop = (ctx.train && self.dropout > 0.0).then(|| (self.dropout, self.site.dropout_key(ctx, 0)));
        let c = ops::attention(&q, &k, &v, bias, self.heads, drop)?;
        self.site.post(&x, c, ctx)
    }
}

/// Output projection + dropout + residual + layer norm, shared by `attention.output` and `output`.
#[derive(Debug)]
struct ResidualOutput {
    site: Site,
    dense: Linear,
    layer_norm: LayerNorm,
    dropout: f32,
}

impl ResidualOutput {
    /// `hidden` (b, t, in) is the sublayer's inner state, `input` (b, t, h) its input (residual).
    fn forward(&self, hidden: &Tensor, input: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let hidden = self.site.pre(hidden, ctx)?;
        let h = self.dense.forward(&hidden, ctx)?;
        let ln = &self.layer_norm;
        if !self.site.has_active() && !ln.site.has_active() {
            // Nothing attached between the dense layer and the norm: dropout, residual sum and
            // layer norm as one op.
            let drop = ctx.train.then(|| (self.dropout, self.site.dropout_key(ctx, 0)));
            let (g, b) = (ln.site.require("weight", ctx)?, ln.site.require("bias", ctx)?);
            return ops::residual_layer_norm(&h, input, &g, &b, ln.eps, drop);
        }
        let h = if ctx.train { ops::dropout(&h, self.dropout, self.site.dropout_key(ctx, 0))? } else { h };
        let h = self.site.post(input, h, ctx)?;
        self.layer_norm.forward(&(h + input)?, ctx)
    }
}

#[derive(Debug)]
struct BertAttention {
    site: Site,
    self_attn: BertSelfAttention,
    output: ResidualOutput,
}

impl BertAttention {
    fn forward(&self, x: &Tensor, bias: &Tensor, prefix: Option<&(Tensor, Tensor)>, ctx: &ForwardCtx) -> Result<Tensor> {
        let x = self.site.pre(x, ctx)?;
        let c = self.self_attn.forward(&x, bias, prefix, ctx)?;
        let y = self.output.forward(&c, &x, ctx)?;
        self.site.post(&x, y, ctx)
    }
}

// ---------------------------------------------------------------------------------------------
// Feed-forward and layer.

#[derive(Debug)]
struct BertIntermediate {
    site: Site,
    dense: Linear,
    act: HiddenAct,
}

impl BertIntermediate {
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let x = self.site.pre(x, ctx)?;
        if matches!(self.act, HiddenAct::Gelu) && !self.dense.site.has_active() {
            // No delta on the dense layer itself: linear and activation as one op.
            let d = &self.dense.site;
            let h = ops::linear_gelu(&x, &d.require("weight", ctx)?, d.resolve("bias", ctx)?.as_ref())?;
            return self.site.post(&x, h, ctx);
        }
        let h = self.dense.forward(&x, ctx)?;
        let h = match self.act {
            HiddenAct::Gelu => ops::gelu(&h)?,
            HiddenAct::GeluTanh => ops::gelu_tanh(&h)?,
            HiddenAct::Relu => h.relu()?,
        };
        self.site.post(&x, h, ctx)
    }
}

#[derive(Debug)]
struct BertLayer {
    site: Site,
    attention: BertAttention,
    intermediate: BertIntermediate,
    output: ResidualOutput,
}

impl BertLayer {
    fn forward(&self, x: &Tensor, bias: &Tensor, prefix: Option<&(Tensor, Tensor)>, ctx: &ForwardCtx) -> Result<Tensor> {
        if let Some(y) = self.engine_forward(x, bias, prefix, ctx)? {
            return Ok(y);
        }
        let x = self.site.pre(x, ctx)?;
        let a = self.attention.forward(&x, bias, prefix, ctx)?;
        let i = self.intermediate.forward(&a, ctx)?;
        let y = self.output.forward(&i, &a, ctx)?;
        self.site.post(&x, y, ctx)
    }
}

impl BertLayer {
    /// The layer as one op of the block engine ([`ops::encoder_block`]) when every delta on it is
    /// one the engine computes — a LoRA or an (IA)³ scale on one of its six linear maps (at most
    /// one per map), a bottleneck adapter after the attention output or the feed-forward output,
    /// trained biases or layer-norm parameters (BitFit, LayerNorm tuning), prefix keys and values
    /// in its attention (`prefix`, from the encoder's site), trained weights (full fine-tuning) —
    /// nothing is attached to its other containers, and a backward may follow (the input or a
    /// delta takes part in a graph). `None`: the module-by-module path.
    fn engine_forward(&self, x: &Tensor, bias: &Tensor, prefix: Option<&(Tensor, Tensor)>, ctx: &ForwardCtx) -> Result<Option<Tensor>> {
        if !ops::engine_enabled() || ctx.inference || ctx.route.is_some() || !matches!(self.intermediate.act, HiddenAct::Gelu) {
            return Ok(None);
        }
        let (att, sa) = (&self.attention, &self.attention.self_attn);
        let (o, out) = (&att.output, &self.output);
        let containers = [&self.site, &att.site, &sa.site, &self.intermediate.site];
        if containers.iter().any(|s| s.has_active()) {
            return Ok(None);
        }
        // The two block sites may carry an adapter each, nothing else.
        let mut adapters: [Option<ops::Adapter>; 2] = Default::default();
        for (i, site) in [&o.site, &out.site].into_iter().enumerate() {
            match site.engine_delta(ctx)? {
                Some(d) if d.lora.is_none() && d.scale.is_none() => adapters[i] = d.adapter,
                _ => return Ok(None),
            }
        }
        let maps = [&sa.query, &sa.key, &sa.value, &o.dense, &self.intermediate.dense, &out.dense];
        let mut linears = Vec::with_capacity(6);
        let mut deltas: [ops::MapDelta; 6] = Default::default();
        for (j, m) in maps.iter().enumerate() {
            let s = &m.site;
            let Some(mut d) = s.engine_delta(ctx)? else { return Ok(None) };
            if d.adapter.is_some() {
                return Ok(None); // an adapter on a linear map: the engine takes them after a block
            }
            // A weight in place of the map's own (OFT's W Rᵀ), unless the map's weight trains too.
            let own = s.require("weight", ctx)?;
            let weight = match d.weight.take() {
                Some(_) if own.track_op() => return Ok(None),
                Some(w) => w,
                None => own,
            };
            deltas[j] = d;
            linears.push((weight, s.resolve("bias", ctx)?));
        }
        let Ok(linears) = <[ops::Dense; 6]>::try_from(linears) else { return Ok(None) };
        let norm = |ln: &LayerNorm| -> Result<Option<(Tensor, Tensor, f64)>> {
            // Only parameter changes on a norm (BitFit, LayerNorm tuning).
            match ln.site.engine_delta(ctx)? {
                Some(d) if !d.is_some() => Ok(Some((ln.site.require("weight", ctx)?, ln.site.require("bias", ctx)?, ln.eps))),
                _ => Ok(None),
            }
        };
        let (Some(ln1), Some(ln2)) = (norm(&o.layer_norm)?, norm(&out.layer_norm)?) else { return Ok(None) };
        let trains = deltas.iter().any(ops::MapDelta::is_some)
            || adapters.iter().any(Option::is_some)
            || prefix.is_some_and(|(k, v)| k.track_op() || v.track_op())
            || linears.iter().any(|(w, b)| w.track_op() || b.as_ref().is_some_and(Tensor::track_op))
            || [&ln1.0, &ln1.1, &ln2.0, &ln2.1].iter().any(|t| t.track_op());
        if !x.track_op() && !trains {
            return Ok(None);
        }
        let drop = |p: f32, s: &Site| (ctx.train && p > 0.0).then(|| (p, s.dropout_key(ctx, 0)));
        let block = ops::EncoderBlock {
            heads: sa.heads,
            linears,
            ln1,
            ln2,
            dropout: [drop(sa.dropout, &sa.site), drop(o.dropout, &o.site), drop(out.dropout, &out.site)],
        };
        Ok(Some(ops::encoder_block(x, bias, &block, &deltas, &adapters, prefix)?))
    }
}

#[derive(Debug)]
struct BertEncoder {
    site: Site,
    list: Site,
    layer: Vec<BertLayer>,
}

#[derive(Debug)]
struct BertPooler {
    site: Site,
    dense: Linear,
}

// ---------------------------------------------------------------------------------------------
// The model.

/// A BERT-family encoder loaded from a local HF directory.
#[derive(Debug)]
pub struct BertModel {
    pub config: BertConfig,
    pub files: ModelDir,
    root: Site,
    embeddings: BertEmbeddings,
    encoder: BertEncoder,
    pooler: Option<BertPooler>,
    fingerprint: String,
    device: Device,
}

impl BertModel {
    /// Loads config.json and model.safetensors from `dir` (names with or without a `bert.` /
    /// `roberta.` prefix).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let files = ModelDir::open(dir)?;
        let config = BertConfig::from_file(&files.config)?;
        let st = TensorFile::load(&files.weights, device)?;
        let probe = "embeddings.word_embeddings.weight";
        let prefix = ["", "bert.", "roberta.", "model."]
            .into_iter()
            .find(|p| st.contains(&format!("{p}{probe}")))
            .ok_or_else(|| Error::MissingTensor {
                file: files.weights.clone(),
                key: format!("{probe} (also tried with prefixes bert., roberta., model.)"),
            })?;
        let ld = Loader { file: &st, prefix };
        let c = &config;
        let (h, i, eps) = (c.hidden_size, c.intermediate_size, c.layer_norm_eps);
        let token_type_embeddings = if c.type_vocab_size > 0 {
            Some(ld.embedding("embeddings.token_type_embeddings", c.type_vocab_size, h)?)
        } else {
            None
        };
        let embeddings = BertEmbeddings {
            site: Site::new("embeddings", SiteKind::Embeddings, None),
            word_embeddings: ld.embedding("embeddings.word_embeddings", c.vocab_size, h)?,
            position_embeddings: ld.embedding("embeddings.position_embeddings", c.max_position_embeddings, h)?,
            token_type_embeddings,
            layer_norm: ld.layer_norm("embeddings.LayerNorm", h, eps, None)?,
            family: c.family,
            pad_id: c.pad_token_id as usize,
            max_positions: c.max_position_embeddings,
            dropout: c.hidden_dropout_prob,
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for n in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{n}");
            let l = Some(n);
            layers.push(BertLayer {
                site: Site::new(&p, SiteKind::Layer, l),
                attention: BertAttention {
                    site: Site::new(format!("{p}.attention"), SiteKind::Attention, l),
                    self_attn: BertSelfAttention {
                        site: Site::new(format!("{p}.attention.self"), SiteKind::SelfAttention, l),
                        query: ld.linear(&format!("{p}.attention.self.query"), h, h, l)?,
                        key: ld.linear(&format!("{p}.attention.self.key"), h, h, l)?,
                        value: ld.linear(&format!("{p}.attention.self.value"), h, h, l)?,
                        heads: c.num_attention_heads,
                        dropout: c.attention_probs_dropout_prob,
                    },
                    output: ResidualOutput {
                        site: Site::new(format!("{p}.attention.output"), SiteKind::AttentionOutput, l),
                        dense: ld.linear(&format!("{p}.attention.output.dense"), h, h, l)?,
                        layer_norm: ld.layer_norm(&format!("{p}.attention.output.LayerNorm"), h, eps, l)?,
                        dropout: c.hidden_dropout_prob,
                    },
                },
                intermediate: BertIntermediate {
                    site: Site::new(format!("{p}.intermediate"), SiteKind::Intermediate, l),
                    dense: ld.linear(&format!("{p}.intermediate.dense"), i, h, l)?,
                    act: c.hidden_act,
                },
                output: ResidualOutput {
                    site: Site::new(format!("{p}.output"), SiteKind::Output, l),
                    dense: ld.linear(&format!("{p}.output.dense"), h, i, l)?,
                    layer_norm: ld.layer_norm(&format!("{p}.output.LayerNorm"), h, eps, l)?,
                    dropout: c.hidden_dropout_prob,
                },
            });
        }
        // The pooler is optional (sentence-transformers exports sometimes drop it).
        let pooler = if st.contains(&format!("{prefix}pooler.dense.weight")) {
            Some(BertPooler { site: Site::new("pooler", SiteKind::Pooler, None), dense: ld.linear("pooler.dense", h, h, None)? })
        } else {
            None
        };
        let fingerprint = fingerprint(&config, &st)?;
        Ok(BertModel {
            config,
            files,
            root: Site::new("", SiteKind::Model, None),
            embeddings,
            encoder: BertEncoder {
                site: Site::new("encoder", SiteKind::Encoder, None),
                list: Site::new("encoder.layer", SiteKind::ModuleList, None),
                layer: layers,
            },
            pooler,
            fingerprint,
            device: device.clone(),
        })
    }

    /// Sets the dropout probabilities used in training mode (hidden states and attention).
    pub fn set_dropout(&mut self, hidden: f32, attention: f32) {
        self.embeddings.dropout = hidden;
        for l in &mut self.encoder.layer {
            l.attention.self_attn.dropout = attention;
            l.attention.output.dropout = hidden;
            l.output.dropout = hidden;
        }
    }

    /// Layer `n` on `h` with the key mask `bias`, adding any prefix keys/values of the encoder's deltas.
    fn layer_forward(&self, n: usize, h: &Tensor, bias: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let b = h.dim(0)?;
        let prefix = self.encoder.site.prefixes(n, b, ctx)?;
        let layer_bias = match &prefix {
            Some((k, _)) => Tensor::cat(&[&Tensor::zeros((b, k.dim(1)?), DType::F32, bias.device())?, bias], 1)?,
            None => bias.clone(),
        };
        self.encoder.layer[n].forward(h, &layer_bias, prefix.as_ref(), ctx)
    }

    /// `tanh(W h_cls + b)` — BERT's pooler output (b, h), if the checkpoint has a pooler.
    pub fn pooler_output(&self, out: &ModelOutput, ctx: &ForwardCtx) -> Result<Option<Tensor>> {
        let Some(p) = &self.pooler else { return Ok(None) };
        let cls = out.last_hidden_state.i((.., out.num_virtual))?;
        let y = p.dense.forward(&cls, ctx)?.tanh()?;
        Ok(Some(p.site.post(&cls, y, ctx)?))
    }
}

/// A content hash of config and weights: names, shapes and a sample of values of every tensor.
fn fingerprint(config: &BertConfig, st: &TensorFile) -> Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(config.model_type.as_bytes());
    for field in [config.vocab_size, config.hidden_size, config.num_hidden_layers, config.intermediate_size] {
        hasher.update(field.to_le_bytes());
    }
    for name in st.names() {
        let t = st.get(name)?;
        if t.dtype() != DType::F32 {
            continue;
        }
        hasher.update(name.as_bytes());
        for d in t.dims() {
            hasher.update(d.to_le_bytes());
        }
        let flat = t.flatten_all()?;
        let n = flat.elem_count();
        // A strided sample of 64 values catches any change of the weights that matters in practice.
        let step = (n / 64).max(1);
        let idx: Vec<u32> = (0..n).step_by(step).take(64).map(|i| i as u32).collect();
        let sample = flat.index_select(&Tensor::new(idx.as_slice(), flat.device())?, 0)?.to_vec1::<f32>()?;
        for v in sample {
            hasher.update(v.to_le_bytes());
        }
    }
    let digest = hasher.finalize();
    Ok(digest.iter().take(16).map(|b| format!("{b:02x}")).collect())
}

impl Backbone for BertModel {
    fn model_type(&self) -> &str {
        &self.config.model_type
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn num_layers(&self) -> usize {
        self.config.num_hidden_layers
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn info(&self) -> crate::core::BackboneInfo {
        let c = &self.config;
        crate::core::BackboneInfo {
            hidden_size: c.hidden_size,
            num_layers: c.num_hidden_layers,
            num_heads: c.num_attention_heads,
            intermediate_size: c.intermediate_size,
            vocab_size: c.vocab_size,
            kv_width: None,
        }
    }

    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn word_embeddings(&self) -> Result<Tensor> {
        self.embeddings
            .word_embeddings
            .site
            .param("weight")
            .cloned()
            .ok_or_else(|| Error::Delta("word embeddings missing".into()))
    }

    fn forward(&self, batch: &EncodedBatch, ctx: &ForwardCtx) -> Result<ModelOutput> {
        let mut collected = Vec::new();
        let (h, mask, num_virtual) = self.forward_until(batch, 0, ctx, &mut collected)?;
        self.forward_layers(h, mask, num_virtual, 0, ctx, collected)
    }

    fn forward_until(&self, batch: &EncodedBatch, k: usize, ctx: &ForwardCtx, collected: &mut Vec<Tensor>) -> Result<(Tensor, Tensor, usize)> {
        let past = self.encoder.site.num_virtual_tokens_in(ctx);
        let (mut h, mask) = self.embeddings.forward(batch, past, ctx)?;
        let num_virtual = mask.dim(1)? - batch.seq_len();
        if ctx.output_hidden_states {
            collected.push(h.clone());
        }
        let bias = ops::mask_to_bias(&mask)?;
        for n in 0..k.min(self.encoder.layer.len()) {
            h = self.layer_forward(n, &h, &bias, ctx)?;
            if ctx.output_hidden_states {
                collected.push(h.clone());
            }
        }
        Ok((h, mask, num_virtual))
    }

    fn forward_layers(&self, hidden: Tensor, mask: Tensor, num_virtual: usize, k: usize, ctx: &ForwardCtx, mut collected: Vec<Tensor>) -> Result<ModelOutput> {
        let bias = ops::mask_to_bias(&mask)?;
        let mut h = hidden;
        for n in k..self.encoder.layer.len() {
            h = self.layer_forward(n, &h, &bias, ctx)?;
            if ctx.output_hidden_states {
                collected.push(h.clone());
            }
        }
        Ok(ModelOutput { last_hidden_state: h, attention_mask: mask, num_virtual, hidden_states: collected })
    }

    fn sites(&self) -> Vec<&Site> {
        let e = &self.embeddings;
        let mut v: Vec<&Site> = vec![&self.root, &e.site, &e.word_embeddings.site, &e.position_embeddings.site];
        if let Some(tt) = &e.token_type_embeddings {
            v.push(&tt.site);
        }
        v.extend([&e.layer_norm.site, &self.encoder.site, &self.encoder.list]);
        for l in &self.encoder.layer {
            let (a, sa, o) = (&l.attention, &l.attention.self_attn, &l.attention.output);
            v.extend([&l.site, &a.site, &sa.site, &sa.query.site, &sa.key.site, &sa.value.site]);
            v.extend([&o.site, &o.dense.site, &o.layer_norm.site]);
            v.extend([&l.intermediate.site, &l.intermediate.dense.site]);
            v.extend([&l.output.site, &l.output.dense.site, &l.output.layer_norm.site]);
        }
        if let Some(p) = &self.pooler {
            v.extend([&p.site, &p.dense.site]);
        }
        v
    }

    fn sites_mut(&mut self) -> Vec<&mut Site> {
        let e = &mut self.embeddings;
        let mut v: Vec<&mut Site> =
            vec![&mut self.root, &mut e.site, &mut e.word_embeddings.site, &mut e.position_embeddings.site];
        if let Some(tt) = &mut e.token_type_embeddings {
            v.push(&mut tt.site);
        }
        v.extend([&mut e.layer_norm.site, &mut self.encoder.site, &mut self.encoder.list]);
        for l in &mut self.encoder.layer {
            let a = &mut l.attention;
            let sa = &mut a.self_attn;
            v.extend([&mut l.site, &mut a.site, &mut sa.site, &mut sa.query.site, &mut sa.key.site, &mut sa.value.site]);
            let o = &mut a.output;
            v.extend([&mut o.site, &mut o.dense.site, &mut o.layer_norm.site]);
            v.extend([&mut l.intermediate.site, &mut l.intermediate.dense.site]);
            v.extend([&mut l.output.site, &mut l.output.dense.site, &mut l.output.layer_norm.site]);
        }
        if let Some(p) = &mut self.pooler {
            v.extend([&mut p.site, &mut p.dense.site]);
        }
        v
    }
}
