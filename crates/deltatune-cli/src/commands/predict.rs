//! `deltatune predict`: labels (with probabilities) or values for new texts, one JSON per line.

use crate::args::PredictArgs;
use anyhow::{Context, Result};
use deltatune::data::readers::{read_texts, Format};
use deltatune::data::LabelMap;
use deltatune::head::HeadKind;
use deltatune::train::{predict, Prepared};
use deltatune::tuned::TaskModel;
use deltatune::{BertModel, Device, TextEncoder};
use serde_json::json;
use std::io::Write;

pub fn run(a: PredictArgs) -> Result<()> {
    let dir = super::trained_delta_dir(&a.delta);
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
    let backbone = BertModel::load(&super::model_dir(&a.model)?, &Device::Cpu)?;
    let (model, meta) = TaskModel::load(backbone, &dir)?;
    let max_len = meta.get("task").and_then(|t| t["max_length"].as_u64()).unwrap_or(128) as usize;
    let labels: Option<LabelMap> = meta.get("task").and_then(|t| serde_json::from_value(t["labels"].clone()).ok());
    let enc = TextEncoder::from_file(&model.backbone.files.tokenizer, max_len)?;
    let mut data = Prepared::default();
    for (t, p) in &texts {
        data.encodings.push(enc.encode(t, p.as_deref())?);
        data.targets.push(0.0);
    }
    let (preds, logits, _) = predict(&model, &data, a.batch_size, enc.pad_id())?;
    let mut out = Vec::new();
    for (i, (p, l)) in preds.iter().zip(&logits).enumerate() {
        let row = match model.head.config.kind {
            HeadKind::Regression => json!({"index": i, "value": p}),
            HeadKind::Classification { .. } => {
                let m = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = l.iter().map(|x| (x - m).exp()).collect();
                let s: f32 = e.iter().sum();
                let id = *p as usize;
                let name = labels.as_ref().and_then(|m| m.name(id)).map(str::to_string).unwrap_or_else(|| id.to_string());
                let probs: serde_json::Map<String, serde_json::Value> = e
                    .iter()
                    .enumerate()
                    .map(|(k, v)| (labels.as_ref().and_then(|m| m.name(k)).map(str::to_string).unwrap_or_else(|| k.to_string()), json!(v / s)))
                    .collect();
                json!({"index": i, "label": name, "label_id": id, "probabilities": probs})
            }
        };
        out.extend(serde_json::to_vec(&row)?);
        out.push(b'\n');
    }
    match &a.output {
        Some(p) => deltatune::io::write_atomic(p, &out).with_context(|| format!("writing {}", p.display()))?,
        None => std::io::stdout().lock().write_all(&out)?,
    }
    Ok(())
}
