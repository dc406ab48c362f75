//! `deltatune plot RUN_DIR`: training loss and dev metric curves from metrics.jsonl.

use crate::args::PlotArgs;
use anyhow::Result;
use deltatune::plot::{line_charts, Panel, Series};
use deltatune::train::log::{read_records, Record};

pub fn run(a: PlotArgs) -> Result<()> {
    let path = a.run_dir.join("metrics.jsonl");
    if !path.is_file() {
        anyhow::bail!("{}: no metrics.jsonl (not a training run directory?)", a.run_dir.display());
    }
    let records = read_records(&path)?;
    let mut loss = Vec::new();
    let mut dev: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    let mut primary = String::new();
    for r in &records {
        match r {
            Record::Train { step, loss: l, .. } => loss.push((*step as f64, *l)),
            Record::Eval { step, metric, scores, .. } => {
                primary = metric.clone();
                for (k, v) in scores {
                    if let Some(v) = v.as_f64() {
                        dev.entry(k.clone()).or_default().push((*step as f64, v));
                    }
                }
            }
            Record::Search { step, loss: l, .. } => loss.push((*step as f64, *l)),
            Record::Epoch { .. } => {}
        }
    }
    if loss.is_empty() {
        anyhow::bail!("{}: no training records yet", path.display());
    }
    // A moving average over ~2% of the steps makes the trend readable.
    let w = (loss.len() / 50).max(1);
    let smooth: Vec<(f64, f64)> = (0..loss.len())
        .map(|i| {
            let lo = i.saturating_sub(w - 1);
            let s: f64 = loss[lo..=i].iter().map(|p| p.1).sum();
            (loss[i].0, s / (i - lo + 1) as f64)
        })
        .collect();
    let mut panels = vec![Panel {
        title: "training loss".into(),
        x_label: "step".into(),
        y_label: "loss".into(),
        series: vec![Series { name: "loss".into(), points: loss }, Series { name: format!("moving average ({w})"), points: smooth }],
    }];
    if !dev.is_empty() {
        panels.push(Panel {
            title: format!("dev metrics (model selection: {primary})"),
            x_label: "step".into(),
            y_label: "score".into(),
            series: dev.into_iter().map(|(k, v)| Series { name: k, points: v }).collect(),
        });
    }
    let mut written = Vec::new();
    for ext in ["png", "svg"] {
        let p = a.run_dir.join(format!("curves.{ext}"));
        line_charts(&p, &panels, 900)?;
        written.push(p.display().to_string());
    }
    println!("wrote {}", written.join(", "));
    Ok(())
}
