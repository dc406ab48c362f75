//! `deltatune bench`: speed measurements on the standard protocol, with the PyTorch baseline run
//! in the same invocation for ratios.

use crate::args::{BenchArgs, BenchForwardArgs, BenchWhat};
use anyhow::{Context, Result};
use deltatune::bench::{median, synthetic_batch, time_runs};
use deltatune::{Backbone, BertModel, Device, ForwardCtx, Pooling};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const TORCH_FORWARD: &str = include_str!("../../../../bench/torch_forward.py");

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Forward(f) => forward(f),
    }
}

/// Runs one of our embedded Python scripts with `python` and parses its last JSON line.
pub fn run_python(python: &Path, script: &str, name: &str, args: &[String]) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(name);
    std::fs::write(&path, script)?;
    let out = Command::new(python)
        .arg(&path)
        .args(args)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        anyhow::bail!("{} {name} failed: {}", python.display(), String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON output from the PyTorch side")?;
    Ok(serde_json::from_str(line)?)
}

fn forward(a: BenchForwardArgs) -> Result<()> {
    let dir = super::model_dir(&a.model)?;
    let model = BertModel::load(&dir, &Device::Cpu)?;
    let batch = synthetic_batch(a.batch, a.seq_len, 42, &Device::Cpu)?;
    let ctx = ForwardCtx::eval();
    let ms = time_runs(a.warmup, a.iters, || {
        model.forward(&batch, &ctx)?.pool(Pooling::Mean)?;
        Ok(())
    })?;
    let ours = median(&ms);
    let mut out = json!({
        "protocol": {"batch": a.batch, "seq_len": a.seq_len, "warmup": a.warmup, "iters": a.iters, "threads": a.bench_threads},
        "deltatune": {"forward_ms_median": ours, "sentences_per_s": a.batch as f64 / ours * 1e3},
    });
    if let Some(py) = &a.torch_python {
        let args: Vec<String> = vec![
            "--model-dir".into(), dir.display().to_string(),
            "--threads".into(), a.bench_threads.to_string(),
            "--batch".into(), a.batch.to_string(),
            "--seq-len".into(), a.seq_len.to_string(),
            "--warmup".into(), a.warmup.to_string(),
            "--iters".into(), a.iters.to_string(),
        ];
        let t = run_python(py, TORCH_FORWARD, "torch_forward.py", &args)?;
        let theirs = t["forward_ms_median"].as_f64().context("PyTorch result lacks forward_ms_median")?;
        out["pytorch"] = t;
        out["ratio_time_deltatune_over_pytorch"] = json!(ours / theirs);
        out["speedup"] = json!(theirs / ours);
    }
    if a.json {
        println!("{out}");
    } else {
        println!("forward, batch {} x {} tokens, {} threads, median of {}:", a.batch, a.seq_len, a.bench_threads, a.iters);
        println!("  deltatune: {:8.1} ms  {:8.1} sentences/s", ours, a.batch as f64 / ours * 1e3);
        if let Some(t) = out.get("pytorch") {
            let theirs = t["forward_ms_median"].as_f64().unwrap_or(f64::NAN);
            println!("  pytorch:   {:8.1} ms  {:8.1} sentences/s  (torch {})", theirs, a.batch as f64 / theirs * 1e3, t["torch"]);
            println!("  ratio (time deltatune / pytorch): {:.2}  → {:.2}x throughput", ours / theirs, theirs / ours);
        } else {
            println!("  (pass --torch-python PYTHON to run PyTorch side by side)");
        }
    }
    Ok(())
}
