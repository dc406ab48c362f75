//! Llama-family decoders (Llama, SmolLM, Mistral-style GQA): RMSNorm, rotary position embeddings,
//! grouped-query attention and a SwiGLU feed-forward, mirroring transformers' `modeling_llama.py`
//! (eager attention). Every module is a [`Site`] at its HF path (`model.layers.3.self_attn.q_proj`),
//! so delta patterns and PEFT key names are the same whether the weights came from a GGUF file or
//! an HF safetensors directory.
//!
//! Weights loaded from GGUF stay quantized ([`QTensor`]) in memory; [`ops::qlinear`] multiplies
//! with them (dequantizing one layer at a time into an f32 matmul, or with the quantized dot
//! product kernels for a few rows) and passes gradients through them to the input.
//!
//! Shapes: b = batch, t = new tokens, p = tokens already in the cache, h = hidden size,
//! nh / nkv = query / key-value heads, d = head size.

use crate::core::{Backbone, ForwardCtx, ModuleTree, Site, SiteKind};
use crate::error::{Error, Result};
use crate::io::gguf::{permute_rows, unpermute_rotary_order, GgufFile};
use crate::io::TensorFile;
use crate::ops;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The decoder architectures this module runs: the Llama block with each family's variations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// Llama, SmolLM, Mistral: the plain block.
    Llama,
    /// Gemma 3: query/key norms, GeGLU, embeddings scaled by √hidden, norms after attention and
    /// feed-forward too, interleaved sliding-window and global layers with their own rotary bases.
    Gemma3,
    /// Qwen 2 / 2.5: biases on the query, key and value projections.
    Qwen2,
    /// Qwen 3: query/key norms.
    Qwen3,
    /// Phi-3: the query, key and value projections fused into one `qkv_proj`, the gate and up
    /// projections into one `gate_up_proj`; a sliding window in every layer.
    Phi3,
}

/// GGUF `general.architecture` values that load, with the architecture they map to.
pub const GGUF_ARCHITECTURES: &[(&str, Arch)] = &[("llama", Arch::Llama), ("gemma3", Arch::Gemma3), ("qwen2", Arch::Qwen2), ("qwen3", Arch::Qwen3), ("phi3", Arch::Phi3)];

/// HF `model_type` values that load.
pub const HF_MODEL_TYPES: &[(&str, Arch)] = &[
    ("llama", Arch::Llama),
    ("mistral", Arch::Llama),
    ("smollm", Arch::Llama),
    ("smollm3", Arch::Llama),
    ("gemma3_text", Arch::Gemma3),
    ("qwen2", Arch::Qwen2),
    ("qwen3", Arch::Qwen3),
    ("phi3", Arch::Phi3),
];

impl Arch {
    /// The HF `model_type` (what PEFT's per-architecture defaults key on).
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3_text",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
        }
    }

    /// The GGUF `general.architecture`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
        }
    }

    /// One projection for queries, keys and values, one for gate and up (Phi-3).
    fn fused(self) -> bool {
        self == Arch::Phi3
    }

    fn qk_norm(self) -> bool {
        matches!(self, Arch::Gemma3 | Arch::Qwen3)
    }

    /// llama.cpp interleaves the rotary halves of the query/key rows for this architecture's
    /// GGUF files (the "normal" rotary type); the others use HF's layout ("neox").
    pub(crate) fn gguf_permutes_rotary(self) -> bool {
        self == Arch::Llama
    }

    /// Norm weights are stored as `w` with `1 + w` applied (HF Gemma); GGUF stores `1 + w`.
    fn norm_offset(self) -> bool {
        self == Arch::Gemma3
    }
}

fn supported_list(list: &[(&str, Arch)]) -> String {
    list.iter().map(|(n, _)| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

/// The architecture numbers of a Llama-family model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the query, key and value projections (Qwen 2).
    pub attention_bias: bool,
    /// Keys further back than this many positions are not attended in sliding layers.
    pub sliding_window: Option<usize>,
    /// Per layer: whether it uses the sliding window (all of them for Mistral-style models).
    pub sliding_layers: Vec<bool>,
    /// Rotary base of the sliding layers (Gemma 3: 10,000; else `rope_theta`).
    pub rope_local_theta: f64,
    /// Attention scores are scaled by this to the power −½ (Gemma's `query_pre_attn_scalar`;
    /// else the head size).
    pub query_pre_attn_scalar: f64,
}

impl LlamaConfig {
    /// From GGUF metadata (`general.architecture` = `llama`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.string("general.architecture")?;
        let Some(&(_, kind)) = GGUF_ARCHITECTURES.iter().find(|(n, _)| *n == arch) else {
            return Err(Error::Gguf {
                file: g.path().to_path_buf(),
                msg: format!("architecture `{arch}` is not supported (supported: {})", supported_list(GGUF_ARCHITECTURES)),
            });
        };
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = g.usize(&key("embedding_length"))?;
        let heads = g.usize(&key("attention.head_count"))?;
        let vocab = match g.usize(&key("vocab_size")) {
            Ok(v) => v,
            Err(_) => g.strings("tokenizer.ggml.tokens")?.len(),
        };
        let head_dim = g
            .usize(&key("attention.key_length"))
            .or_else(|_| g.usize(&key("rope.dimension_count")))
            .unwrap_or(hidden / heads.max(1));
        let layers = g.usize(&key("block_count"))?;
        let theta = g.f64_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let window = g.usize(&key("attention.sliding_window")).ok().filter(|&w| w > 0);
        // llama.cpp's Gemma 3: every sixth layer global, the others sliding with base 10,000.
        let (sliding_layers, local_theta) = match kind {
            Arch::Gemma3 => ((0..layers).map(|i| (i + 1) % 6 != 0).collect(), 10_000.0),
            _ => (vec![window.is_some(); layers], theta),
        };
        let c = LlamaConfig {
            arch: kind,
            attention_bias: g.contains("blk.0.attn_q.bias"),
            sliding_window: window,
            sliding_layers,
            rope_local_theta: local_theta,
            query_pre_attn_scalar: head_dim as f64,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: g.usize(&key("feed_forward_length"))?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: g.usize(&key("attention.head_count_kv")).unwrap_or(heads),
            head_dim,
            rms_norm_eps: g.f64_opt(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: g.f64_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            max_position_embeddings: g.usize(&key("context_length")).unwrap_or(2048),
            tie_word_embeddings: !g.contains("output.weight"),
        };
        c.check(g.path())?;
        Ok(c)
    }

    /// From an HF `config.json` with `model_type` `llama` (or a Llama-compatible type).
    pub fn from_hf(path: &Path) -> Result<Self> {
        let v = crate::io::read_json(path)?;
        let cerr = |msg: String| Error::Config { file: path.to_path_buf(), msg };
        let mt = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
        let Some(&(_, kind)) = HF_MODEL_TYPES.iter().find(|(n, _)| *n == mt) else {
            return Err(cerr(format!("model_type `{mt}` is not a supported decoder (supported: {})", supported_list(HF_MODEL_TYPES))));
        };
        let num = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| Error::MissingField { file: path.to_path_buf(), field: k.into() })
        };
        let hidden = num("hidden_size")?;
        let heads = num("num_attention_heads")?;
        let rp = v.get("rope_parameters");
        // transformers 5 nests Gemma 3's per-layer-type rotary settings under `rope_parameters`.
        let rp_of = |t: &str| rp.and_then(|r| r.get(t)).and_then(|r| r.get("rope_theta")).and_then(|x| x.as_f64());
        let theta = v
            .get("rope_theta")
            .and_then(|x| x.as_f64())
            .or_else(|| rp.and_then(|r| r.get("rope_theta")).and_then(|x| x.as_f64()))
            .or_else(|| rp_of("full_attention"))
            .unwrap_or(if kind == Arch::Gemma3 { 1_000_000.0 } else { 10_000.0 });
        let local_theta = v.get("rope_local_base_freq").and_then(|x| x.as_f64()).or_else(|| rp_of("sliding_attention"));
        for rs in [v.get("rope_scaling"), rp.and_then(|r| r.get("full_attention")), rp].into_iter().flatten().filter(|x| !x.is_null()) {
            let rkind = rs.get("rope_type").or_else(|| rs.get("type")).and_then(|x| x.as_str()).unwrap_or("default");
            if rkind != "default" {
                return Err(cerr(format!("rope_scaling `{rkind}` is not supported yet")));
            }
        }
        let layers = num("num_hidden_layers")?;
        let window = v.get("sliding_window").and_then(|x| x.as_u64()).map(|w| w as usize).filter(|&w| w > 0);
        let sliding_layers: Vec<bool> = match v.get("layer_types").and_then(|x| x.as_array()) {
            Some(types) => types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect(),
            None if kind == Arch::Gemma3 => {
                let pattern = v.get("sliding_window_pattern").and_then(|x| x.as_u64()).unwrap_or(6).max(1) as usize;
                (0..layers).map(|i| (i + 1) % pattern != 0).collect()
            }
            // Qwen's `use_sliding_window` is off by default; Mistral slides in every layer.
            None if matches!(kind, Arch::Qwen2 | Arch::Qwen3) && !v.get("use_sliding_window").and_then(|x| x.as_bool()).unwrap_or(false) => vec![false; layers],
            None => vec![window.is_some(); layers],
        };
        if sliding_layers.len() != layers {
            return Err(cerr(format!("layer_types lists {} layers, num_hidden_layers is {layers}", sliding_layers.len())));
        }
        let head_dim = num("head_dim").unwrap_or(hidden / heads.max(1));
        let partial = v.get("partial_rotary_factor").or_else(|| rp.and_then(|r| r.get("partial_rotary_factor")));
        if let Some(f) = partial.and_then(|x| x.as_f64()).filter(|f| (f - 1.0).abs() > 1e-9) {
            return Err(cerr(format!("partial_rotary_factor {f} is not supported yet (rotary over whole heads only)")));
        }
        if v.get("final_logit_softcapping").is_some_and(|x| !x.is_null()) || v.get("attn_logit_softcapping").is_some_and(|x| !x.is_null()) {
            return Err(cerr("logit soft-capping is not supported yet".into()));
        }
        let c = LlamaConfig {
            arch: kind,
            attention_bias: kind == Arch::Qwen2 || v.get("attention_bias").and_then(|x| x.as_bool()).unwrap_or(false),
            sliding_window: window,
            sliding_layers,
            rope_local_theta: local_theta.unwrap_or(if kind == Arch::Gemma3 { 10_000.0 } else { theta }),
            query_pre_attn_scalar: v.get("query_pre_attn_scalar").and_then(|x| x.as_f64()).unwrap_or(head_dim as f64),
            vocab_size: num("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: num("intermediate_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: num("num_key_value_heads").unwrap_or(heads),
            head_dim,
            rms_norm_eps: v.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-6),
            rope_theta: theta,
            max_position_embeddings: num("max_position_embeddings").unwrap_or(2048),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(kind == Arch::Gemma3),
        };
        c.check(path)?;
        Ok(c)
    }

    fn check(&self, file: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::Config { file: file.to_path_buf(), msg });
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 || self.hidden_size == 0 {
            return bad("zero heads or hidden size".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} key-value heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head size {} is odd (rotary embeddings need pairs)", self.head_dim));
        }
        Ok(())
    }
}

