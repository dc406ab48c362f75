//! `deltatune embed`: one JSON array of floats per input line.

use crate::args::EmbedArgs;
use anyhow::{Context, Result};
use deltatune::api::{self, EmbedSpec};
use deltatune::data::lines::read_lines;
use deltatune::io::atomic::check_output;
use std::io::Write;

pub fn run(a: EmbedArgs) -> Result<()> {
    if a.batch_size == 0 {
        anyhow::bail!("invalid --batch-size: must be at least 1");
    }
    if let Some(out) = &a.output {
        let mut inputs: Vec<(&str, &std::path::Path)> = a.input.iter().map(|p| ("--input", p.as_path())).collect();
        inputs.extend(a.model.model.iter().map(|p| ("--model", p.as_path())));
        check_output(out, "--output", a.overwrite, &inputs)?;
    }
    // Read (and validate) the input before the model, so bad input fails fast.
    let texts = read_lines(a.input.as_deref())?;
    let spec = EmbedSpec {
        model: a.model.model.clone(),
        deltas: super::delta_sources(&a.deltas)?,
        seed: a.deltas.seed,
        texts,
        pooling: a.pooling,
        normalize: a.normalize,
        max_length: a.max_length,
        batch_size: a.batch_size,
    };
    // A file output is written atomically at the end; stdout is streamed.
    let mut buffer: Vec<u8> = Vec::new();
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let to_file = a.output.is_some();
    super::with_control(false, None, |ctl| {
        api::embed(&spec, ctl, &mut |rows| {
            let sink: &mut dyn Write = if to_file { &mut buffer } else { &mut stdout };
            for row in rows {
                serde_json::to_writer(&mut *sink, &row).map_err(|e| deltatune::Error::Delta(format!("writing embeddings: {e}")))?;
                sink.write_all(b"\n").map_err(|e| deltatune::Error::Delta(format!("writing embeddings: {e}")))?;
            }
            Ok(())
        })
    })?;
    stdout.flush().context("writing to standard output")?;
    if let Some(p) = &a.output {
        deltatune::io::write_atomic(p, &buffer).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
