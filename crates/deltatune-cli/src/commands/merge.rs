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
    if let Some(p) = a.model.model.as_deref().filter(|p| deltatune::backbone::llama::is_decoder_path(p)) {
        return decoder(p, &a);
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

/// Decoders: deltas folded into dequantized f32 weights, written as an HF Llama directory in
/// `--dtype`, then reloaded and compared on a probe text.
fn decoder(path: &std::path::Path, a: &MergeArgs) -> Result<()> {
    use deltatune::lm::CausalLm;
    let dtype = match a.dtype.as_str() {
        "f32" => deltatune::DType::F32,
        "f16" => deltatune::DType::F16,
        "bf16" => deltatune::DType::BF16,
        other => anyhow::bail!("invalid --dtype: `{other}` (expected f32, f16 or bf16)"),
    };
    let mut lm = CausalLm::load(path, &Device::Cpu)?;
    lm.model.set_exact(true);
    let (specs, dirs) = super::delta_specs(&a.deltas)?;
    if !specs.is_empty() {
        anyhow::bail!("invalid --delta: merging needs trained deltas (directories), not new specs");
    }
    for d in &dirs {
        let loaded = deltatune::tuned::load_delta(d, &mut lm.model, Default::default())?;
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
    }
    let probe = "The merged model must answer exactly like the unmerged one.";
    let ids = lm.tokenizer.encode(probe)?;
    let t = deltatune::Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let ctx = ForwardCtx::eval();
    let before = lm.model.logits(&lm.model.forward(&t, None, None, &ctx)?, &ctx)?;
    let merged = lm.model.write_merged(&a.out, dtype, &lm.tokenizer).with_context(|| format!("merging into {}", a.out.display()))?;
    let back = CausalLm::load(&a.out, &Device::Cpu)?;
    let after = back.model.logits(&back.model.forward(&t, None, None, &ctx)?, &ctx)?;
    let diff = (before - after.to_dtype(deltatune::DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    if a.json {
        println!("{}", serde_json::json!({"out": a.out, "merged_sites": merged, "dtype": a.dtype, "max_abs_logit_diff": diff}));
    } else {
        println!("merged {merged} modules into {} ({})", a.out.display(), a.dtype);
        println!("max |merged - unmerged| logit on a probe text: {diff:.2e}");
    }
    Ok(())
}