/// Where the weights came from.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LlamaSource {
    Gguf { path: PathBuf, file_type: String },
    Safetensors { dir: PathBuf },
}

// ---------------------------------------------------------------------------------------------
// Modules.

#[derive(Debug)]
struct Linear {
    site: Site,
}

impl Linear {
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx, exact: bool) -> Result<Tensor> {
        let s = &self.site;
        let x = s.pre(x, ctx)?;
        let y = match s.quantized("weight") {
            // Training always multiplies by the dequantized weight: a row's numbers then do not
            // depend on how many rows the batch has (data-parallel shards, accumulation).
            Some(q) => {
                if ctx.train {
                    if let Some((a, bm)) = s.sole_low_rank(ctx)? {
                        // LoRA alone on this layer: base product and update as one op.
                        return ops::lora_qlinear(&x, q, s.resolve("bias", ctx)?.as_ref(), &a, &bm);
                    }
                }
                let y = ops::qlinear(&x, q, exact || ctx.train)?;
                match s.resolve("bias", ctx)? {
                    Some(b) => y.broadcast_add(&b)?,
                    None => y,
                }
            }
            None => {
                let (w, b) = (s.require("weight", ctx)?, s.resolve("bias", ctx)?);
                if let Some((a, bm)) = s.sole_low_rank(ctx)? {
                    return ops::lora_linear(&x, &w, b.as_ref(), &a, &bm);
                }
                ops::linear(&x, &w, b.as_ref())?
            }
        };
        s.post(&x, y, ctx)
    }
}

#[derive(Debug)]
struct RmsNorm {
    site: Site,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let s = &self.site;
        let x = s.pre(x, ctx)?;
        let y = ops::rms_norm(&x, &s.require("weight", ctx)?, self.eps)?;
        s.post(&x, y, ctx)
    }
}

/// The query, key and value projections: three, or one fused (Phi-3's `qkv_proj`, whose output
/// holds the queries, then the keys, then the values).
#[derive(Debug)]
enum Qkv {
    Split { q_proj: Linear, k_proj: Linear, v_proj: Linear },
    Fused(Linear),
}

/// The gate and up projections: two, or one fused (Phi-3's `gate_up_proj`: the gate's rows, then the up's).
#[derive(Debug)]
enum GateUp {
    Split { gate_proj: Linear, up_proj: Linear },
    Fused(Linear),
}

impl Qkv {
    fn linears(&self) -> Vec<&Linear> {
        match self {
            Qkv::Split { q_proj, k_proj, v_proj } => vec![q_proj, k_proj, v_proj],
            Qkv::Fused(l) => vec![l],
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Qkv::Split { q_proj, k_proj, v_proj } => vec![q_proj, k_proj, v_proj],
            Qkv::Fused(l) => vec![l],
        }
    }
}

impl GateUp {
    fn linears(&self) -> Vec<&Linear> {
        match self {
            GateUp::Split { gate_proj, up_proj } => vec![gate_proj, up_proj],
            GateUp::Fused(l) => vec![l],
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            GateUp::Split { gate_proj, up_proj } => vec![gate_proj, up_proj],
            GateUp::Fused(l) => vec![l],
        }
    }
}

/// `parts` consecutive slices of the last dimension of `y`, of the given widths.
fn split_last(y: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    let last = y.rank() - 1;
    let mut start = 0;
    let mut out = Vec::with_capacity(widths.len());
    for &w in widths {
        out.push(y.narrow(last, start, w)?.contiguous()?);
        start += w;
    }
    Ok(out)
}

#[derive(Debug)]
struct Attention {
    site: Site,
    qkv: Qkv,
    o_proj: Linear,
    /// Per-head RMS norms of queries and keys before the rotation (Gemma 3, Qwen 3).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Multiplies the queries so that the kernel's 1/√d scale becomes 1/√query_pre_attn_scalar.
    q_scale: Option<f64>,
    /// Attend only the last this-many positions (sliding-window layers).
    window: Option<usize>,
}

#[derive(Debug)]
struct Mlp {
    site: Site,
    gate_up: GateUp,
    down_proj: Linear,
    /// GeGLU (tanh-approximated GELU on the gate, Gemma) instead of SwiGLU.
    gelu: bool,
}

#[derive(Debug)]
struct DecoderLayer {
    site: Site,
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// Llama: the norm before the feed-forward. Gemma: the norm of the attention output.
    post_attention_layernorm: RmsNorm,
    /// Gemma: the norms before and after the feed-forward.
    pre_feedforward_layernorm: Option<RmsNorm>,
    post_feedforward_layernorm: Option<RmsNorm>,
    mlp: Mlp,
}

