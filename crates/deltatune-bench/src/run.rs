//! `deltatune bench`: speed measurements on the standard protocol, with the PyTorch baseline run
//! in the same invocation for ratios.

use crate::args::{BenchAccuracyArgs, BenchArgs, BenchCacheArgs, BenchDecoderArgs, BenchForwardArgs, BenchMatmulArgs, BenchTrainArgs, BenchWhat};
use anyhow::{Context, Result};
use crate::measure::{median, synthetic_batch, time_runs};
use crate::methods;
use crate::args::ModelArgs;
use deltatune::api::{self, Control, Event, RunMode, TrainSpec};
use deltatune::delta::DeltaSpec;
use deltatune::{Backbone, BertModel, Device, ForwardCtx, Pooling};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const TORCH_FORWARD: &str = include_str!("../../../bench/torch_forward.py");
const TORCH_EPOCH: &str = include_str!("../../../bench/torch_epoch.py");
const TORCH_DECODER: &str = include_str!("../../../bench/torch_decoder.py");
const LLAMACPP_DECODER: &str = include_str!("../../../bench/llamacpp_decoder.py");
/// About 250 tokens of plain prose for the prompt-processing measurement.
fn long_prompt() -> String {
    "The history of the city begins with a small settlement on the banks of the river, where traders met each spring. ".repeat(11)
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Forward(f) => forward(f),
        BenchWhat::Train(t) => train(t),
        BenchWhat::Accuracy(t) => accuracy(t),
        BenchWhat::Cache(t) => cache(t),
        BenchWhat::Matmul(t) => matmul(t),
        BenchWhat::Merged(t) => merged(t),
        BenchWhat::Decoder(t) => decoder(t),
        BenchWhat::Serve(t) => crate::serve::run(t),
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
    let dir = model_dir(&a.model)?;
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

fn train(a: BenchTrainArgs) -> Result<()> {
    let dir = model_dir(&a.model)?;
    let methods: Vec<&str> = a.methods.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
    if a.single {
        let [m] = methods.as_slice() else { anyhow::bail!("--single takes one method") };
        let r = crate::measure::train_step_bench(&dir, m, a.batch, a.seq_len, a.warmup, a.steps, a.profile, a.ranks as usize)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    // The machine's limit: the FMA peak at the benchmark's threads and at one thread, measured
    // before and after the runs (the larger of each: see `measure::fma_peaks_after`).
    let cpu = crate::measure::cpu_model();
    let peaks_before = crate::measure::fma_peaks(a.bench_threads, a.scaling);
    let measure = |m: &str, threads: usize, ranks: u32| -> Result<Value> {
        // One process per method, so peak memory is per method.
        let out = Command::new(&exe)
            .args(["--threads", &threads.to_string(), "bench", "train", "--single", "--methods", m])
            .args(["--ranks", &ranks.to_string()])
            .args(["--batch", &a.batch.to_string(), "--seq-len", &a.seq_len.to_string()])
            .args(["--warmup", &a.warmup.to_string(), "--steps", &a.steps.to_string()])
            .args((a.profile && threads == a.bench_threads && ranks == 1).then_some("--profile"))
            .arg("--model")
            .arg(&dir)
            .output()?;
        if !out.status.success() {
            anyhow::bail!("benchmark of {m} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(out.stdout.split(|&b| b == b'\n').rev().find(|l| l.starts_with(b"{")).unwrap_or(b"{}"))?)
    };
    let mut rows = Vec::new();
    for m in &methods {
        eprintln!("deltatune: {m} ...");
        let mut ours = measure(m, a.bench_threads, 1)?;
        if a.scaling && a.bench_threads > 1 {
            eprintln!("deltatune: {m} on 1 thread ...");
            let one = measure(m, 1, 1)?;
            ours["one_thread"] = one;
        }
        if a.ranks > 1 {
            eprintln!("deltatune: {m} split over {} ranks ...", a.ranks);
            ours["ranks"] = measure(m, a.bench_threads, a.ranks)?;
        }
        let theirs = match (&a.torch_python, *m) {
            (Some(py), m) if methods::find(m)?.in_peft_baseline => {
                eprintln!("pytorch+peft: {m} ...");
                if !a.peft_script.is_file() {
                    anyhow::bail!("invalid --peft-script: {} not found", a.peft_script.display());
                }
                let o = Command::new(py)
                    .arg(&a.peft_script)
                    .args(["--method", m, "--mode", "bench", "--steps", &a.steps.to_string(), "--warmup", &a.warmup.to_string()])
                    .args(["--threads", &a.bench_threads.to_string(), "--batch", &a.batch.to_string(), "--seq-len", &a.seq_len.to_string()])
                    .arg("--model-dir")
                    .arg(&dir)
                    .output()
                    .with_context(|| format!("running {}", py.display()))?;
                if !o.status.success() {
                    anyhow::bail!("peft baseline for {m} failed: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or(""));
                }
                let text = String::from_utf8_lossy(&o.stdout);
                Some(serde_json::from_str::<Value>(text.lines().rev().find(|l| l.starts_with('{')).unwrap_or("{}"))?)
            }
            _ => None,
        };
        rows.push(json!({"method": m, "deltatune": ours, "pytorch": theirs}));
    }
    let (peak, peak1) = crate::measure::fma_peaks_after(peaks_before, a.bench_threads, a.scaling);
    // Achieved GFLOP/s and the share of the FMA peak at the same thread count.
    for r in &mut rows {
        let ours = &mut r["deltatune"];
        crate::measure::set_fraction_of_peak(ours, peak);
        for (key, p) in [("one_thread", peak1), ("ranks", peak)] {
            if let Some(v) = ours.get_mut(key) {
                crate::measure::set_fraction_of_peak(v, p);
            }
        }
    }
    let ratio = |r: &Value, k_ours: &str, k_theirs: &str| -> Option<f64> {
        Some(r["deltatune"][k_ours].as_f64()? / r["pytorch"][k_theirs].as_f64()?)
    };
    if a.json {
        let with_ratios: Vec<Value> = rows
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r["ratio_step"] = json!(ratio(&r, "step_ms_median", "step_ms_median"));
                r["ratio_step_ranks"] = json!(r["deltatune"]["ranks"]["step_ms_median"].as_f64().zip(r["pytorch"]["step_ms_median"].as_f64()).map(|(a, b)| a / b));
                r["ratio_fwd"] = json!(ratio(&r, "fwd_ms_median", "fwd_ms_median"));
                r["ratio_rss"] = json!(ratio(&r, "peak_rss_mb", "peak_rss_mb"));
                r
            })
            .collect();
        println!(
            "{}",
            json!({"protocol": {"batch": a.batch, "seq_len": a.seq_len, "warmup": a.warmup, "steps": a.steps, "threads": a.bench_threads},
                   "cpu": cpu, "fma_peak_gflops": peak, "fma_peak_gflops_1_thread": peak1, "methods": with_ratios})
        );
        return Ok(());
    }
    println!("CPU: {cpu}; FMA peak {peak:.0} GFLOP/s on {} threads{}", a.bench_threads, if peak1 != peak { format!(", {peak1:.0} on 1") } else { String::new() });
    println!("training step, batch {} x {}, fp32, {} threads, median of {} steps after {} warm-up", a.batch, a.seq_len, a.bench_threads, a.steps, a.warmup);
    println!("{:<8} {:>10} {:>10} {:>10} {:>10} {:>12} | {:>9} {:>9} {:>9} {:>9} | {:>6} {:>6} {:>6}",
        "method", "step ms", "fwd ms", "infer ms", "RSS MB", "trainable", "pt step", "pt fwd", "pt infer", "pt RSS", "step×", "fwd×", "RSS×");
    for r in &rows {
        let d = &r["deltatune"];
        let p = &r["pytorch"];
        let f = |v: &Value| v.as_f64().map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
        let rr = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        println!("{:<8} {:>10} {:>10} {:>10} {:>10} {:>12} | {:>9} {:>9} {:>9} {:>9} | {:>6} {:>6} {:>6}",
            r["method"].as_str().unwrap_or(""), f(&d["step_ms_median"]), f(&d["fwd_ms_median"]), f(&d["infer_ms_median"]), f(&d["peak_rss_mb"]),
            d["trainable_params"], f(&p["step_ms_median"]), f(&p["fwd_ms_median"]), f(&p["infer_ms_median"]), f(&p["peak_rss_mb"]),
            rr(ratio(r, "step_ms_median", "step_ms_median")), rr(ratio(r, "fwd_ms_median", "fwd_ms_median")), rr(ratio(r, "peak_rss_mb", "peak_rss_mb")));
    }
    println!("ratios are deltatune / PyTorch+PEFT (below 1 = deltatune better)");
    println!("\nthe machine's limit: GFLOP per step counted from the shapes (matmuls and attention; bench::measure::encoder_step_flops)");
    println!("{:<8} {:>9} {:>9} {:>8}{}", "method", "GFLOP", "GFLOP/s", "% peak", if a.scaling { "   | 1 thread: step ms, % peak, speed-up of the threads" } else { "" });
    for r in &rows {
        let d = &r["deltatune"];
        let g = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let mut line = format!("{:<8} {:>9.1} {:>9.0} {:>7.1}%", r["method"].as_str().unwrap_or(""), g(d, "step_gflop"), g(d, "gflops"), 100.0 * g(d, "fraction_of_peak"));
        let one = &d["one_thread"];
        if !one.is_null() {
            line += &format!("   | {:>8.1} {:>6.1}% {:>5.2}x", g(one, "step_ms_median"), 100.0 * g(one, "fraction_of_peak"), g(one, "step_ms_median") / g(d, "step_ms_median"));
        }
        println!("{line}");
    }
    if a.ranks > 1 {
        println!(
            "\nthe batch split over {} ranks in the process ({} thread(s) each, as `train --data-parallel {}`), against the same peak:",
            a.ranks,
            (a.bench_threads / a.ranks as usize).max(1),
            a.ranks
        );
        println!("{:<8} {:>10} {:>9} {:>8} {:>10} {:>12} {:>10}", "method", "step ms", "GFLOP/s", "% peak", "RSS MB", "vs threads", "vs PyTorch");
        for r in &rows {
            let (d, k) = (&r["deltatune"], &r["deltatune"]["ranks"]);
            if k.is_null() {
                continue;
            }
            let g = |v: &Value, key: &str| v[key].as_f64().unwrap_or(f64::NAN);
            let pt = r["pytorch"]["step_ms_median"].as_f64().map(|p| format!("{:.2}", g(k, "step_ms_median") / p)).unwrap_or_else(|| "-".into());
            println!(
                "{:<8} {:>10.1} {:>9.0} {:>7.1}% {:>10.1} {:>11.2}x {:>10}",
                r["method"].as_str().unwrap_or(""),
                g(k, "step_ms_median"),
                g(k, "gflops"),
                100.0 * g(k, "fraction_of_peak"),
                g(k, "peak_rss_mb"),
                g(d, "step_ms_median") / g(k, "step_ms_median"),
                pt
            );
        }
    }
    for r in &rows {
        let p = &r["deltatune"]["profile"];
        if p.is_null() {
            continue;
        }
        let ms = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
        let step = ms("forward_ms") + ms("backward_ms") + ms("optimizer_ms");
        println!(
            "\nprofile of {} (ms per step over {} steps): forward {:.1}, backward {:.1}, optimizer {:.1}",
            r["method"].as_str().unwrap_or("?"),
            p["steps"],
            ms("forward_ms"),
            ms("backward_ms"),
            ms("optimizer_ms")
        );
        let mut fused = [0f64; 2];
        println!("  {:<16} {:>5} {:>9} {:>7} {:>8}", "op", "phase", "ms/step", "calls", "% step");
        for e in p["ops"].as_array().into_iter().flatten() {
            let (op, phase) = (e[0].as_str().unwrap_or("?"), e[1].as_str().unwrap_or("?"));
            let (t, calls) = (e[2].as_f64().unwrap_or(0.0), e[3].as_f64().unwrap_or(0.0));
            fused[usize::from(phase == "bwd")] += t;
            println!("  {op:<16} {phase:>5} {t:>9.1} {calls:>7.0} {:>7.1}%", 100.0 * t / step);
        }
        println!(
            "  {:<16} {:>5} {:>9.1} {:>7} {:>7.1}%\n  {:<16} {:>5} {:>9.1} {:>7} {:>7.1}%",
            "other (candle)",
            "fwd",
            ms("forward_ms") - fused[0],
            "",
            100.0 * (ms("forward_ms") - fused[0]) / step,
            "other (candle)",
            "bwd",
            ms("backward_ms") - fused[1],
            "",
            100.0 * (ms("backward_ms") - fused[1]) / step
        );
    }
    Ok(())
}

/// The backbone directory (the default model fetched on first use, progress on stderr).
fn model_dir(m: &ModelArgs) -> Result<std::path::PathBuf> {
    let say = |e: &Event| {
        if let Event::Message { text } | Event::Warning { text } = e {
            eprintln!("{text}");
        }
    };
    Ok(api::encoder_dir(m.model.as_deref(), &Control::new(&say, None))?)
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, v.sqrt())
}

fn accuracy(a: BenchAccuracyArgs) -> Result<()> {
    use deltatune::data::{DataSource, TaskOptions};
    use deltatune::train::optim::{AdamWConfig, Decay, DecayRule};
    use deltatune::train::TrainConfig;
    let dir = std::path::absolute(model_dir(&a.model)?)?;
    let data_root = std::path::absolute(a.sst2.parent().and_then(|p| p.parent()).context("--sst2 must be <root>/glue/sst2")?)?;
    let seeds: Vec<u64> = a.seeds.split(',').map(|s| s.trim().parse()).collect::<std::result::Result<_, _>>().context("invalid --seeds")?;
    let mut rows = Vec::new();
    for m in a.methods.split(',').map(str::trim) {
        let method = methods::find(m)?;
        let spec = method.specs()?;
        let (mut ours, mut theirs, mut our_s, mut their_s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &seed in &seeds {
            // Same protocol as peft_bench.py --mode accuracy: first N training lines, 1 epoch, batch 32,
            // max length 64 with dynamic padding, plain shuffled batches, AdamW(wd 0.01) on every
            // tensor, 6% linear warm-up then linear decay, no clipping, dropout on, mean pooling.
            let train = TrainConfig {
                lr: method.lr,
                epochs: 1,
                batch_size: 32,
                warmup_ratio: 0.06,
                decay: Decay::Linear,
                adamw: AdamWConfig { weight_decay: 0.01, decay_rule: DecayRule::All, ..Default::default() },
                max_grad_norm: None,
                max_length: 64,
                seed,
                eval_batch_size: 128,
                bucketed: false,
                checkpoint_every: 1_000_000,
                ..Default::default()
            };
            let run = TrainSpec {
                model: dir.clone(),
                data: DataSource::Task { name: "sst2".into(), root: data_root.clone() },
                data_options: TaskOptions { max_train: Some(a.train_limit), ..Default::default() },
                deltas: spec.clone(),
                train,
            };
            eprintln!("deltatune {m} seed {seed} ...");
            let s = api::train(&run, &a.out.join(format!("{m}-s{seed}")), RunMode::Overwrite, &Control::silent())?;
            ours.push(s.score);
            our_s.push(s.seconds);
            if let Some(py) = &a.torch_python {
                eprintln!("pytorch+peft {m} seed {seed} ...");
                let o = Command::new(py)
                    .arg(&a.peft_script)
                    .args(["--method", m, "--mode", "accuracy", "--seed", &seed.to_string(), "--threads", &a.bench_threads.to_string()])
                    .args(["--train-limit", &a.train_limit.to_string(), "--model-dir"])
                    .arg(&dir)
                    .arg("--data-dir")
                    .arg(&a.sst2)
                    .output()
                    .with_context(|| format!("running {}", py.display()))?;
                if !o.status.success() {
                    anyhow::bail!("peft baseline failed: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or(""));
                }
                let text = String::from_utf8_lossy(&o.stdout);
                let v: Value = serde_json::from_str(text.lines().rev().find(|l| l.starts_with('{')).unwrap_or("{}"))?;
                theirs.push(v["accuracy"].as_f64().context("baseline printed no accuracy")?);
                their_s.push(v["train_s"].as_f64().unwrap_or(f64::NAN) + v["eval_s"].as_f64().unwrap_or(0.0));
            }
        }
        rows.push(json!({"method": m, "seeds": seeds, "deltatune": ours, "pytorch": theirs, "deltatune_seconds": our_s, "pytorch_seconds": their_s}));
    }
    if a.json {
        println!("{}", json!({"protocol": "sst2, first 8000 train, 1 epoch, batch 32, max len 64, full dev", "methods": rows}));
        return Ok(());
    }
    println!("SST-2 dev accuracy, PEFT baseline protocol, seeds {:?}", seeds);
    for r in &rows {
        let v = |k: &str| -> Vec<f64> { r[k].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default() };
        let (o, t) = (v("deltatune"), v("pytorch"));
        let (om, os) = mean_std(&o);
        let line = format!("{:<6} deltatune {:.4} ± {:.4} {:?}", r["method"].as_str().unwrap_or(""), om, os, o);
        if t.is_empty() {
            println!("{line}");
        } else {
            let (tm, ts) = mean_std(&t);
            println!("{line} | pytorch+peft {tm:.4} ± {ts:.4} {t:?} | difference {:+.2} points", 100.0 * (om - tm));
        }
    }
    Ok(())
}

fn cache(a: BenchCacheArgs) -> Result<()> {
    use deltatune::data::{DataSource, TaskOptions};
    use deltatune::train::log::{read_records, Record};
    use deltatune::train::optim::{AdamWConfig, DecayRule};
    use deltatune::train::TrainConfig;
    let dir = std::path::absolute(model_dir(&a.model)?)?;
    let root = std::path::absolute(a.sst2.parent().and_then(|p| p.parent()).context("--sst2 must be <root>/glue/sst2")?)?;
    let mut rows = Vec::new();
    for k in a.top_layers.split(',').map(|s| s.trim().parse::<usize>()).collect::<std::result::Result<Vec<_>, _>>().context("invalid --top-layers")? {
        let first = 6usize.saturating_sub(k);
        let layers: Vec<String> = (first..6).map(|l| l.to_string()).collect();
        let delta = DeltaSpec::parse_cli(&format!("lora:r=8,lora_alpha=16,target=query+value,layers={}", layers.join(",")))?;
        let mut ours = Vec::new();
        for cached in [false, true] {
            let train = TrainConfig {
                lr: 5e-4,
                epochs: a.epochs,
                batch_size: 32,
                max_length: 64,
                adamw: AdamWConfig { weight_decay: 0.01, decay_rule: DecayRule::All, ..Default::default() },
                max_grad_norm: None,
                bucketed: false,
                checkpoint_every: 1_000_000,
                cache_frozen: cached,
                frozen_prefix_dropout: !cached,
                ..Default::default()
            };
            let spec = TrainSpec {
                model: dir.clone(),
                data: DataSource::Task { name: "sst2".into(), root: root.clone() },
                data_options: TaskOptions { max_train: Some(a.train), max_dev: Some(64), ..Default::default() },
                deltas: vec![delta.clone()],
                train,
            };
            let run_dir = a.out.join(format!("top{k}-{}", if cached { "cached" } else { "plain" }));
            eprintln!("deltatune: LoRA on the top {k} layer(s), {} ...", if cached { "cached" } else { "no cache" });
            api::train(&spec, &run_dir, RunMode::Overwrite, &Control::silent())?;
            let secs: Vec<f64> = read_records(&run_dir.join("metrics.jsonl"))?
                .into_iter()
                .filter_map(|r| match r {
                    Record::Epoch { train_seconds, .. } => Some(train_seconds),
                    _ => None,
                })
                .collect();
            ours.push(secs);
        }
        let theirs: Option<Vec<f64>> = match &a.torch_python {
            Some(py) => {
                eprintln!("pytorch+peft: LoRA on the top {k} layer(s) ...");
                let args: Vec<String> = vec![
                    "--model-dir".into(), dir.display().to_string(), "--sst2".into(), a.sst2.display().to_string(),
                    "--train".into(), a.train.to_string(), "--epochs".into(), a.epochs.to_string(),
                    "--top-layers".into(), k.to_string(), "--threads".into(), a.bench_threads.to_string(),
                ];
                let v = run_python(py, TORCH_EPOCH, "torch_epoch.py", &args)?;
                Some(v["epoch_seconds"].as_array().map(|x| x.iter().filter_map(|t| t.as_f64()).collect()).unwrap_or_default())
            }
            None => None,
        };
        rows.push(json!({"top_layers": k, "deltatune_plain": ours[0], "deltatune_cached": ours[1], "pytorch": theirs}));
    }
    if a.json {
        println!("{}", json!({"protocol": {"train": a.train, "epochs": a.epochs, "batch": 32, "max_len": 64, "threads": a.bench_threads}, "rows": rows}));
        return Ok(());
    }
    println!("seconds per training epoch, LoRA r=8 on q,v of the top layers, {} SST-2 sentences, batch 32:", a.train);
    for r in &rows {
        let v = |k: &str| -> Vec<f64> { r[k].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default() };
        let (p, c, t) = (v("deltatune_plain"), v("deltatune_cached"), v("pytorch"));
        let later = |x: &[f64]| if x.len() > 1 { x[1..].iter().sum::<f64>() / (x.len() - 1) as f64 } else { f64::NAN };
        print!("top {}: deltatune {:?} | cached {:?}", r["top_layers"], p.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>(), c.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>());
        if !t.is_empty() {
            print!(" | pytorch+peft {:?} | epoch 2+ speedup vs peft: {:.2}x (cached), {:.2}x (no cache)", t, later(&t) / later(&c), later(&t) / later(&p));
        }
        println!();
    }
    Ok(())
}

fn matmul(a: BenchMatmulArgs) -> Result<()> {
    let peak = crate::measure::fma_peak(a.bench_threads);
    let (encoder, square) = crate::measure::matmul_throughput(a.tokens, 384, 1536, a.iters)?;
    let out = json!({"threads": a.bench_threads, "fma_peak_gflops": peak, "encoder_matmul_gflops": encoder, "square_matmul_gflops": square,
                     "encoder_fraction_of_peak": encoder / peak, "square_fraction_of_peak": square / peak});
    if a.json {
        println!("{out}");
    } else {
        println!("single-precision peak (FMA microbenchmark, {} threads): {peak:.0} GFLOP/s", a.bench_threads);
        println!("encoder matmuls ({} rows, MiniLM shapes): {encoder:.0} GFLOP/s = {:.0}% of peak", a.tokens, 100.0 * encoder / peak);
        println!("square matmul 1536^3: {square:.0} GFLOP/s = {:.0}% of peak", 100.0 * square / peak);
    }
    Ok(())
}

fn merged(a: BenchForwardArgs) -> Result<()> {
    use deltatune::attach::{self, AttachOptions};
    let dir = model_dir(&a.model)?;
    let batch = synthetic_batch(a.batch, a.seq_len, 42, &Device::Cpu)?;
    let ctx = ForwardCtx::eval();
    let bare = BertModel::load(&dir, &Device::Cpu)?;
    let mut lora = BertModel::load(&dir, &Device::Cpu)?;
    attach::attach(&mut lora, &[DeltaSpec::parse_cli("lora:r=8,lora_alpha=16,target=query+value")?], AttachOptions::default())?;
    // A trained-looking LoRA (B non-zero), then merged.
    for (_, v) in attach::trainable_vars(&lora) {
        v.set(&(v.as_tensor().ones_like()? * 0.01)?)?;
    }
    let unmerged_ms = median(&time_runs(a.warmup, a.iters, || {
        lora.forward(&batch, &ctx)?;
        Ok(())
    })?);
    attach::merge_all(&mut lora, true)?;
    // Interleave the two models so that drift on the machine affects both alike.
    let (mut tb, mut tm) = (Vec::new(), Vec::new());
    for _ in 0..a.warmup {
        bare.forward(&batch, &ctx)?;
        lora.forward(&batch, &ctx)?;
    }
    for _ in 0..a.iters {
        tb.extend(time_runs(0, 1, || {
            bare.forward(&batch, &ctx)?;
            Ok(())
        })?);
        tm.extend(time_runs(0, 1, || {
            lora.forward(&batch, &ctx)?;
            Ok(())
        })?);
    }
    let (b, m) = (median(&tb), median(&tm));
    let out = json!({"bare_ms": b, "merged_lora_ms": m, "unmerged_lora_ms": unmerged_ms, "ratio_merged_over_bare": m / b});
    if a.json {
        println!("{out}");
    } else {
        println!("eval forward, batch {} x {}: bare {b:.1} ms, merged LoRA {m:.1} ms (ratio {:.3}), unmerged LoRA {unmerged_ms:.1} ms", a.batch, a.seq_len, m / b);
    }
    Ok(())
}

fn decoder(a: BenchDecoderArgs) -> Result<()> {
    let path = match &a.model {
        Some(p) => p.clone(),
        None => deltatune::assets::default_decoder(&mut |m: &str| eprintln!("{m}"))?,
    };
    if a.single {
        let r = crate::measure::decoder_step_bench(&path, &a.delta, a.batch, a.seq_len, a.warmup, a.steps, a.profile, a.ranks as usize)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let torch_args = |mode: &str| -> Vec<String> {
        let mut v: Vec<String> = vec!["--model".into(), path.display().to_string(), "--mode".into(), mode.into()];
        for (k, x) in [("--batch", a.batch), ("--seq-len", a.seq_len), ("--warmup", a.warmup), ("--steps", a.steps)] {
            v.extend([k.to_string(), x.to_string()]);
        }
        for (k, x) in [("--tokens", a.tokens), ("--runs", a.runs), ("--threads", a.bench_threads)] {
            v.extend([k.to_string(), x.to_string()]);
        }
        v
    };
    let mut out = json!({"model": path.display().to_string(), "threads": a.bench_threads});
    if !a.no_generate {
        let mut lm = deltatune::lm::CausalLm::load(&path, &Device::Cpu).with_context(|| format!("loading {}", path.display()))?;
        let prompt = "The history of the city begins";
        let mut rows = serde_json::Map::new();
        for (label, spec) in methods::DECODER_VARIANTS {
            eprintln!("deltatune: generate, delta {label} ...");
            let (tps, prefill) = crate::measure::decoder_generate_bench(&mut lm, *spec, prompt, a.tokens, a.runs)?;
            rows.insert(label.to_string(), json!({"tokens_per_second": tps, "prefill_ms": prefill}));
        }
        let base = rows["none"]["tokens_per_second"].as_f64().unwrap_or(f64::NAN);
        for (_, r) in rows.iter_mut() {
            r["ratio_to_none"] = json!(r["tokens_per_second"].as_f64().unwrap_or(f64::NAN) / base);
        }
        out["generate"] = json!({"tokens": a.tokens, "runs": a.runs, "deltatune": rows});
        if let Some(py) = &a.llama_cpp_python {
            out["generate"]["llama_cpp"] = llama_cpp_side(&a, py, &path, &mut lm, prompt)?;
        }
        if let Some(py) = &a.torch_python {
            eprintln!("pytorch: generate ...");
            out["generate"]["pytorch"] = run_python(py, TORCH_DECODER, "torch_decoder.py", &torch_args("generate"))?;
        }
    }
    if !a.no_train {
        // One process per measurement, so peak memory is per measurement.
        let step = |threads: usize, ranks: u32| -> Result<Value> {
            eprintln!("deltatune: train {} at {} x {}, {threads} thread(s), {ranks} rank(s) ...", a.delta, a.batch, a.seq_len);
            let o = Command::new(std::env::current_exe()?)
                .args(["--threads", &threads.to_string(), "bench", "decoder", "--single", "--delta", &a.delta])
                .args(["--batch", &a.batch.to_string(), "--seq-len", &a.seq_len.to_string(), "--ranks", &ranks.to_string()])
                .args(["--warmup", &a.warmup.to_string(), "--steps", &a.steps.to_string()])
                .args((a.profile && threads == a.bench_threads && ranks == 1).then_some("--profile"))
                .arg("--model")
                .arg(&path)
                .output()?;
            if !o.status.success() {
                anyhow::bail!("decoder training benchmark failed: {}", String::from_utf8_lossy(&o.stderr));
            }
            Ok(serde_json::from_slice(o.stdout.split(|&b| b == b'\n').rev().find(|l| l.starts_with(b"{")).unwrap_or(b"{}"))?)
        };
        // The machine's limit: the FMA peak at the same threads, before and after the runs.
        let scaling = a.scaling && a.bench_threads > 1;
        let peaks_before = crate::measure::fma_peaks(a.bench_threads, scaling);
        let mut ours = step(a.bench_threads, 1)?;
        let mut one = scaling.then(|| step(1, 1)).transpose()?;
        let mut split = (a.ranks > 1).then(|| step(a.bench_threads, a.ranks)).transpose()?;
        let (peak, peak1) = crate::measure::fma_peaks_after(peaks_before, a.bench_threads, scaling);
        for (v, p) in [(Some(&mut ours), peak), (one.as_mut(), peak1), (split.as_mut(), peak)] {
            if let Some(v) = v {
                crate::measure::set_fraction_of_peak(v, p);
            }
        }
        if let Some(o) = one {
            ours["one_thread"] = o;
            ours["fma_peak_gflops_1_thread"] = json!(peak1);
        }
        if let Some(s) = split {
            ours["ranks"] = s;
        }
        out["cpu"] = json!(crate::measure::cpu_model());
        out["fma_peak_gflops"] = json!(peak);
        out["train"] = json!({"deltatune": ours});
        if let Some(py) = &a.torch_python {
            eprintln!("pytorch+peft: train lora at {} x {} ...", a.batch, a.seq_len);
            let theirs = run_python(py, TORCH_DECODER, "torch_decoder.py", &torch_args("train"))?;
            let ratio = |k: &str| ours[k].as_f64().zip(theirs[k].as_f64()).map(|(x, y)| x / y);
            out["train"]["ratio_step_time"] = json!(ratio("step_ms_median"));
            out["train"]["ratio_peak_rss"] = json!(ratio("peak_rss_mb"));
            out["train"]["ratio_step_time_ranks"] = json!(ours["ranks"]["step_ms_median"].as_f64().zip(theirs["step_ms_median"].as_f64()).map(|(x, y)| x / y));
            out["train"]["pytorch"] = theirs;
        }
    }
    if a.json {
        println!("{out}");
        return Ok(());
    }
    let f = |v: &Value| v.as_f64().map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    if let Some(g) = out.get("generate") {
        println!("greedy generation, {} new tokens, median of {} (tokens/s, decode phase):", a.tokens, a.runs);
        for (label, _) in methods::DECODER_VARIANTS {
            let r = &g["deltatune"][*label];
            let torch = g.get("pytorch").map(|p| format!("  pytorch f32 {}", f(&p[*label]))).unwrap_or_default();
            println!("  {label:<7} deltatune {:>7}  ({:.2}x of none){torch}", f(&r["tokens_per_second"]), r["ratio_to_none"].as_f64().unwrap_or(f64::NAN));
        }
    }
    if let Some(c) = out.get("generate").and_then(|g| g.get("llama_cpp")) {
        println!("against llama.cpp (llama-cpp-python {}, same GGUF, {} threads each; tokens/s):", c["llama_cpp_python"].as_str().unwrap_or("?"), a.bench_threads);
        println!("  {:<6} {:>16} {:>16} {:>7} {:>18} {:>18} {:>7}", "delta", "decode deltatune", "decode llama.cpp", "ratio", "prompt deltatune", "prompt llama.cpp", "ratio");
        for label in ["none", "lora"] {
            let (o, t) = (&c["deltatune"][label], &c["theirs"][label]);
            let r = |k: &str| o[k].as_f64().zip(t[k].as_f64()).map(|(x, y)| format!("{:.2}", x / y)).unwrap_or_else(|| "-".into());
            println!(
                "  {label:<6} {:>16} {:>16} {:>7} {:>18} {:>18} {:>7}",
                f(&o["tokens_per_second"]), f(&t["tokens_per_second"]), r("tokens_per_second"),
                f(&o["prompt_tokens_per_second"]), f(&t["prompt_tokens_per_second"]), r("prompt_tokens_per_second")
            );
        }
    }
    if let Some(t) = out.get("train") {
        let d = &t["deltatune"];
        println!("training step, {} at batch {} x {} tokens:", a.delta, a.batch, a.seq_len);
        println!(
            "  deltatune (quantized base {} MiB): step {} ms, forward {} ms, {} tokens/s, peak RSS {} MiB",
            f(&d["weights_mb"]), f(&d["step_ms_median"]), f(&d["fwd_ms_median"]), f(&d["tokens_per_second"]), f(&d["peak_rss_mb"])
        );
        println!(
            "  {} GFLOP per step (from the shapes) = {} GFLOP/s = {:.1}% of the FMA peak ({} GFLOP/s on {} threads; CPU: {})",
            f(&d["step_gflop"]), f(&d["gflops"]), 100.0 * d["fraction_of_peak"].as_f64().unwrap_or(f64::NAN),
            f(&out["fma_peak_gflops"]), a.bench_threads, out["cpu"].as_str().unwrap_or("?")
        );
        if let Some(o) = d.get("one_thread").filter(|o| !o.is_null()) {
            println!(
                "  1 thread: step {} ms = {:.1}% of the 1-thread peak ({} GFLOP/s); {} threads are {:.2}x faster",
                f(&o["step_ms_median"]), 100.0 * o["fraction_of_peak"].as_f64().unwrap_or(f64::NAN), f(&d["fma_peak_gflops_1_thread"]),
                a.bench_threads, o["step_ms_median"].as_f64().unwrap_or(f64::NAN) / d["step_ms_median"].as_f64().unwrap_or(f64::NAN)
            );
        }
        if let Some(k) = d.get("ranks").filter(|k| k["ranks"].as_u64().is_some_and(|r| r > 1)) {
            println!(
                "  split over {} ranks in the process (as `train-lm --data-parallel {}`): step {} ms = {:.1}% of the peak, {:.2}x the threads' speed, peak RSS {} MiB",
                k["ranks"], k["ranks"], f(&k["step_ms_median"]), 100.0 * k["fraction_of_peak"].as_f64().unwrap_or(f64::NAN),
                d["step_ms_median"].as_f64().unwrap_or(f64::NAN) / k["step_ms_median"].as_f64().unwrap_or(f64::NAN), f(&k["peak_rss_mb"])
            );
        }
        if let Some(p) = d.get("profile") {
            println!(
                "  profile per step: forward {} ms, backward {} ms, optimizer {} ms; fused ops:",
                f(&p["forward_ms"]), f(&p["backward_ms"]), f(&p["optimizer_ms"])
            );
            for op in p["ops"].as_array().into_iter().flatten() {
                println!("    {:<20} {:<4} {:>9} ms  {:>6} calls", op[0].as_str().unwrap_or(""), op[1].as_str().unwrap_or(""), f(&op[2]), f(&op[3]));
            }
        }
        if let Some(p) = t.get("pytorch") {
            println!(
                "  pytorch+peft (f32 base):  step {} ms, forward {} ms, {} tokens/s, peak RSS {} MiB (torch {})",
                f(&p["step_ms_median"]), f(&p["fwd_ms_median"]), f(&p["tokens_per_second"]), f(&p["peak_rss_mb"]), p["torch"]
            );
            println!("  ratios deltatune / pytorch: step time {:.2}, peak RSS {:.2}", t["ratio_step_time"].as_f64().unwrap_or(f64::NAN), t["ratio_peak_rss"].as_f64().unwrap_or(f64::NAN));
            if let Some(r) = t["ratio_step_time_ranks"].as_f64() {
                println!("  step time split over ranks / pytorch: {r:.2}");
            }
        } else {
            println!("  (pass --torch-python PYTHON to run PyTorch + PEFT side by side)");
        }
    }
    Ok(())
}

/// Decode and prompt-processing tokens/s of deltatune and of llama.cpp (through `python` with
/// llama-cpp-python) on the same GGUF, without a delta and with a LoRA r 8 on q_proj/v_proj
/// (non-zero values; llama.cpp gets it as the adapter GGUF deltatune exports).
fn llama_cpp_side(a: &BenchDecoderArgs, python: &Path, gguf: &Path, lm: &mut deltatune::lm::CausalLm, prompt: &str) -> Result<Value> {
    use deltatune::attach;
    let long = long_prompt();
    let spec = deltatune::delta::DeltaSpec::parse_cli("lora:r=8,lora_alpha=16,target=q_proj+v_proj")?;
    let dir = tempfile::tempdir()?;
    let adapter = dir.path().join("lora.gguf");
    let mut ours = serde_json::Map::new();
    for label in ["none", "lora"] {
        if label == "lora" {
            attach::attach(&mut lm.model, std::slice::from_ref(&spec), attach::AttachOptions { seed: 7, tokenizer: None })?;
            for (j, (_, _, v)) in attach::group_vars(&lm.model, &spec.name).into_iter().enumerate() {
                let vals: Vec<f32> = (0..v.elem_count()).map(|i| (0.01 * ((i * 7 + j * 13) as f64 * 0.1).sin()) as f32).collect();
                v.set(&deltatune::Tensor::from_vec(vals, v.dims(), &Device::Cpu)?)?;
            }
            deltatune::artifacts::gguf_lora::export(&adapter, &lm.model, &spec)?;
        }
        eprintln!("deltatune: decode and prompt speed, delta {label} ...");
        let (tps, _) = crate::measure::decoder_generate_bench_attached(lm, prompt, a.tokens, a.runs)?;
        let (_, prefill_ms) = crate::measure::decoder_generate_bench_attached(lm, &long, 2, a.runs)?;
        let n = lm.tokenizer.encode(&long)?.len();
        ours.insert(label.into(), json!({"tokens_per_second": tps, "prompt_tokens_per_second": n as f64 / (prefill_ms / 1e3), "prompt_tokens": n}));
    }
    attach::detach_named(&mut lm.model, std::slice::from_ref(&spec));
    eprintln!("llama.cpp: decode and prompt speed ...");
    let mut args: Vec<String> = vec!["--model".into(), gguf.display().to_string(), "--lora".into(), adapter.display().to_string()];
    args.extend(["--prompt".into(), prompt.into(), "--long-prompt".into(), long]);
    for (k, x) in [("--tokens", a.tokens), ("--runs", a.runs), ("--threads", a.bench_threads)] {
        args.extend([k.to_string(), x.to_string()]);
    }
    let theirs = run_python(python, LLAMACPP_DECODER, "llamacpp_decoder.py", &args)?;
    Ok(json!({"llama_cpp_python": theirs["llama_cpp_python"], "deltatune": ours, "theirs": theirs}))
}
