//! `deltatune train / eval / predict / plot` end to end on the real default model with a small
//! synthetic sentiment set: resume after kill -9 reproduces the uninterrupted run bit for bit, and
//! bad input fails with messages naming the file, line and column.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{bin, model, run, stderr, write_data};

fn train_args<'a>(m: &'a str, tr: &'a str, dv: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "--threads", "2", "train", "--model", m, "--train", tr, "--dev", dv, "--delta", "lora:r=4,lora_alpha=8",
        "--delta", "bitfit", "--lr", "3e-3", "--epochs", "3", "--batch-size", "8", "--max-length", "24",
        "--eval-every", "7", "--checkpoint-every", "1", "--seed", "7", "--out", out, "--quiet",
    ]
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn checkpoint_step(run: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(run.join("checkpoints/last/state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
}

fn train_losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn resume_after_kill_reproduces_the_uninterrupted_run() {
    let Some(m) = model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (tr, dv) = write_data(tmp.path());
    let (m, tr, dv) = (m.to_str().unwrap(), tr.to_str().unwrap(), dv.to_str().unwrap());
    let a = tmp.path().join("a");
    let o = bin().args(train_args(m, tr, dv, a.to_str().unwrap())).arg("--json").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["task", "method", "metric", "score", "trainable_params", "total_params", "seconds", "steps"] {
        assert!(summary.get(k).is_some(), "summary lacks {k}: {summary}");
    }
    assert_eq!(summary["steps"], 27);
    assert!(summary["score"].as_f64().unwrap() >= 0.9, "{summary}");
    // Interrupted twice with SIGKILL at different points, resumed each time.
    let b = tmp.path().join("b");
    for (attempt, kill_at) in [(0, 5u64), (1, 16u64)] {
        let mut args = train_args(m, tr, dv, b.to_str().unwrap());
        if attempt > 0 {
            args.push("--resume");
        }
        let mut child = bin().args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let t0 = Instant::now();
        while checkpoint_step(&b).unwrap_or(0) < kill_at && t0.elapsed() < Duration::from_secs(120) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(checkpoint_step(&b).unwrap() >= kill_at, "the run did not get far enough");
    }
    let mut args = train_args(m, tr, dv, b.to_str().unwrap());
    args.push("--resume");
    let o = bin().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["final/delta.safetensors", "best/delta.safetensors", "final/delta_config.json"] {
        assert!(read(&a.join(f)) == read(&b.join(f)), "{f} differs between the uninterrupted and the resumed run");
    }
    assert_eq!(train_losses(&a), train_losses(&b), "per-step losses differ");
    // Eval, predict and plot on the trained delta.
    let o = run(&["eval", "--model", m, "--delta", a.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ev: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ev["score"], summary["score"], "eval reproduces the best dev score");
    let input = tmp.path().join("new.txt");
    std::fs::write(&input, "The acting was superb, really superb.\nThe plot was dreadful, really dreadful.\n").unwrap();
    let o = run(&["predict", "--model", m, "--delta", a.to_str().unwrap(), "-i", input.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let preds: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(preds[0]["label"], "positive");
    assert_eq!(preds[1]["label"], "negative");
    let p: f64 = preds[0]["probabilities"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
    assert!((p - 1.0).abs() < 1e-5);
    let o = run(&["plot", a.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(read(&a.join("curves.png")).starts_with(b"\x89PNG"));
    assert!(String::from_utf8_lossy(&read(&a.join("curves.svg"))).contains("<svg"));
    // The run directory is protected.
    let o = bin().args(train_args(m, tr, dv, a.to_str().unwrap())).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("holds another run; pass --resume to continue it or --overwrite to replace it"), "{}", stderr(&o));
}

#[test]
fn bad_training_input_is_reported_precisely() {
    let Some(m) = model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (tr, dv) = write_data(tmp.path());
    let m = m.to_str().unwrap();
    let out = tmp.path().join("run");
    let base = |train: &Path, dev: &Path| -> Vec<String> {
        ["train", "--model", m, "--delta", "lora", "--max-steps", "2", "--batch-size", "4", "--quiet", "--out", out.to_str().unwrap(), "--train"]
            .iter()
            .map(|s| s.to_string())
            .chain([train.display().to_string(), "--dev".into(), dev.display().to_string()])
            .collect()
    };
    let expect = |args: Vec<String>, needle: &str| {
        let o = bin().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{needle}");
        let e = stderr(&o);
        assert!(e.contains(needle), "expected `{needle}` in: {e}");
        assert!(!e.contains("panicked"), "{e}");
    };
    // Unknown label in the dev file, with file, line and column.
    let bad_dev = tmp.path().join("bad_dev.csv");
    std::fs::write(&bad_dev, "text,label\nfine film,positive\nodd one,neutral\n").unwrap();
    expect(base(&tr, &bad_dev), "bad_dev.csv:3:2: unknown label \"neutral\"");
    // A column that does not exist.
    let mut args = base(&tr, &dv);
    args.extend(["--text-col".into(), "sentence".into()]);
    expect(args, "sentence");
    // A malformed row.
    let bad = tmp.path().join("bad.csv");
    std::fs::write(&bad, "text,label\n\"a fine film\",positive\n\"broken row\n").unwrap();
    expect(base(&bad, &dv), "bad.csv:3");
    // An empty split.
    let empty = tmp.path().join("empty.csv");
    std::fs::write(&empty, "text,label\n").unwrap();
    expect(base(&empty, &dv), "empty.csv");
    // Nothing half-written by the failed runs: bad data is caught before the run directory exists.
    assert!(!out.join("run.json").exists(), "a failed run left {}", out.display());
    assert!(!out.join("metrics.jsonl").exists());
    // A diverging run stops with a clear message and keeps its last good checkpoint.
    let mut args = base(&tr, &dv);
    args.extend(["--lr".into(), "1e30".into(), "--max-grad-norm".into(), "0".into(), "--checkpoint-every".into(), "1".into(), "--overwrite".into()]);
    args.iter_mut().for_each(|a| {
        if a == "2" {
            *a = "6".into();
        }
    });
    let o = bin().args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("non-finite value: training loss is") || e.contains("non-finite value: gradient norm"), "{e}");
    assert!(e.contains("the last good checkpoint is in"), "{e}");
    // --resume of a directory without a run.
    let o = run(&["train", "--model", m, "--train", tr.to_str().unwrap(), "--delta", "lora", "--resume", "--out", tmp.path().join("none").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("holds no run to resume"), "{}", stderr(&o));
}