/// Keys and values of the positions seen so far, per layer: (b, p, nkv·d) each (rotated keys). The first
/// [`KvCache::virtual_tokens`] positions belong to deltas (prefix keys, soft prompts).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    virtual_tokens: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: vec![None; num_layers], virtual_tokens: 0 }
    }

    /// Layer `n`'s cached keys and values, (b, p, nkv·d) each.
    pub fn layer(&self, n: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(n).and_then(|l| l.as_ref())
    }

    /// Leading positions that hold prefix keys or soft-prompt tokens rather than real tokens.
    pub fn virtual_tokens(&self) -> usize {
        self.virtual_tokens
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).and_then(|(k, _)| k.dim(1).ok()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.virtual_tokens = 0;
    }
}

/// Cos and sin tables.
type Rope = (Tensor, Tensor);

/// Rotary tables for positions `start..start + t`: cos and sin, each (t, 1, d) to broadcast over
/// heads, HF layout (the two halves of each head repeat the same frequencies).
fn rotary(start: usize, t: usize, d: usize, theta: f64, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = d / 2;
    // As transformers computes them: inverse frequencies and angles in f32.
    let inv: Vec<f32> = (0..half).map(|i| 1.0 / (theta.powf((2 * i) as f64 / d as f64) as f32)).collect();
    let mut cos = Vec::with_capacity(t * d);
    let mut sin = Vec::with_capacity(t * d);
    for p in start..start + t {
        for _ in 0..2 {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    Ok((Tensor::from_vec(cos, (t, 1, d), device)?, Tensor::from_vec(sin, (t, 1, d), device)?))
}

impl Attention {
    /// Queries, keys and values of `x` (b, t, ·), heads interleaved along the last dimension.
    fn project(&self, x: &Tensor, ctx: &ForwardCtx, exact: bool) -> Result<(Tensor, Tensor, Tensor)> {
        match &self.qkv {
            Qkv::Split { q_proj, k_proj, v_proj } => {
                Ok((q_proj.forward(x, ctx, exact)?, k_proj.forward(x, ctx, exact)?, v_proj.forward(x, ctx, exact)?))
            }
            Qkv::Fused(l) => {
                let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
                let mut parts = split_last(&l.forward(x, ctx, exact)?, &[q, kv, kv])?.into_iter();
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(q), Some(k), Some(v)) => Ok((q, k, v)),
                    _ => Err(Error::Delta("qkv_proj: split failed".into())),
                }
            }
        }
    }

    /// `x`: (b, t, h); `key_bias`: (b, p + t) additive key mask over the cached and new positions
    /// (attention is causal on top of it). Appends this step's keys and values to `cache`.
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        key_bias: &Tensor,
        cache: &mut Option<(Tensor, Tensor)>,
        ctx: &ForwardCtx,
        exact: bool,
    ) -> Result<Tensor> {
        let x = self.site.pre(x, ctx)?;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        // Heads interleaved along the last dimension, (b, t, n·d): rotary per (t, head).
        let rotated = |y: Tensor, n: usize| -> Result<Tensor> {
            let y = ops::rope(&y.reshape((b, t, n, d))?, &rope.0, &rope.1)?;
            Ok(y.reshape((b, t, n * d))?)
        };
        let normed = |y: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            match norm {
                Some(nm) => Ok(nm.forward(&y.reshape((b, t, n, d))?, ctx)?.reshape((b, t, n * d))?),
                None => Ok(y),
            }
        };
        let (q, k, v) = self.project(&x, ctx, exact)?;
        let q = normed(q, nh, &self.q_norm)?;
        let q = rotated(q, nh)?;
        let q = match self.q_scale {
            Some(f) => (q * f)?,
            None => q,
        };
        let k = rotated(normed(k, nkv, &self.k_norm)?, nkv)?;
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let out = self.attend(&q, &k, &v, key_bias)?;
        let y = self.o_proj.forward(&out, ctx, exact)?;
        self.site.post(&x, y, ctx)
    }

    /// Causal attention of `q` (b, tq, heads · d) over `k`, `v` (b, tk, kv_heads · d), through the
    /// sliding window once the keys outgrow it. Grouped-query attention: each key/value head
    /// serves `heads / kv_heads` consecutive query heads; the fused attention reads k and v in
    /// place, the composed sliding window expands them.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, key_bias: &Tensor) -> Result<Tensor> {
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let (b, total, _) = k.dims3()?;
        match self.window {
            Some(w) if total > w => {
                let rep = nh / nkv;
                let expand = |y: &Tensor| -> Result<Tensor> {
                    if rep == 1 {
                        return Ok(y.clone());
                    }
                    Ok(y.reshape((b, total, nkv, 1, d))?.expand((b, total, nkv, rep, d))?.reshape((b, total, nh * d))?)
                };
                sliding_attention(q, &expand(k)?, &expand(v)?, key_bias, nh, w)
            }
            _ => ops::causal_attention(q, k, v, key_bias, nh),
        }
    }
}

/// Causal attention where query i (of the last tq of tk positions) attends only the keys at most
/// `window − 1` positions back, as transformers' and llama.cpp's sliding-window layers do. Composed
/// from candle ops; used only once the sequence outgrows the window.
fn sliding_attention(q: &Tensor, k: &Tensor, v: &Tensor, key_bias: &Tensor, heads: usize, window: usize) -> Result<Tensor> {
    let (b, tq, h) = q.dims3()?;
    let tk = k.dim(1)?;
    let d = h / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> { Ok(t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()?) };
    let (qh, kh, vh) = (split(q, tq)?, split(k, tk)?, split(v, tk)?);
    let past = tk - tq;
    let band: Vec<f32> = (0..tq)
        .flat_map(|i| (0..tk).map(move |j| if j <= past + i && past + i - j < window { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let band = Tensor::from_vec(band, (1, 1, tq, tk), q.device())?;
    let scores = (qh.matmul(&kh.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = scores.broadcast_add(&key_bias.reshape((b, 1, 1, tk))?)?.broadcast_add(&band)?;
    let ctx = ops::softmax_composed(&scores)?.matmul(&vh)?;
    Ok(ctx.transpose(1, 2)?.reshape((b, tq, h))?)
}

impl Attention {
    /// One decoding step for independent sequences (continuous batching): `x` (b, 1, h) holds
    /// one new position per row; row `i` sits at position `ropes[i]`'s and attends to its own
    /// cache `caches[i][layer]`. Projections and deltas run on the whole batch, rotary positions
    /// and attention per row.
    fn forward_rows(
        &self,
        x: &Tensor,
        ropes: &[(Tensor, Tensor)],
        caches: &mut [&mut KvCache],
        layer: usize,
        ctx: &ForwardCtx,
        exact: bool,
    ) -> Result<Tensor> {
        let x = self.site.pre(x, ctx)?;
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let (q, k, v) = self.project(&x, ctx, exact)?;
        let mut outs = Vec::with_capacity(caches.len());
        for (i, cache) in caches.iter_mut().enumerate() {
            let rope = &ropes[i];
            let rot = |y: Tensor, n: usize| -> Result<Tensor> { Ok(ops::rope(&y.reshape((1, 1, n, d))?, &rope.0, &rope.1)?.reshape((1, 1, n * d))?) };
            let qi = rot(q.narrow(0, i, 1)?, nh)?;
            let ki = rot(k.narrow(0, i, 1)?, nkv)?;
            let vi = v.narrow(0, i, 1)?;
            let slot = &mut cache.layers[layer];
            let (ki, vi) = match slot.take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &ki], 1)?, Tensor::cat(&[&pv, &vi], 1)?),
                None => (ki, vi),
            };
            *slot = Some((ki.clone(), vi.clone()));
            let total = ki.dim(1)?;
            let bias = Tensor::zeros((1, total), candle_core::DType::F32, x.device())?;
            // Grouped-query attention reads the cached key/value heads in place.
            outs.push(self.attend(&qi, &ki, &vi, &bias)?);
        }
        let out = Tensor::cat(&outs, 0)?;
        let y = self.o_proj.forward(&out, ctx, exact)?;
        self.site.post(&x, y, ctx)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx, exact: bool) -> Result<Tensor> {
        let x = self.site.pre(x, ctx)?;
        let (g, u) = match &self.gate_up {
            GateUp::Split { gate_proj, up_proj } => (gate_proj.forward(&x, ctx, exact)?, up_proj.forward(&x, ctx, exact)?),
            GateUp::Fused(l) => {
                let y = l.forward(&x, ctx, exact)?;
                let half = y.dim(y.rank() - 1)? / 2;
                let mut parts = split_last(&y, &[half, half])?.into_iter();
                match (parts.next(), parts.next()) {
                    (Some(g), Some(u)) => (g, u),
                    _ => return Err(Error::Delta("gate_up_proj: split failed".into())),
                }
            }
        };
        let act = if self.gelu { (ops::gelu_tanh(&g)? * u)? } else { ops::swiglu(&g, &u)? };
        let y = self.down_proj.forward(&act, ctx, exact)?;
        self.site.post(&x, y, ctx)
    }
}

// ---------------------------------------------------------------------------------------------
// The model.

/// A Llama-family decoder with its LM head.
#[derive(Debug)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    pub source: LlamaSource,
    root: Site,
    model: Site,
    layers_site: Site,
    embed_tokens: Site,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Linear>,
    fingerprint: String,
    /// Always dequantize into an f32 matmul (bit-for-bit the maths of an f32 reference), instead
    /// of the quantized dot-product kernels used for a few rows at a time.
    exact: bool,
    device: Device,
}

