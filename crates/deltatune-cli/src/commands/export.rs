//! `deltatune export`: write a saved delta in PEFT's adapter format.

use crate::args::ExportArgs;
use anyhow::Result;
use deltatune::attach::AttachOptions;
use deltatune::{BertModel, Device};

pub fn run(a: ExportArgs) -> Result<()> {
    if a.format != "peft" {
        anyhow::bail!("invalid --format: `{}` (supported: peft)", a.format);
    }
    let mut model = BertModel::load(&super::model_dir(&a.model)?, &Device::Cpu)?;
    let loaded = deltatune::tuned::load_delta(&a.delta, &mut model, AttachOptions::default())?;
    let spec = match &a.name {
        Some(n) => loaded.specs.iter().find(|s| &s.name == n).ok_or_else(|| {
            anyhow::anyhow!("invalid --name: no delta `{n}` in {} (has: {})", a.delta.display(), loaded.specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "))
        })?,
        None => match loaded.specs.as_slice() {
            [one] => one,
            many => anyhow::bail!("{} holds {} deltas; choose one with --name", a.delta.display(), many.len()),
        },
    };
    let head: std::collections::BTreeMap<_, _> = loaded
        .extra_tensors
        .iter()
        .filter_map(|(k, t)| k.strip_prefix("head.").map(|r| (format!("classifier.{r}"), t.clone())))
        .collect();
    deltatune::io::peft::export(&a.out, &model, spec, &a.base_model_name, &head)?;
    println!("wrote PEFT adapter `{}` ({}) to {}", spec.name, spec.config.method(), a.out.display());
    Ok(())
}
