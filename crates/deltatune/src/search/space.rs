//! Search spaces: lists of candidate (position, delta type, hyperparameters) triples over the
//! module tree, written in the same attach-by-name language as `--delta`. Each spec of a space is
//! expanded over the modules it matches; every (spec, module) pair is one candidate with its own
//! gate. Built-in spaces for BERT-family models (the reference's two, mapped to BERT):
//!
//! * `L`: rank-1 LoRA (lora_alpha 16, so scaling 16 as in the reference) in parallel on every
//!   attention (query, key, value, attention output) and feed-forward (intermediate, output) linear;
//! * `M`: `L` plus a bias delta (BitFit) on every linear and layer norm, a LayerNorm-weight delta
//!   (LN-fit) on every layer norm (the embeddings' included, like the reference's final layer
//!   norms), and a low-rank adapter after every attention and feed-forward block.

use crate::attach::{self, AttachOptions};
use crate::core::Backbone;
use crate::delta::{spec::parse_config_file, DeltaSpec, TargetModules};
use crate::error::{Error, Result};
use serde::Serialize;
use std::path::Path;

/// One candidate of a search space.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    /// Position in the space (= gate index).
    pub id: usize,
    /// The delta, targeting exactly one module.
    #[serde(skip)]
    pub spec: DeltaSpec,
    pub method: String,
    pub path: String,
    pub layer: Option<usize>,
    /// A short position label for tables and heatmaps (`q`, `ffn.out`, `ln.attn`, …).
    pub position: String,
    /// Trainable parameters of this candidate (n_i).
    pub params: usize,
}

/// A named list of candidate specs.
#[derive(Clone, Debug)]
pub struct Space {
    pub name: String,
    pub specs: Vec<DeltaSpec>,
}

/// Every linear inside a decoder block (`model.layers.N.self_attn.q_proj`, `...mlp.down_proj`, fused
/// `qkv_proj` / `gate_up_proj` alike).
const DECODER_LINEARS: &str = r"re:model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj";

const LINEARS: &[&str] = &["query", "key", "value", "attention.output.dense", "intermediate.dense", "re:encoder\\.layer\\.\\d+\\.output\\.dense"];

fn spec(cli: &str) -> Result<DeltaSpec> {
    DeltaSpec::parse_cli(cli)
}

impl Space {
    /// The reference's "L" space.
    pub fn lora() -> Result<Self> {
        Ok(Space { name: "L".into(), specs: vec![with_targets(spec("lora:r=1,lora_alpha=16")?, LINEARS)] })
    }

    /// The reference's "M" (mixed) space.
    pub fn mixed() -> Result<Self> {
        let mut specs = Self::lora()?.specs;
        let mut bias_targets: Vec<&str> = LINEARS.to_vec();
        bias_targets.push("LayerNorm");
        specs.push(with_targets(spec("bitfit")?, &bias_targets));
        specs.push(with_targets(spec("ln_tuning:bias=false")?, &["LayerNorm"]));
        specs.push(with_targets(
            spec("low_rank_adapter:rank=1,reduction_factor=32")?,
            &[r"re:encoder\.layer\.\d+\.attention\.output", r"re:encoder\.layer\.\d+\.output"],
        ));
        Ok(Space { name: "M".into(), specs })
    }

    /// The `L` space of a decoder: rank-1 LoRA on every linear of every block (attention and MLP,
    /// split or fused projections alike).
    pub fn decoder_lora() -> Result<Self> {
        Ok(Space { name: "L".into(), specs: vec![with_targets(spec("lora:r=1,lora_alpha=16")?, &[DECODER_LINEARS])] })
    }

    /// The `M` space of a decoder: `L` plus BitFit on every block linear, LN-fit on every RMSNorm
    /// (weights; they have no bias) and a low-rank adapter after every attention and MLP block.
    pub fn decoder_mixed() -> Result<Self> {
        let mut specs = Self::decoder_lora()?.specs;
        specs.push(with_targets(spec("bitfit")?, &[DECODER_LINEARS]));
        specs.push(with_targets(spec("ln_tuning:bias=false")?, &[r"re:model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)", "re:model\\.norm"]));
        specs.push(with_targets(spec("low_rank_adapter:rank=1,reduction_factor=32")?, &[r"re:model\.layers\.\d+\.(self_attn|mlp)"]));
        Ok(Space { name: "M".into(), specs })
    }

    /// [`Self::parse`] for a decoder (`L` and `M` are the decoder spaces).
    pub fn parse_decoder(name: &str) -> Result<(Self, Vec<String>)> {
        match name {
            "L" | "l" => Ok((Self::decoder_lora()?, Vec::new())),
            "M" | "m" => Ok((Self::decoder_mixed()?, Vec::new())),
            other => Self::parse(other),
        }
    }

