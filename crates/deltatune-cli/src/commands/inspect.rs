//! `deltatune inspect`: the module tree with attached deltas and parameter counts, or a dry run
//! of delta patterns.

use crate::args::InspectArgs;
use anyhow::Result;
use deltatune::backbone::tree::{fmt_count, fold_paths};
use deltatune::{attach, Backbone, BertModel, Device};

pub fn run(a: InspectArgs) -> Result<()> {
    if let Some(p) = a.model.model.as_deref().filter(|p| deltatune::backbone::llama::is_decoder_path(p)) {
        return decoder(p, &a);
    }
    if a.dry_run {
        return dry_run(a);
    }
    let (model, _specs) = super::model_with_deltas(&a.model, &a.deltas)?;
    let tree = model.tree();
    if a.json {
        println!("{}", serde_json::to_string(&tree)?);
    } else {
        print!("{}", tree.render());
    }
    Ok(())
}

fn dry_run(a: InspectArgs) -> Result<()> {
    let (specs, dirs) = super::delta_specs(&a.deltas)?;
    if !dirs.is_empty() {
        anyhow::bail!("--dry-run checks delta specs; saved delta directories need no dry run");
    }
    let model = BertModel::load(&super::model_dir(&a.model)?, &Device::Cpu)?;
    let plan = attach::dry_run(&model.tree(), &specs)?;
    if a.json {
        println!("{}", serde_json::json!({ "patterns": plan.report }));
        return Ok(());
    }
    for r in &plan.report {
        match &r.error {
            Some(e) => println!("{} `{}`: UNMATCHED — {e}", r.delta, r.pattern),
            None => println!("{} `{}`: {} modules: {}", r.delta, r.pattern, fmt_count(r.matched.len()), fold_paths(&r.matched).join(", ")),
        }
    }
    let bad = plan.report.iter().filter(|r| r.error.is_some()).count();
    println!("{} patterns matched, {bad} unmatched", plan.report.len() - bad);
    Ok(())
}

/// A decoder's tree (with any --delta specs attached), parameters and weight memory.
fn decoder(path: &std::path::Path, a: &InspectArgs) -> Result<()> {
    let mut model = deltatune::backbone::llama::LlamaModel::load(path, &Device::Cpu)?;
    let (specs, dirs) = super::delta_specs(&a.deltas)?;
    if !dirs.is_empty() {
        anyhow::bail!("loading saved deltas onto a decoder is not supported by inspect yet");
    }
    attach::attach(&mut model, &specs, deltatune::attach::AttachOptions { seed: a.deltas.seed, tokenizer: None })?;
    let tree = model.tree();
    let (held, f32_bytes) = model.weight_bytes();
    if a.json {
        let mut v = serde_json::to_value(&tree)?;
        v["weight_bytes"] = held.into();
        v["weight_bytes_f32"] = f32_bytes.into();
        v["config"] = serde_json::to_value(&model.config)?;
        v["source"] = serde_json::to_value(&model.source)?;
        println!("{v}");
    } else {
        print!("{}", tree.render());
        println!(
            "base weights in memory: {:.1} MB (as f32: {:.1} MB, {:.2}x)",
            held as f64 / 1e6,
            f32_bytes as f64 / 1e6,
            f32_bytes as f64 / held.max(1) as f64
        );
    }
    Ok(())
}
