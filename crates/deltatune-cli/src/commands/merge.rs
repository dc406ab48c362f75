//! `deltatune merge`: fold mergeable deltas into the base weights and write a plain HF model (or a GGUF file).

use crate::args::{MergeArgs, MergeFormat};
use anyhow::Result;
use deltatune::api::{self, MergeSpec};
use deltatune::artifacts::GgufWeights;

pub fn run(a: MergeArgs) -> Result<()> {
    let gguf = match a.format {
        MergeFormat::Hf => None,
        // The weight types of a GGUF depend on the format, so --dtype is parsed here.
        MergeFormat::Gguf => Some(GgufWeights::parse(a.dtype.as_deref().unwrap_or("f16"))?),
    };
    let dtype = match (&gguf, a.dtype.as_deref()) {
        (None, Some(d)) => api::parse_dtype(d)?,
        _ => deltatune::DType::F32,
    };
    let spec = MergeSpec {
        model: a.model.model.clone(),
        deltas: super::delta_sources(&a.deltas)?,
        seed: a.deltas.seed,
        out: a.out.clone(),
        overwrite: a.overwrite,
        dtype,
        gguf,
    };
    let r = super::with_control(false, None, |ctl| api::merge(&spec, ctl))?;
    let dtype = match r.gguf {
        Some(w) => format!("gguf {}", serde_json::to_value(w)?.as_str().unwrap_or("?")),
        None => format!("{dtype:?}").to_lowercase(),
    };
    match (a.json, r.decoder) {
        (true, false) => println!("{}", serde_json::json!({"out": r.out, "deltas": r.deltas, "merged_sites": r.merged_sites, "max_abs_diff": r.max_abs_diff})),
        (true, true) => println!("{}", serde_json::json!({"out": r.out, "merged_sites": r.merged_sites, "dtype": dtype, "max_abs_logit_diff": r.max_abs_diff})),
        (false, false) => {
            println!("merged {} ({} modules) into {}", r.deltas.join(", "), r.merged_sites, r.out.display());
            println!("max |merged - unmerged| on probe sentences: {:.2e}", r.max_abs_diff);
        }
        (false, true) => {
            println!("merged {} modules into {} ({dtype})", r.merged_sites, r.out.display());
            println!("max |merged - unmerged| logit on a probe text: {:.2e}", r.max_abs_diff);
        }
    }
    Ok(())
}
