//! `deltatune plot RUN_DIR`: training loss and dev metric curves from metrics.jsonl.
//! `deltatune plot --series FILE.json --out PATH`: curves of several runs drawn together (e.g. the
//! dev score of every method against training steps, from an experiment's results file).

use crate::args::PlotArgs;
use anyhow::{Context, Result};
use deltatune::io::atomic::check_output;
use deltatune::plot::{line_charts, Panel, Series};
use deltatune::train::log::{read_records, Record};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeriesFile {
    panels: Vec<PanelSpec>,
    #[serde(default)]
    width: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PanelSpec {
    title: String,
    #[serde(default)]
    x_label: String,
    #[serde(default)]
    y_label: String,
    series: Vec<SeriesSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeriesSpec {
    name: String,
    points: Vec<(f64, f64)>,
}

/// Reads and checks a `--series` file: at least one panel, every panel with a point, every point
/// finite (a NaN would silently vanish from the figure).
fn read_series(path: &Path) -> Result<(Vec<Panel>, u32)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--series: reading {}", path.display()))?;
    let f: SeriesFile = serde_json::from_str(&text).with_context(|| format!("--series: {} is not a curves file", path.display()))?;
    if f.panels.is_empty() {
        anyhow::bail!("--series: {}: \"panels\" is empty", path.display());
    }
    let mut panels = Vec::new();
    for (i, p) in f.panels.into_iter().enumerate() {
        if p.series.iter().all(|s| s.points.is_empty()) {
            anyhow::bail!("--series: {}: panel {i} (\"{}\") has no points", path.display(), p.title);
        }
        for s in &p.series {
            if let Some((x, y)) = s.points.iter().find(|(x, y)| !x.is_finite() || !y.is_finite()) {
                anyhow::bail!("--series: {}: series \"{}\" of panel {i} has a non-finite point ({x}, {y})", path.display(), s.name);
            }
        }
        panels.push(Panel { title: p.title, x_label: p.x_label, y_label: p.y_label, series: p.series.into_iter().map(|s| Series { name: s.name, points: s.points }).collect() });
    }
    Ok((panels, f.width.unwrap_or(1000).clamp(300, 4000)))
}

fn run_series(series: &Path, out: &Path, overwrite: bool) -> Result<()> {
    let (panels, width) = read_series(series)?;
    let outs: Vec<PathBuf> = ["png", "svg"].iter().map(|e| PathBuf::from(format!("{}.{e}", out.display()))).collect();
    for o in &outs {
        check_output(o, "--out", overwrite, &[("--series", series)])?;
    }
    for o in &outs {
        line_charts(o, &panels, width)?;
    }
    println!("wrote {}", outs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    Ok(())
}

pub fn run(a: PlotArgs) -> Result<()> {
    if let Some(series) = &a.series {
        let out = a.out.as_deref().context("--series needs --out")?;
        return run_series(series, out, a.overwrite);
    }
    let run_dir = a.run_dir.as_deref().context("give a run directory or --series FILE")?;
    let path = run_dir.join("metrics.jsonl");
    if !path.is_file() {
        anyhow::bail!("{}: no metrics.jsonl (not a training run directory?)", run_dir.display());
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
        let p = run_dir.join(format!("curves.{ext}"));
        line_charts(&p, &panels, 900)?;
        written.push(p.display().to_string());
    }
    println!("wrote {}", written.join(", "));
    Ok(())
}
