//! `deltatune embed`: one JSON array of floats per input line.

use crate::args::EmbedArgs;
use anyhow::{Context, Result};
use deltatune::backbone::l2_normalize;
use deltatune::data::lines::read_lines;
use deltatune::{Backbone, ForwardCtx, Padding, Pooling, TextEncoder};
use std::io::Write;

pub fn run(a: EmbedArgs) -> Result<()> {
    let pooling: Pooling = a.pooling.parse()?;
    if a.batch_size == 0 {
        anyhow::bail!("invalid --batch-size: must be at least 1");
    }
    // Read (and validate) the input before the model, so bad input fails fast.
    let lines = read_lines(a.input.as_deref())?;
    let (model, _) = super::model_with_deltas(&a.model, &a.deltas)?;
    let enc = TextEncoder::from_file(&model.files.tokenizer, a.max_length)?;
    // A file output is written atomically at the end; stdout is streamed.
    let mut buffer: Vec<u8> = Vec::new();
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let sink: &mut dyn Write = if a.output.is_some() { &mut buffer } else { &mut stdout };
    let ctx = ForwardCtx::eval();
    for chunk in lines.chunks(a.batch_size) {
        let items: Vec<(&str, Option<&str>)> = chunk.iter().map(|s| (s.as_str(), None)).collect();
        let batch = enc.batch(&items, Padding::Longest, model.device())?;
        let out = model.forward(&batch, &ctx)?;
        let mut e = out.pool(pooling)?;
        if a.normalize {
            e = l2_normalize(&e)?;
        }
        for row in e.to_vec2::<f32>()? {
            serde_json::to_writer(&mut *sink, &row)?;
            sink.write_all(b"\n")?;
        }
    }
    sink.flush()?;
    if let Some(p) = &a.output {
        deltatune::io::write_atomic(p, &buffer).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