/// Weights by HF name, from either source.
enum Weights {
    Gguf(GgufFile, LlamaConfig),
    St(TensorFile),
}

impl Weights {
    /// A matrix (out, in): kept quantized from GGUF (unless stored as F32), f32 from safetensors.
    fn matrix(&mut self, hf: &str, out: usize, inp: usize, site: Site) -> Result<Site> {
        match self {
            Weights::St(st) => Ok(site.with_param("weight", st.get_f32(&format!("{hf}.weight"), &[out, inp])?)),
            Weights::Gguf(g, c) => {
                let name = gguf_name_for(c.arch, hf);
                let mut q = g.tensor(&name, &[out, inp])?;
                // llama.cpp interleaves the rotary halves of the query/key rows; undo it.
                if !c.arch.gguf_permutes_rotary() {
                } else if hf.ends_with("q_proj") {
                    q = permute_rows(&q, &unpermute_rotary_order(out, c.num_attention_heads))?;
                } else if hf.ends_with("k_proj") {
                    q = permute_rows(&q, &unpermute_rotary_order(out, c.num_key_value_heads))?;
                }
                if q.dtype() == GgmlDType::F32 {
                    Ok(site.with_param("weight", q.dequantize(&Device::Cpu)?))
                } else {
                    Ok(site.with_quantized("weight", Arc::new(q)))
                }
            }
        }
    }

    /// A vector, always f32.
    fn vector(&mut self, hf: &str, n: usize) -> Result<Tensor> {
        match self {
            Weights::St(st) => st.get_f32(&format!("{hf}.weight"), &[n]),
            Weights::Gguf(g, c) => Ok(g.tensor(&gguf_name_for(c.arch, hf), &[n])?.dequantize(&Device::Cpu)?),
        }
    }

    /// A norm's effective multiplier: HF Gemma stores `w` and multiplies by `1 + w`; GGUF stores `1 + w`.
    fn norm(&mut self, hf: &str, n: usize, arch: Arch) -> Result<Tensor> {
        let w = self.vector(hf, n)?;
        Ok(if arch.norm_offset() && matches!(self, Weights::St(_)) { (w + 1.0)? } else { w })
    }

    /// The bias of linear `hf` (out), f32.
    fn bias(&mut self, hf: &str, n: usize) -> Result<Tensor> {
        match self {
            Weights::St(st) => st.get_f32(&format!("{hf}.bias"), &[n]),
            Weights::Gguf(g, c) => {
                let name = gguf_name_for(c.arch, hf).replace(".weight", ".bias");
                let mut b = g.tensor(&name, &[n])?.dequantize(&Device::Cpu)?;
                if c.arch.gguf_permutes_rotary() && (hf.ends_with("q_proj") || hf.ends_with("k_proj")) {
                    let heads = if hf.ends_with("q_proj") { c.num_attention_heads } else { c.num_key_value_heads };
                    let order: Vec<u32> = unpermute_rotary_order(n, heads).into_iter().map(|i| i as u32).collect();
                    b = b.index_select(&Tensor::new(order, &Device::Cpu)?, 0)?;
                }
                Ok(b)
            }
        }
    }

    fn has(&self, hf: &str) -> bool {
        match self {
            Weights::St(st) => st.contains(&format!("{hf}.weight")),
            Weights::Gguf(g, c) => g.contains(&gguf_name_for(c.arch, hf)),
        }
    }
}

/// The GGUF tensor name of an HF module path (`model.layers.3.self_attn.q_proj` → `blk.3.attn_q.weight`).
pub fn gguf_name(hf: &str) -> String {
    gguf_name_for(Arch::Llama, hf)
}

/// [`gguf_name`] for architecture `arch` (Gemma's extra norms have their own names).
pub fn gguf_name_for(arch: Arch, hf: &str) -> String {
    if arch == Arch::Gemma3 {
        if let Some((n, module)) = hf.strip_prefix("model.layers.").and_then(|t| t.split_once('.')) {
            let g = match module {
                "post_attention_layernorm" => Some("post_attention_norm"),
                "pre_feedforward_layernorm" => Some("ffn_norm"),
                "post_feedforward_layernorm" => Some("post_ffw_norm"),
                _ => None,
            };
            if let Some(g) = g {
                return format!("blk.{n}.{g}.weight");
            }
        }
    }
    let rest = match hf {
        "model.embed_tokens" => return "token_embd.weight".into(),
        "model.norm" => return "output_norm.weight".into(),
        "lm_head" => return "output.weight".into(),
        _ => hf,
    };
    let Some(tail) = rest.strip_prefix("model.layers.") else { return format!("{hf}.weight") };
    let (n, module) = tail.split_once('.').unwrap_or((tail, ""));
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" => "attn_qkv",
        "mlp.gate_up_proj" => "ffn_up",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => other,
    };
    format!("blk.{n}.{g}.weight")
}

/// Where a decoder's weights are.
#[derive(Clone, Debug, PartialEq)]
pub enum DecoderPath {
    Gguf(PathBuf),
    /// An HF directory (config.json + model.safetensors).
    Hf(PathBuf),
}

impl DecoderPath {
    /// Resolves a `.gguf` file, an HF directory, or a directory holding exactly one `.gguf` file.
    pub fn resolve(path: &Path) -> Result<Self> {
        if path.is_dir() && !path.join("config.json").is_file() {
            return match gguf_files(path).map_err(|e| Error::io(path, e))?.as_slice() {
                [one] => Ok(DecoderPath::Gguf(one.clone())),
                [] => Err(Error::NotFound { path: path.to_path_buf(), what: "config.json or a .gguf file".into() }),
                _ => Err(Error::arg("--model", format!("{} holds several .gguf files; name one", path.display()))),
            };
        }
        Ok(if path.is_dir() { DecoderPath::Hf(path.to_path_buf()) } else { DecoderPath::Gguf(path.to_path_buf()) })
    }
}

