//! `deltatune predict`: labels (with probabilities) or values for new texts, one JSON per line.

use crate::args::PredictArgs;
use anyhow::{Context, Result};
use deltatune::api::{self, PredictSpec};
use deltatune::data::readers::{read_texts, Format};
use deltatune::io::atomic::check_output;
use std::io::Write;

pub fn run(a: PredictArgs) -> Result<()> {
    if let Some(out) = &a.output {
        check_output(out, "--output", a.overwrite, &[("--input", &a.input), ("--delta", &a.delta)])?;
    }
    // Read the input first: bad input fails before any model work.
    let texts: Vec<(String, Option<String>)> = match Format::from_path(&a.input) {
        Ok(format) => {
            let (texts, note) = read_texts(&a.input, &a.text_col, a.text_pair_col.as_deref(), Some(format))?;
            if let Some(n) = note {
                eprintln!("warning: {n}");
            }
            texts
        }
        // Anything else: one text per line.
        Err(_) => deltatune::data::lines::read_lines(Some(&a.input))?.into_iter().map(|l| (l, None)).collect(),
    };
    let spec = PredictSpec { model: a.model.model.clone(), delta: a.delta.clone(), texts, batch_size: a.batch_size };
    let preds = super::with_control(false, None, |ctl| api::predict(&spec, ctl))?;
    let mut out = Vec::new();
    for p in &preds {
        out.extend(serde_json::to_vec(p)?);
        out.push(b'\n');
    }
    match &a.output {
        Some(p) => deltatune::io::write_atomic(p, &out).with_context(|| format!("writing {}", p.display()))?,
        None => std::io::stdout().lock().write_all(&out).context("writing to standard output")?,
    }
    Ok(())
}
