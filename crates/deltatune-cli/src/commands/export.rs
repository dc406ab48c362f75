//! `deltatune export`: write a saved delta in PEFT's adapter format or as a llama.cpp LoRA adapter.

use crate::args::ExportArgs;
use anyhow::Result;
use deltatune::api::{self, ExportSpec};

pub fn run(a: ExportArgs) -> Result<()> {
    let spec = ExportSpec {
        model: a.model.model.clone(),
        delta: a.delta.clone(),
        name: a.name.clone(),
        format: a.format,
        out: a.out.clone(),
        overwrite: a.overwrite,
        base_model_name: a.base_model_name.clone(),
    };
    let r = super::with_control(false, None, |ctl| api::export(&spec, ctl))?;
    let what = if a.format == deltatune::api::ExportFormat::Gguf { "llama.cpp adapter" } else { "PEFT adapter" };
    println!("wrote {what} `{}` ({}) to {}", r.name, r.method, r.out.display());
    Ok(())
}
