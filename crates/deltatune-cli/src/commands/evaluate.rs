//! `deltatune eval`: score a trained delta on a split of its task (or of other data).

use crate::args::EvalArgs;
use anyhow::Result;
use deltatune::api::{self, EvalSpec};

pub fn run(a: EvalArgs) -> Result<()> {
    let spec = EvalSpec {
        model: a.model.model.clone(),
        delta: a.delta.clone(),
        data: super::data_source(&a.data).map(|s| (s, super::task_options(&a.data))),
        split: a.split,
        batch_size: a.batch_size,
    };
    let r = super::with_control(false, None, |ctl| api::evaluate(&spec, ctl))?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"task": r.task, "split": r.split, "examples": r.examples, "metric": r.metric, "score": r.score, "scores": r.scores, "loss": r.loss})
        );
    } else {
        println!("{} {} ({} examples): {} = {:.4}", r.task, r.split.as_str(), r.examples, r.metric, r.score);
        for (k, v) in &r.scores {
            if *k != r.metric {
                println!("  {k} = {v:.4}");
            }
        }
    }
    Ok(())
}