impl LlamaModel {
    /// Loads a `.gguf` file, or an HF directory (config.json + model.safetensors), or a directory
    /// holding exactly one `.gguf` file.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        match DecoderPath::resolve(path)? {
            DecoderPath::Gguf(p) => Self::load_gguf(&p, device),
            DecoderPath::Hf(d) => Self::load_hf(&d, device),
        }
    }

    /// Loads a GGUF file; matrices stay quantized.
    pub fn load_gguf(path: &Path, device: &Device) -> Result<Self> {
        Self::from_gguf(GgufFile::open(path)?, path, device)
    }

    /// Builds the model from an opened GGUF file (read from `path`); matrices stay quantized.
    pub fn from_gguf(g: GgufFile, path: &Path, device: &Device) -> Result<Self> {
        if !matches!(device, Device::Cpu) {
            return Err(Error::arg("--device", "GGUF decoders run on the CPU for now"));
        }
        let config = LlamaConfig::from_gguf(&g)?;
        let file_type = g
            .tensor_info(&gguf_name("model.layers.0.self_attn.q_proj"))
            .or_else(|| g.tensor_info(&gguf_name("model.layers.0.self_attn.qkv_proj")))
            .map(|(_, t)| format!("{t:?}"))
            .unwrap_or_else(|| "?".into());
        let mut hasher = Sha256::new();
        for name in g.tensor_names() {
            if let Some((dims, t)) = g.tensor_info(name) {
                hasher.update(format!("{name}{dims:?}{t:?}").as_bytes());
            }
        }
        let fp_head = hasher;
        let source = LlamaSource::Gguf { path: path.to_path_buf(), file_type };
        Self::build(Weights::Gguf(g, config.clone()), config, source, fp_head, device)
    }

    /// Loads an HF directory (config.json + model.safetensors) in f32.
    pub fn load_hf(dir: &Path, device: &Device) -> Result<Self> {
        let config = LlamaConfig::from_hf(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(Error::NotFound { path: weights, what: "model.safetensors".into() });
        }
        let st = TensorFile::load(&weights, device)?;
        let mut hasher = Sha256::new();
        for name in st.names() {
            hasher.update(name.as_bytes());
        }
        Self::build(Weights::St(st), config, LlamaSource::Safetensors { dir: dir.to_path_buf() }, hasher, device)
    }

    fn build(mut w: Weights, config: LlamaConfig, source: LlamaSource, mut hasher: Sha256, device: &Device) -> Result<Self> {
        let c = &config;
        let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (qo, kvo) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let embed_tokens = w.matrix("model.embed_tokens", c.vocab_size, h, Site::new("model.embed_tokens", SiteKind::Embedding, None))?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for n in 0..c.num_hidden_layers {
            let p = format!("model.layers.{n}");
            let l = Some(n);
            let mut lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
                let path = format!("{p}.{name}");
                Ok(Linear { site: w.matrix(&path, out, inp, Site::new(&path, SiteKind::Linear, l))? })
            };
            let mut qkv = if c.arch.fused() {
                Qkv::Fused(lin("self_attn.qkv_proj", qo + 2 * kvo, h)?)
            } else {
                Qkv::Split { q_proj: lin("self_attn.q_proj", qo, h)?, k_proj: lin("self_attn.k_proj", kvo, h)?, v_proj: lin("self_attn.v_proj", kvo, h)? }
            };
            let o_proj = lin("self_attn.o_proj", h, qo)?;
            let gate_up = if c.arch.fused() {
                GateUp::Fused(lin("mlp.gate_up_proj", 2 * i, h)?)
            } else {
                GateUp::Split { gate_proj: lin("mlp.gate_proj", i, h)?, up_proj: lin("mlp.up_proj", i, h)? }
            };
            let down_proj = lin("mlp.down_proj", h, i)?;
            if c.attention_bias {
                let widths: Vec<usize> = if c.arch.fused() { vec![qo + 2 * kvo] } else { vec![qo, kvo, kvo] };
                for (proj, n) in qkv.linears_mut().into_iter().zip(widths) {
                    let path = proj.site.path().to_string();
                    let b = w.bias(&path, n)?;
                    let site = std::mem::replace(&mut proj.site, Site::new("", SiteKind::Linear, None));
                    proj.site = site.with_param("bias", b);
                }
            }
            let mut norm = |name: &str, n: usize| -> Result<RmsNorm> {
                let path = format!("{p}.{name}");
                let t = w.norm(&path, n, c.arch)?;
                Ok(RmsNorm { site: Site::new(&path, SiteKind::RmsNorm, l).with_param("weight", t), eps: c.rms_norm_eps })
            };
            let (q_norm, k_norm) = if c.arch.qk_norm() {
                (Some(norm("self_attn.q_norm", d)?), Some(norm("self_attn.k_norm", d)?))
            } else {
                (None, None)
            };
            let gemma = c.arch == Arch::Gemma3;
            let q_scale = Some((d as f64 / c.query_pre_attn_scalar).sqrt()).filter(|f| (f - 1.0).abs() > 1e-12);
            let window = c.sliding_window.filter(|_| c.sliding_layers.get(n).copied().unwrap_or(false));
            layers.push(DecoderLayer {
                site: Site::new(&p, SiteKind::Layer, l),
                input_layernorm: norm("input_layernorm", h)?,
                post_attention_layernorm: norm("post_attention_layernorm", h)?,
                pre_feedforward_layernorm: if gemma { Some(norm("pre_feedforward_layernorm", h)?) } else { None },
                post_feedforward_layernorm: if gemma { Some(norm("post_feedforward_layernorm", h)?) } else { None },
                self_attn: Attention {
                    q_norm,
                    k_norm,
                    q_scale,
                    window,
                    site: Site::new(format!("{p}.self_attn"), SiteKind::SelfAttention, l),
                    qkv,
                    o_proj,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: d,
                },
                mlp: Mlp { site: Site::new(format!("{p}.mlp"), SiteKind::Mlp, l), gate_up, down_proj, gelu: gemma },
            });
        }
        let norm_w = w.norm("model.norm", h, c.arch)?;
        let norm = RmsNorm { site: Site::new("model.norm", SiteKind::RmsNorm, None).with_param("weight", norm_w), eps: c.rms_norm_eps };
        let lm_head = if w.has("lm_head") {
            Some(Linear { site: w.matrix("lm_head", c.vocab_size, h, Site::new("lm_head", SiteKind::Linear, None))? })
        } else {
            None
        };
        // Values in the fingerprint: the first norm weights (cheap, and they differ between checkpoints).
        for l in layers.iter().take(2) {
            if let Some(t) = l.input_layernorm.site.param("weight") {
                for v in t.to_vec1::<f32>()? {
                    hasher.update(v.to_le_bytes());
                }
            }
        }
        hasher.update(serde_json::to_string(&config).unwrap_or_default().as_bytes());
        let fingerprint = hasher.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
        Ok(LlamaModel {
            config,
            source,
            root: Site::new("", SiteKind::Model, None),
            model: Site::new("model", SiteKind::Encoder, None),
            layers_site: Site::new("model.layers", SiteKind::ModuleList, None),
            embed_tokens,
            layers,
            norm,
            lm_head,
            fingerprint,
            exact: false,
            device: device.clone(),
        })
    }

    /// Rotary tables for positions `start..start + t`: the global layers' and the sliding layers'
    /// (the same tables unless the sliding layers have their own base, as in Gemma 3).
    fn ropes(&self, start: usize, t: usize) -> Result<(Rope, Rope)> {
        let c = &self.config;
        let global = rotary(start, t, c.head_dim, c.rope_theta, &self.device)?;
        let local = if c.rope_local_theta != c.rope_theta { rotary(start, t, c.head_dim, c.rope_local_theta, &self.device)? } else { global.clone() };
        Ok((global, local))
    }

    /// Always multiply with dequantized f32 weights (see the field); slower for generation.
    pub fn set_exact(&mut self, exact: bool) {
        self.exact = exact;
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Positions the active deltas add in front of the tokens (prefix keys and soft prompts).
    pub fn num_virtual_tokens(&self) -> usize {
        self.model.num_virtual_tokens() + self.embed_tokens.num_virtual_tokens()
    }

    /// Positions the deltas running in the forward of `ctx` add in front of the tokens.
    pub fn num_virtual_tokens_in(&self, ctx: &ForwardCtx) -> usize {
        self.model.num_virtual_tokens_in(ctx) + self.embed_tokens.num_virtual_tokens_in(ctx)
    }

    /// Token embeddings (b, t) u32 → (b, t, h).
    fn embed(&self, ids: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let s = &self.embed_tokens;
        let y = match s.quantized("weight") {
            Some(q) => q.embedding(ids)?,
            None => {
                let w = s.require("weight", ctx)?;
                let (b, t) = ids.dims2()?;
                w.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, w.dim(1)?))?
            }
        };
        // Gemma scales the embeddings by √hidden (as an f32 number, like transformers).
        let y = if self.config.arch == Arch::Gemma3 { (y * ((self.config.hidden_size as f32).sqrt() as f64))? } else { y };
        s.post(ids, y, ctx)
    }

    /// The additive key mask (b, total) from `key_mask` (b, total; 1 = real token, 0 = padding),
    /// zeros without one.
    fn key_bias(&self, b: usize, total: usize, key_mask: Option<&Tensor>) -> Result<Tensor> {
        match key_mask {
            Some(m) if m.dims() != [b, total] => Err(Error::Delta(format!("key mask has shape {:?}, expected [{b}, {total}]", m.dims()))),
            Some(m) => ops::mask_to_bias(m),
            None => Ok(Tensor::zeros((b, total), candle_core::DType::F32, &self.device)?),
        }
    }

    /// Runs the decoder on `ids` (b, t) that follow the `cache`'s positions (or start at 0 without
    /// a cache). `key_mask` (b, p + t), 1 for real tokens and 0 for padding, covers the real tokens
    /// only (cached and new) and masks keys beyond the causal mask. Returns the final hidden states
    /// (b, t, h) of the real tokens, after the last norm.
    ///
    /// Deltas that add virtual tokens enter at the first call on an empty cache: prefix keys and
    /// values (the `model` site's prefix deltas) fill the first cache positions, soft prompts (the
    /// `model.embed_tokens` site's prompt deltas) go before the tokens; both stay in the cache
    /// for later steps, and real positions start after them.
    pub fn forward(&self, ids: &Tensor, key_mask: Option<&Tensor>, cache: Option<&mut KvCache>, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut local = KvCache::default();
        let caller_cache = cache.is_some();
        let cache = cache.unwrap_or(&mut local);
        if cache.layers.len() != self.layers.len() {
            *cache = KvCache::new(self.layers.len());
        }
        let (b, t) = ids.dims2()?;
        let fresh = cache.is_empty();
        if fresh {
            cache.virtual_tokens = 0;
            for n in 0..self.layers.len() {
                cache.layers[n] = self.model.prefixes(n, b, ctx)?;
            }
            cache.virtual_tokens = cache.len();
        }
        let x = self.embed(ids, ctx)?;
        let (x, prompts) = match fresh.then(|| self.embed_tokens.prompts(b, ctx)).transpose()?.flatten() {
            Some(p) => {
                let n = p.dim(1)?;
                cache.virtual_tokens += n;
                (Tensor::cat(&[&p, &x], 1)?, n)
            }
            None => (x, 0),
        };
        let past = cache.len();
        let len = prompts + t;
        if past + len > self.config.max_position_embeddings {
            return Err(Error::arg(
                "--prompt",
                format!(
                    "{} tokens ({} virtual) exceed the model's context of {}",
                    past + len,
                    cache.virtual_tokens,
                    self.config.max_position_embeddings
                ),
            ));
        }
        let key_mask = self.with_virtual_keys(key_mask, b, cache.virtual_tokens)?;
        let rope = self.ropes(past, len)?;
        let bias = self.key_bias(b, past + len, key_mask.as_ref())?;
        let x = self.root.pre(&x, ctx)?;
        let mut x = self.model.pre(&x, ctx)?;
        for (n, l) in self.layers.iter().enumerate() {
            x = self.layer_forward(l, &x, &rope, &bias, &mut cache.layers[n], ctx, !caller_cache)?;
        }
        let x = if prompts > 0 { x.narrow(1, prompts, t)? } else { x };
        self.norm.forward(&x, ctx)
    }

    /// One decoding step for `ids.len()` independent sequences (continuous batching): row `i`
    /// feeds token `ids[i]` after the positions already in `caches[i]` (each filled by a
    /// [`LlamaModel::forward`] prefill of that sequence alone, so prefixes and soft prompts are in
    /// it). Rows may be at different lengths; with a [`crate::core::RowRoute`] in `ctx` each row
    /// runs its own deltas (row-local ones only). Returns the final hidden states (b, h); row `i`
    /// equals what a one-row forward of that sequence gives.
    pub fn decode_rows(&self, ids: &[u32], caches: &mut [&mut KvCache], ctx: &ForwardCtx) -> Result<Tensor> {
        let b = ids.len();
        if b == 0 || caches.len() != b {
            return Err(Error::Delta(format!("decode_rows: {b} tokens for {} caches", caches.len())));
        }
        if let Some(r) = ctx.route {
            r.check(b)?;
        }
        // The row-wise step has the plain Llama block only (no query/key norms, extra norms,
        // per-layer rotary bases or sliding windows).
        let plain = matches!(self.config.arch, Arch::Llama | Arch::Qwen2) && self.layers.iter().all(|l| l.self_attn.window.is_none());
        if !plain {
            return Err(Error::Delta(format!(
                "batched decoding of independent sequences supports the plain Llama block (llama, qwen2 without sliding windows), not {:?}",
                self.config.arch
            )));
        }
        let mut ropes = Vec::with_capacity(b);
        for c in caches.iter() {
            if c.layers.len() != self.layers.len() || c.is_empty() {
                return Err(Error::Delta("decode_rows: every sequence must be prefilled first".into()));
            }
            let past = c.len();
            if past + 1 > self.config.max_position_embeddings {
                return Err(Error::arg("max_tokens", format!("{} positions exceed the model's context of {}", past + 1, self.config.max_position_embeddings)));
            }
            ropes.push(rotary(past, 1, self.config.head_dim, self.config.rope_theta, &self.device)?);
        }
        let ids = Tensor::new(ids, &self.device)?.unsqueeze(1)?;
        let x = self.embed(&ids, ctx)?;
        let x = self.root.pre(&x, ctx)?;
        let mut x = self.model.pre(&x, ctx)?;
        for (n, l) in self.layers.iter().enumerate() {
            let h0 = l.site.pre(&x, ctx)?;
            let a = l.self_attn.forward_rows(&l.input_layernorm.forward(&h0, ctx)?, &ropes, caches, n, ctx, self.exact)?;
            let h = (&h0 + a)?;
            let m = l.mlp.forward(&l.post_attention_layernorm.forward(&h, ctx)?, ctx, self.exact)?;
            x = l.site.post(&h0, (h + m)?, ctx)?;
        }
        Ok(self.norm.forward(&x, ctx)?.squeeze(1)?)
    }

    /// Layers `range` over a whole sequence `x` (b, t, h) without a cache: positions start after
    /// the prefix, and each layer's prefix keys and values come first. `mask` (b, t) covers `x`.
    fn run_layers(
        &self,
        mut x: Tensor,
        mask: &Tensor,
        range: std::ops::Range<usize>,
        ctx: &ForwardCtx,
        collected: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        if range.is_empty() {
            return Ok(x);
        }
        let (b, t, _) = x.dims3()?;
        let past = self.model.num_virtual_tokens_in(ctx);
        if past + t > self.config.max_position_embeddings {
            return Err(Error::arg(
                "--max-length",
                format!("{} tokens ({past} prefix) exceed the model's context of {}", past + t, self.config.max_position_embeddings),
            ));
        }
        let rope = self.ropes(past, t)?;
        let bias = self.key_bias(b, past + t, self.with_virtual_keys(Some(mask), b, past)?.as_ref())?;
        for n in range {
            let mut slot = self.model.prefixes(n, b, ctx)?;
            x = self.layer_forward(&self.layers[n], &x, &rope, &bias, &mut slot, ctx, true)?;
            if ctx.output_hidden_states {
                collected.push(x.clone());
            }
        }
        Ok(x)
    }

    /// `key_mask` (b, p) over real tokens, with ones in front for `virtual_tokens` positions.
    fn with_virtual_keys(&self, key_mask: Option<&Tensor>, b: usize, virtual_tokens: usize) -> Result<Option<Tensor>> {
        Ok(match key_mask {
            Some(m) if virtual_tokens > 0 => {
                let ones = Tensor::ones((b, virtual_tokens), m.dtype(), m.device())?;
                Some(Tensor::cat(&[&ones, m], 1)?)
            }
            other => other.cloned(),
        })
    }

    /// Layer `l` over `x` (b, t, h). `slot` holds the layer's cached (or prefix) keys and values
    /// and receives this step's; with `engine_ok` (the caller keeps no cache: the slot holds at
    /// most a prefix) the layer may run as one op of the block engine, which leaves the slot as
    /// it is.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: &DecoderLayer,
        x: &Tensor,
        ropes: &(Rope, Rope),
        bias: &Tensor,
        slot: &mut Option<(Tensor, Tensor)>,
        ctx: &ForwardCtx,
        engine_ok: bool,
    ) -> Result<Tensor> {
        let rope = if l.self_attn.window.is_some() && self.config.arch == Arch::Gemma3 { &ropes.1 } else { &ropes.0 };
        if engine_ok {
            if let Some(y) = self.engine_forward(l, x, rope, bias, slot.as_ref(), ctx)? {
                return Ok(y);
            }
        }
        let x = l.site.pre(x, ctx)?;
        let a = l.self_attn.forward(&l.input_layernorm.forward(&x, ctx)?, rope, bias, slot, ctx, self.exact)?;
        let y = match (&l.pre_feedforward_layernorm, &l.post_feedforward_layernorm) {
            (Some(pre), Some(post)) => {
                let h = (&x + l.post_attention_layernorm.forward(&a, ctx)?)?;
                let m = l.mlp.forward(&pre.forward(&h, ctx)?, ctx, self.exact)?;
                (&h + post.forward(&m, ctx)?)?
            }
            _ => {
                let h = (&x + a)?;
                let m = l.mlp.forward(&l.post_attention_layernorm.forward(&h, ctx)?, ctx, self.exact)?;
                (h + m)?
            }
        };
        l.site.post(&x, y, ctx)
    }

    /// The layer as one op of the block engine ([`ops::decoder_block`]) when it is a plain
    /// Llama layer (q, k, v and gate, up as separate maps, SwiGLU; no q/k norms, query scale or
    /// feed-forward norms; no sliding window reached; any prefix from the slot, no cache), every
    /// delta on it is one the engine
    /// computes — a LoRA or an (IA)³ scale on one of its seven maps (at most one per map), a
    /// bottleneck adapter after the attention or the feed-forward block, trained biases or norm
    /// weights (BitFit, LayerNorm tuning), trained f32 weights (full fine-tuning) — nothing is
    /// attached to the layer's own site, it trains (quantized weights are then multiplied dequantized, as the
    /// engine does) and a backward may follow. `None`: the module-by-module path.
    fn engine_forward(&self, l: &DecoderLayer, x: &Tensor, rope: &Rope, bias: &Tensor, prefix: Option<&(Tensor, Tensor)>, ctx: &ForwardCtx) -> Result<Option<Tensor>> {
        if !ops::engine_enabled() || !ctx.train || ctx.inference || ctx.route.is_some() {
            return Ok(None);
        }
        let (sa, mlp) = (&l.self_attn, &l.mlp);
        let plain = !mlp.gelu
            && sa.q_norm.is_none()
            && sa.k_norm.is_none()
            && sa.q_scale.is_none()
            && l.pre_feedforward_layernorm.is_none()
            && l.post_feedforward_layernorm.is_none();
        let (Qkv::Split { q_proj, k_proj, v_proj }, GateUp::Split { gate_proj, up_proj }) = (&sa.qkv, &mlp.gate_up) else {
            return Ok(None);
        };
        let (b, t, _) = x.dims3()?;
        let tk = t + prefix.map_or(Ok(0), |(k, _)| k.dim(1))?;
        if !plain || sa.window.is_some_and(|w| tk > w) || bias.dims() != [b, tk] {
            return Ok(None);
        }
        if l.site.has_active() {
            return Ok(None);
        }
        // The attention and feed-forward blocks may carry an adapter each, nothing else.
        let mut adapters: [Option<ops::Adapter>; 2] = Default::default();
        for (i, site) in [&sa.site, &mlp.site].into_iter().enumerate() {
            match site.engine_delta(ctx)? {
                Some(d) if d.lora.is_none() && d.scale.is_none() => adapters[i] = d.adapter,
                _ => return Ok(None),
            }
        }
        let maps = [q_proj, k_proj, v_proj, &sa.o_proj, gate_proj, up_proj, &mlp.down_proj];
        let mut linears = Vec::with_capacity(maps.len());
        let mut deltas: [ops::MapDelta; 7] = Default::default();
        for (j, m) in maps.iter().enumerate() {
            let s = &m.site;
            let Some(mut d) = s.engine_delta(ctx)? else { return Ok(None) };
            if d.adapter.is_some() {
                return Ok(None); // an adapter on a linear map: the engine takes them after a block
            }
            let weight = match (s.quantized("weight"), d.weight.take()) {
                // A weight in place of the map's own (OFT's W Rᵀ), unless the map's weight trains too.
                (None, Some(_)) if s.require("weight", ctx)?.track_op() => return Ok(None),
                (None, Some(w)) => ops::FrozenWeight::Dense(w),
                (Some(_), Some(_)) => return Ok(None),
                (Some(q), None) => ops::FrozenWeight::Quant(q.clone()),
                (None, None) => ops::FrozenWeight::Dense(s.require("weight", ctx)?),
            };
            deltas[j] = d;
            linears.push((weight, s.resolve("bias", ctx)?));
        }
        let Ok(linears) = <[_; 7]>::try_from(linears) else { return Ok(None) };
        let norm = |n: &RmsNorm| -> Result<Option<(Tensor, f64)>> {
            // Only parameter changes on a norm (LayerNorm tuning).
            match n.site.engine_delta(ctx)? {
                Some(d) if !d.is_some() => Ok(Some((n.site.require("weight", ctx)?, n.eps))),
                _ => Ok(None),
            }
        };
        let (Some(norm1), Some(norm2)) = (norm(&l.input_layernorm)?, norm(&l.post_attention_layernorm)?) else { return Ok(None) };
        let trains = deltas.iter().any(ops::MapDelta::is_some)
            || adapters.iter().any(Option::is_some)
            || linears.iter().any(|(w, b)| w.trains() || b.as_ref().is_some_and(Tensor::track_op))
            || prefix.is_some_and(|(k, v)| k.track_op() || v.track_op())
            || norm1.0.track_op()
            || norm2.0.track_op();
        if !x.track_op() && !trains {
            return Ok(None);
        }
        let block = ops::DecoderBlock { heads: sa.heads, kv_heads: sa.kv_heads, head_dim: sa.head_dim, linears, norm1, norm2, rope: rope.clone() };
        Ok(Some(ops::decoder_block(x, bias, &block, &deltas, &adapters, prefix)?))
    }

    /// Next-token logits (..., vocab) from final hidden states (..., h).
    pub fn logits(&self, hidden: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        match &self.lm_head {
            Some(head) => head.forward(hidden, ctx, self.exact),
            None => {
                let s = &self.embed_tokens;
                match s.quantized("weight") {
                    Some(q) => ops::qlinear(hidden, q, self.exact || ctx.train),
                    None => ops::linear(hidden, &s.require("weight", ctx)?, None),
                }
            }
        }
    }

    /// In training, the head's weight when the logits are a plain product with a frozen matrix
    /// (no delta on the head or, for tied embeddings, on the embedding; not trained): then the
    /// loss takes [`ops::head_log_prob`] instead of [`Self::logits`]. Evaluation keeps the
    /// logits (few target rows there, which the quantized kernels serve without dequantizing).
    pub fn frozen_head(&self, ctx: &ForwardCtx) -> Result<Option<ops::HeadWeight>> {
        if !ctx.train {
            return Ok(None);
        }
        let site = match &self.lm_head {
            Some(head) => &head.site,
            None => &self.embed_tokens,
        };
        if site.has_active() {
            return Ok(None);
        }
        if let Some(q) = site.quantized("weight") {
            return Ok(Some(ops::HeadWeight::Quantized(q.clone())));
        }
        let w = site.require("weight", ctx)?;
        Ok((!w.track_op()).then_some(ops::HeadWeight::Dense(w)))
    }

    /// Every site in forward order.
    pub fn sites(&self) -> Vec<&Site> {
        let mut v: Vec<&Site> = vec![&self.root, &self.model, &self.embed_tokens, &self.layers_site];
        for l in &self.layers {
            let (a, m) = (&l.self_attn, &l.mlp);
            v.extend([&l.site, &l.input_layernorm.site, &a.site]);
            v.extend(a.qkv.linears().into_iter().map(|p| &p.site));
            v.push(&a.o_proj.site);
            v.extend(a.q_norm.iter().chain(&a.k_norm).map(|n| &n.site));
            v.push(&l.post_attention_layernorm.site);
            v.extend(l.pre_feedforward_layernorm.iter().map(|n| &n.site));
            v.push(&m.site);
            v.extend(m.gate_up.linears().into_iter().map(|p| &p.site));
            v.push(&m.down_proj.site);
            v.extend(l.post_feedforward_layernorm.iter().map(|n| &n.site));
        }
        v.push(&self.norm.site);
        if let Some(h) = &self.lm_head {
            v.push(&h.site);
        }
        v
    }

    pub fn sites_mut(&mut self) -> Vec<&mut Site> {
        let mut v: Vec<&mut Site> = vec![&mut self.root, &mut self.model, &mut self.embed_tokens, &mut self.layers_site];
        for l in &mut self.layers {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            v.extend([&mut l.site, &mut l.input_layernorm.site, &mut a.site]);
            v.extend(a.qkv.linears_mut().into_iter().map(|p| &mut p.site));
            v.push(&mut a.o_proj.site);
            v.extend(a.q_norm.iter_mut().chain(a.k_norm.iter_mut()).map(|n| &mut n.site));
            v.push(&mut l.post_attention_layernorm.site);
            v.extend(l.pre_feedforward_layernorm.iter_mut().map(|n| &mut n.site));
            v.push(&mut m.site);
            v.extend(m.gate_up.linears_mut().into_iter().map(|p| &mut p.site));
            v.push(&mut m.down_proj.site);
            v.extend(l.post_feedforward_layernorm.iter_mut().map(|n| &mut n.site));
        }
        v.push(&mut self.norm.site);
        if let Some(h) = &mut self.lm_head {
            v.push(&mut h.site);
        }
        v
    }

    /// Total base parameters (a tied LM head counted once).
    pub fn num_params(&self) -> usize {
        self.sites().iter().map(|s| s.num_params()).sum()
    }

    /// Bytes the base weights occupy in memory as loaded, and as f32.
    pub fn weight_bytes(&self) -> (usize, usize) {
        let mut held = 0;
        let mut f32_bytes = 0;
        for s in self.sites() {
            for (_, t) in s.params() {
                held += t.elem_count() * t.dtype().size_in_bytes();
                f32_bytes += t.elem_count() * 4;
            }
            for (_, q) in s.quantized_params() {
                held += q.storage_size_in_bytes();
                f32_bytes += q.shape().elem_count() * 4;
            }
        }
        (held, f32_bytes)
    }

    pub fn tree(&self) -> ModuleTree {
        ModuleTree::from_sites(self.config.arch.model_type(), &self.sites())
    }
}