    /// `L`, `M`, or a JSON file of specs (same format as `--delta-config`).
    pub fn parse(name: &str) -> Result<(Self, Vec<String>)> {
        match name {
            "L" | "l" => Ok((Self::lora()?, Vec::new())),
            "M" | "m" => Ok((Self::mixed()?, Vec::new())),
            path => {
                let p = Path::new(path);
                let text = std::fs::read_to_string(p).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Error::arg("--space", format!("`{path}` is neither L, M nor an existing JSON file")),
                    _ => Error::io(p, e),
                })?;
                let (specs, warnings) = parse_config_file(&text, path)?;
                if specs.is_empty() {
                    return Err(Error::arg("--space", format!("{path}: the space has no candidates")));
                }
                Ok((Space { name: path.to_string(), specs }, warnings))
            }
        }
    }

    /// Expands the space over `model`'s modules into candidates (each with its exact parameter
    /// count, measured by building it). Patterns that match nothing are errors naming them.
    pub fn candidates(&self, model: &mut dyn Backbone) -> Result<Vec<Candidate>> {
        for s in &self.specs {
            if !s.config.gateable() {
                return Err(Error::Delta(format!(
                    "search space: {} cannot be gated (its contribution is not a scalable term); use lora, ia3, adapters, bitfit or ln_tuning",
                    s.config.method()
                )));
            }
        }
        let named: Vec<DeltaSpec> = self.specs.iter().enumerate().map(|(i, s)| DeltaSpec { name: format!("space{i}"), ..s.clone() }).collect();
        let plan = attach::plan(&model.tree(), &named)?;
        let mut out = Vec::new();
        for e in &plan.entries {
            let base = &self.specs[e.spec];
            let id = out.len();
            let mut one = base.clone();
            one.name = format!("cand{id:04}");
            // An exact path in a list matches only itself (PEFT semantics), whatever the layer filter.
            one.targets.target_modules = Some(TargetModules::List(vec![e.path.clone()]));
            one.targets.layers_to_transform = None;
            one.targets.exclude_modules = None;
            let layer = model.site(&e.path).and_then(|s| s.layer());
            out.push(Candidate {
                id,
                method: base.config.method().to_string(),
                position: position_label(&e.path),
                path: e.path.clone(),
                layer,
                params: 0,
                spec: one,
            });
        }
        if out.is_empty() {
            return Err(Error::Delta("the search space has no candidates on this model".into()));
        }
        // Exact sizes: attach everything once, count, detach.
        let specs: Vec<DeltaSpec> = out.iter().map(|c| c.spec.clone()).collect();
        attach::attach(model, &specs, AttachOptions::default())?;
        let vars = attach::trainable_vars(model);
        for c in &mut out {
            let prefix = format!("{}.", c.spec.name);
            c.params = vars.iter().filter(|(n, _)| n.starts_with(&prefix)).map(|(_, v)| v.elem_count()).sum();
        }
        attach::detach_named(model, &specs);
        Ok(out)
    }
}

fn with_targets(mut s: DeltaSpec, targets: &[&str]) -> DeltaSpec {
    s.targets.target_modules = Some(TargetModules::List(targets.iter().map(|t| t.to_string()).collect()));
    s
}

/// `encoder.layer.3.attention.self.query` → `q`; positions name the columns of the heatmap.
pub fn position_label(path: &str) -> String {
    let tail = match path.find("encoder.layer.").map(|i| i + "encoder.layer.".len()).or_else(|| path.find("model.layers.").map(|i| i + "model.layers.".len())) {
        Some(i) => {
            let rest = &path[i..];
            rest.split_once('.').map(|(_, t)| t).unwrap_or("")
        }
        None => path,
    };
    match tail {
        // Decoder blocks.
        "self_attn.q_proj" => "q",
        "self_attn.k_proj" => "k",
        "self_attn.v_proj" => "v",
        "self_attn.qkv_proj" => "qkv",
        "self_attn.o_proj" => "attn.o",
        "self_attn" => "attn.out",
        "mlp.gate_proj" => "ffn.gate",
        "mlp.up_proj" => "ffn.up",
        "mlp.gate_up_proj" => "ffn.gate_up",
        "mlp.down_proj" => "ffn.down",
        "mlp" => "ffn",
        "input_layernorm" => "ln.attn",
        "post_attention_layernorm" => "ln.ffn",
        "model.norm" => "ln.final",
        "attention.self.query" => "q",
        "attention.self.key" => "k",
        "attention.self.value" => "v",
        "attention.output.dense" => "attn.o",
        "attention.output.LayerNorm" => "ln.attn",
        "attention.output" => "attn.out",
        "intermediate.dense" => "ffn.in",
        "output.dense" => "ffn.out",
        "output.LayerNorm" => "ln.ffn",
        "output" => "ffn",
        "embeddings.LayerNorm" => "ln.emb",
        other => other,
    }
    .to_string()
}
