//! `deltatune eval`: score a trained delta on a split of its task (or of other data).

use crate::args::EvalArgs;
use anyhow::{Context, Result};
use deltatune::data::TaskOptions;
use deltatune::train::run::DataSource;
use deltatune::train::task::{prepare_split, scorer};
use deltatune::tuned::TaskModel;
use deltatune::{BertModel, Device, TextEncoder};

pub fn run(a: EvalArgs) -> Result<()> {
    let dir = super::trained_delta_dir(&a.delta);
    let backbone = BertModel::load(&super::model_dir(&a.model)?, &Device::Cpu)?;
    let (model, meta) = TaskModel::load(backbone, &dir)?;
    let (source, opts) = match super::data_source(&a.data)? {
        Some(s) => (s, super::task_options(&a.data)),
        None => {
            let s: DataSource = serde_json::from_value(meta.get("data").cloned().context("the delta records no data source; pass --task or --data")?)?;
            let o: TaskOptions = serde_json::from_value(meta.get("data_options").cloned().unwrap_or_default()).unwrap_or_default();
            (s, o)
        }
    };
    let task = source.load(&opts, &mut super::progress)?;
    let examples = match a.split.as_str() {
        "dev" => &task.dev,
        "train" => &task.train,
        "test" => task.test.as_ref().context("invalid --split: this task has no labelled test split")?,
        other => anyhow::bail!("invalid --split: `{other}` (dev, test, train)"),
    };
    let max_len = meta.get("task").and_then(|t| t["max_length"].as_u64()).unwrap_or(128) as usize;
    let enc = TextEncoder::from_file(&model.backbone.files.tokenizer, max_len)?;
    let data = prepare_split(examples, &enc)?;
    let sc = scorer(&task);
    let ev = deltatune::train::evaluate(&model, &data, a.batch_size, enc.pad_id(), &sc)?;
    let scores = ev.scores.context("no scores")?;
    if a.json {
        println!("{}", serde_json::json!({"task": task.name, "split": a.split, "examples": data.len(), "metric": scores.primary, "score": scores.primary_value(), "scores": scores.values, "loss": ev.loss}));
    } else {
        println!("{} {} ({} examples): {} = {:.4}", task.name, a.split, data.len(), scores.primary, scores.primary_value());
        for (k, v) in &scores.values {
            if *k != scores.primary {
                println!("  {k} = {v:.4}");
            }
        }
    }
    Ok(())
}
