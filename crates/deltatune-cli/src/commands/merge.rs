//! `deltatune merge`: fold mergeable deltas into the base weights and write a plain HF model.

use crate::args::MergeArgs;
use anyhow::{Context, Result};
use deltatune::{Backbone, BertModel, Device, ForwardCtx, Padding, Pooling, TextEncoder};

const PROBE: &[(&str, Option<&str>)] =
    &[("The merged model must answer exactly like the unmerged one.", None), ("Short.", None), ("A pair of texts", Some("with a second segment"))];

pub fn run(a: MergeArgs) -> Result<()> {
    if a.deltas.delta.is_empty() && a.deltas.delta_config.is_none() {
        anyhow::bail!("invalid --delta: give at least one delta to merge");
    }
    let (mut model, specs) = super::model_with_deltas(&a.model, &a.deltas)?;
    let enc = TextEncoder::from_file(&model.files.tokenizer, 64)?;
    let batch = enc.batch(PROBE, Padding::Longest, &Device::Cpu)?;
    let before = model.forward(&batch, &ForwardCtx::eval())?.pool(Pooling::Mean)?;
    let files = model.files.clone();
    let merged = deltatune::tuned::write_merged(&mut model, &files, &a.out).with_context(|| format!("merging into {}", a.out.display()))?;
    // Check the written model: an ordinary load, no deltas, same outputs.
    let reloaded = BertModel::load(&a.out, &Device::Cpu)?;
    let after = reloaded.forward(&batch, &ForwardCtx::eval())?.pool(Pooling::Mean)?;
    let diff = (before - after)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    if a.json {
        println!("{}", serde_json::json!({"out": a.out, "deltas": names, "merged_sites": merged, "max_abs_diff": diff}));
    } else {
        println!("merged {} ({merged} modules) into {}", names.join(", "), a.out.display());
        println!("max |merged - unmerged| on probe sentences: {diff:.2e}");
    }
    Ok(())
}
