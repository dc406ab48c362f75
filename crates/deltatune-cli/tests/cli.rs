//! The `deltatune` binary: exit codes, messages and outputs on real and bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deltatune"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("running deltatune")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The default model through the asset command, or `None` with a printed reason.
fn model() -> Option<PathBuf> {
    let o = run(&["setup", "--model-only", "--json"]);
    if !o.status.success() {
        eprintln!("SKIP: default model unavailable: {}", stderr(&o));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    Some(PathBuf::from(v["model"].as_str().unwrap()))
}

#[test]
fn missing_model_dir_is_a_clear_error() {
    let o = run(&["inspect", "--model", "/nonexistent/model-dir"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("error: /nonexistent/model-dir: model directory not found"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn bad_flag_values() {
    let o = run(&["--threads", "0", "inspect"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("--threads"), "{}", stderr(&o));
    let o = run(&["embed", "--pooling", "max", "--input", "/dev/null"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("invalid --pooling: `max`"), "{}", stderr(&o));
}

#[test]
fn inspect_json_counts_default_model() {
    let Some(dir) = model() else { return };
    let o = run(&["inspect", "--json", "--model", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["model_type"], "bert");
    assert_eq!(v["total_params"], 22713216);
    let modules = v["modules"].as_array().unwrap();
    let q = modules.iter().find(|m| m["path"] == "encoder.layer.3.attention.self.query").unwrap();
    assert_eq!(q["kind"], "linear");
    assert_eq!(q["params"], 147840);
    assert_eq!(q["shapes"]["weight"], serde_json::json!([384, 384]));
    // Without --model the default model is used.
    let o = run(&["inspect"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("0-5 (layer) 1,774,464 each"), "{text}");
    assert!(text.contains("total parameters: 22,713,216"), "{text}");
}

#[test]
fn embed_writes_normalized_vectors() {
    let Some(dir) = model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.txt");
    let output = tmp.path().join("out.jsonl");
    std::fs::write(&input, "A man is playing a guitar on the street.\nShort.\n").unwrap();
    let o = run(&[
        "embed", "--model", dir.to_str().unwrap(), "--normalize", "-i", input.to_str().unwrap(), "-o",
        output.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&output).unwrap();
    let rows: Vec<Vec<f32>> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r.len(), 384);
        let norm: f32 = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
    // sentence-transformers' embedding of the first sentence (../shared/golden sentence_embedding[0]).
    let expected_head = [0.077218220f32, -0.037737440, 0.039966337, -0.035658751];
    for (a, b) in rows[0].iter().zip(expected_head) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn embed_rejects_non_utf8_line() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("bad.txt");
    let output = tmp.path().join("out.jsonl");
    std::fs::write(&input, b"ok\n\xff\xfe\n").unwrap();
    let o = run(&["embed", "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("bad.txt:2: not valid UTF-8"), "{e}");
    assert!(!output.exists(), "nothing may be written on error");
}