impl Backbone for LlamaModel {
    fn model_type(&self) -> &str {
        self.config.arch.model_type()
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
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
            kv_width: Some(c.num_key_value_heads * c.head_dim).filter(|&w| w != c.hidden_size),
        }
    }

    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The embedding table in f32 (dequantized on demand from GGUF).
    fn word_embeddings(&self) -> Result<Tensor> {
        match (self.embed_tokens.param("weight"), self.embed_tokens.quantized("weight")) {
            (Some(w), _) => Ok(w.clone()),
            (None, Some(q)) => Ok(q.dequantize(&self.device)?),
            _ => Err(Error::Delta("token embeddings missing".into())),
        }
    }

    /// Final hidden states (b, t, h) of a right-padded batch (causal attention, padding keys masked).
    fn forward(&self, batch: &crate::data::tokenize::EncodedBatch, ctx: &ForwardCtx) -> Result<crate::core::ModelOutput> {
        let mut collected = Vec::new();
        let (h, mask, nv) = self.forward_until(batch, 0, ctx, &mut collected)?;
        self.forward_layers(h, mask, nv, 0, ctx, collected)
    }

    /// Embeds the batch (soft prompts first, with ones prepended to the mask) and runs the first
    /// `k` layers. Returns the hidden states, the mask and the number of prompt positions.
    fn forward_until(
        &self,
        batch: &crate::data::tokenize::EncodedBatch,
        k: usize,
        ctx: &ForwardCtx,
        collected: &mut Vec<Tensor>,
    ) -> Result<(Tensor, Tensor, usize)> {
        let ids = &batch.input_ids;
        let b = ids.dim(0)?;
        let x = self.embed(ids, ctx)?;
        let mask = batch.attention_mask.to_dtype(candle_core::DType::F32)?;
        let (x, mask, num_virtual) = match self.embed_tokens.prompts(b, ctx)? {
            Some(p) => {
                let n = p.dim(1)?;
                let ones = Tensor::ones((b, n), candle_core::DType::F32, &self.device)?;
                (Tensor::cat(&[&p, &x], 1)?, Tensor::cat(&[&ones, &mask], 1)?, n)
            }
            None => (x, mask, 0),
        };
        let x = self.root.pre(&x, ctx)?;
        let x = self.model.pre(&x, ctx)?;
        if ctx.output_hidden_states {
            collected.push(x.clone());
        }
        let x = self.run_layers(x, &mask, 0..k.min(self.layers.len()), ctx, collected)?;
        Ok((x, mask, num_virtual))
    }

    fn forward_layers(
        &self,
        hidden: Tensor,
        mask: Tensor,
        num_virtual: usize,
        k: usize,
        ctx: &ForwardCtx,
        mut collected: Vec<Tensor>,
    ) -> Result<crate::core::ModelOutput> {
        let x = self.run_layers(hidden, &mask, k.min(self.layers.len())..self.layers.len(), ctx, &mut collected)?;
        let x = self.norm.forward(&x, ctx)?;
        Ok(crate::core::ModelOutput { last_hidden_state: x, attention_mask: mask, num_virtual, hidden_states: collected })
    }

    fn sites(&self) -> Vec<&Site> {
        LlamaModel::sites(self)
    }

    fn sites_mut(&mut self) -> Vec<&mut Site> {
        LlamaModel::sites_mut(self)
    }
}

/// Whether `path` names a decoder this module loads: a `.gguf` file, a directory holding one, or
/// an HF directory whose config.json declares a Llama-family `model_type`.
pub fn is_decoder_path(path: &Path) -> bool {
    if path.is_file() {
        return path.extension().is_some_and(|x| x == "gguf");
    }
    let cfg = path.join("config.json");
    if cfg.is_file() {
        return LlamaConfig::from_hf(&cfg).is_ok();
    }
    gguf_files(path).is_ok_and(|g| !g.is_empty())
}

/// The `.gguf` files directly inside `dir`.
fn gguf_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect())
}

/// The hidden size of the last position of each sequence: (b, t, h) → (b, h).
pub fn last_position(hidden: &Tensor) -> Result<Tensor> {
    let t = hidden.dim(1)?;
    Ok(hidden.narrow(1, t - 1, 1)?.squeeze(1)?)
}
