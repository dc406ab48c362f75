//! The `deltatune` binary: exit codes, messages and outputs on real and bad input.

use std::path::PathBuf;


mod common;
use common::{decoder, model, run, stderr};

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
    let expected_head = [0.077_218_22_f32, -0.037_737_44, 0.039966337, -0.035_658_75];
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

fn golden(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden").join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIP: ../shared/golden/{name} absent");
        None
    }
}

#[test]
fn inspect_with_deltas_and_dry_run() {
    let Some(dir) = model() else { return };
    let m = dir.to_str().unwrap();
    let o = run(&["inspect", "--json", "--model", m, "--delta", "lora:r=8,target=query+value", "--delta", "bitfit"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trainable_params"], 73_728 + 25_344);
    let text = String::from_utf8_lossy(&run(&["inspect", "--model", m, "--delta", "lora"]).stdout).into_owned();
    assert!(text.contains("+ lora [lora] lora_A.weight:[8, 384] lora_B.weight:[384, 8] 6,144 trainable"), "{text}");
    assert!(text.contains("trainable parameters: 73,728 of 22,786,944 (0.3236%)"), "{text}");
    // Dry run: matched and unmatched patterns, exit 0.
    let o = run(&["inspect", "--dry-run", "--model", m, "--delta", "lora:target=query+quer,layers=0-2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("lora `query`: 3 modules: encoder.layer.{0-2}.attention.self.query"), "{text}");
    assert!(text.contains("lora `quer`: UNMATCHED"), "{text}");
    // The same spec without --dry-run fails, naming the pattern.
    let o = run(&["inspect", "--model", m, "--delta", "lora:target=query+quer"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("pattern `quer` matches no module"), "{}", stderr(&o));
}

#[test]
fn merge_writes_a_plain_model_with_equal_outputs() {
    let (Some(dir), Some(lora)) = (model(), golden("peft_lora_minilm")) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let o = run(&["merge", "--json", "--model", dir.to_str().unwrap(), "--delta", lora.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["merged_sites"], 12);
    assert!(v["max_abs_diff"].as_f64().unwrap() <= 1e-5, "{v}");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // It loads as an ordinary model and embeds like the unmerged model + adapter.
    let input = tmp.path().join("in.txt");
    std::fs::write(&input, "A man is playing a guitar on the street.\n").unwrap();
    let a = run(&["embed", "--model", out.to_str().unwrap(), "-i", input.to_str().unwrap()]);
    let b = run(&["embed", "--model", dir.to_str().unwrap(), "--delta", lora.to_str().unwrap(), "-i", input.to_str().unwrap()]);
    assert!(a.status.success() && b.status.success());
    let va: Vec<f32> = serde_json::from_slice(&a.stdout).unwrap();
    let vb: Vec<f32> = serde_json::from_slice(&b.stdout).unwrap();
    let d = va.iter().zip(&vb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d <= 1e-5, "{d}");
    // Non-mergeable deltas are refused and nothing is written.
    let out2 = tmp.path().join("merged2");
    let o = run(&["merge", "--model", dir.to_str().unwrap(), "--delta", "adapter", "--out", out2.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot be merged"), "{}", stderr(&o));
    assert!(!out2.exists());
}

#[test]
fn export_round_trips_peft_lora() {
    let (Some(dir), Some(lora)) = (model(), golden("peft_lora_minilm")) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("exported");
    let o = run(&["export", "--model", dir.to_str().unwrap(), "--delta", lora.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    let b: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(lora.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn generate_greedy_json_and_bad_flags() {
    let Some(gguf) = decoder() else { return };
    let o = run(&["generate", "--model", &gguf, "--prompt", "The capital of France is", "--max-new-tokens", "3", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let g: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(g["text"].as_str().unwrap().contains("Paris"), "{g}");
    assert_eq!(g["prompt_tokens"], 5);
    assert!(g["tokens_per_second"].as_f64().unwrap() > 0.0);
    // Streaming: the text goes to stdout as it is produced, timings to stderr.
    let o = run(&["generate", "--model", &gguf, "--chat", "Say hi", "--max-new-tokens", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("tokens/s"), "{}", stderr(&o));
    let o = run(&["generate", "--model", &gguf, "--prompt", "x", "--top-p", "0"]);
    assert!(!o.status.success() && stderr(&o).contains("--top-p"), "{}", stderr(&o));
    let o = run(&["generate", "--model", "no/such/model.gguf", "--prompt", "x"]);
    assert!(!o.status.success() && stderr(&o).contains("no/such/model.gguf"), "{}", stderr(&o));
}

#[test]
fn train_lm_on_jsonl_lowers_perplexity_and_saves() {
    let Some(gguf) = decoder() else { return };
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("pairs.jsonl");
    let rows = [
        r#"{"prompt": "Colour of the sky:", "completion": " zorblue"}"#,
        r#"{"prompt": "Colour of grass:", "completion": " zorgreen"}"#,
        r#"{"prompt": "Colour of snow:", "completion": " zorwhite"}"#,
        r#"{"text": "The zor language prefixes every colour with zor."}"#,
    ];
    std::fs::write(&train, rows.join("\n")).unwrap();
    let out = dir.path().join("delta");
    let o = run(&[
        "--threads", "2", "train-lm", "--model", &gguf, "--train", train.to_str().unwrap(), "--epochs", "3", "--batch-size", "2",
        "--lr", "5e-3", "--delta", "lora:r=4,target=q_proj+v_proj,layers=24-29", "--out", out.to_str().unwrap(), "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["metric"], "perplexity");
    assert_eq!(r["steps"], 6);
    let (before, after) = (r["before"].as_f64().unwrap(), r["after"].as_f64().unwrap());
    assert!(after < before, "perplexity {before} -> {after}");
    for f in ["metrics.jsonl", "delta.safetensors", "delta_config.json"] {
        assert!(out.join(f).is_file(), "{f} not written");
    }
    // Chat conversations, packed.
    let chat = dir.path().join("chat.jsonl");
    let convo = |q: &str, a: &str| format!(r#"{{"messages": [{{"role": "user", "content": "{q}"}}, {{"role": "assistant", "content": "{a}"}}]}}"#);
    std::fs::write(&chat, [convo("Sky?", "zorblue"), convo("Grass?", "zorgreen"), convo("Snow?", "zorwhite")].join("\n")).unwrap();
    let o = run(&[
        "--threads", "2", "train-lm", "--model", &gguf, "--train", chat.to_str().unwrap(), "--chat", "--pack", "--max-length", "64",
        "--epochs", "4", "--batch-size", "1", "--lr", "5e-3", "--delta", "lora:r=4,target=q_proj+v_proj,layers=24-29", "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = r["rows"].as_u64().unwrap();
    assert!((1..3).contains(&rows), "three short conversations pack into fewer rows, got {rows}");
    let (before, after) = (r["before"].as_f64().unwrap(), r["after"].as_f64().unwrap());
    assert!(after < before, "chat perplexity {before} -> {after}");
    // Conversations without --chat are refused, naming the flag.
    let o = run(&["train-lm", "--model", &gguf, "--train", chat.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("--chat"), "{}", stderr(&o));
    // A bad line names the file and line.
    std::fs::write(&train, "{\"prompt\": \"x\"}\n").unwrap();
    let o = run(&["train-lm", "--model", &gguf, "--train", train.to_str().unwrap()]);
    assert!(!o.status.success(), "accepted a line without completion");
    assert!(stderr(&o).contains("pairs.jsonl:1") && stderr(&o).contains("completion"), "{}", stderr(&o));
}

/// `deltatune serve` as its own process: SIGTERM lets the running request finish, refuses new
/// work, and the process exits 0 saying so.
#[test]
fn serve_process_drains_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let Some(gguf) = decoder() else { return };
    let mut child = common::bin()
        .args(["--threads", "2", "serve", "--model", &gguf, "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("no address line: {line:?}")).to_string();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    // Long enough to be still running when SIGTERM arrives (decoding runs at 100-200 tokens/s).
    let body = serde_json::json!({"model": "base", "prompt": "List the numbers: 1, 2, 3,", "max_tokens": 300, "temperature": 0}).to_string();
    let (a2, u2, b2) = (agent.clone(), format!("{url}/v1/completions"), body.clone());
    let running = std::thread::spawn(move || {
        let mut r = a2.post(&u2).header("Content-Type", "application/json").send(b2.as_str()).unwrap();
        let st = r.status().as_u16();
        (st, serde_json::from_str::<serde_json::Value>(&r.body_mut().read_to_string().unwrap()).unwrap())
    });
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    // The signal is handled asynchronously: wait until the server says it is draining (or has
    // already closed), then new work must be refused (503, or the listener is gone).
    for _ in 0..100 {
        match agent.get(&format!("{url}/health")).call() {
            Ok(r) if r.status().as_u16() == 200 => std::thread::sleep(std::time::Duration::from_millis(50)),
            _ => break,
        }
    }
    if let Ok(r) = agent.post(&format!("{url}/v1/completions")).header("Content-Type", "application/json").send(body.as_str()) {
        assert_eq!(r.status().as_u16(), 503);
    }
    let (st, v) = running.join().unwrap();
    assert_eq!(st, 200, "the running request was cut by SIGTERM: {v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "exit {status:?}: {err}");
    assert!(err.contains("stopped"), "{err}");
}

#[test]
fn plot_series_draws_curves_and_refuses_bad_files() {
    let d = tempfile::tempdir().unwrap();
    let good = d.path().join("curves.json");
    std::fs::write(
        &good,
        r#"{"panels": [{"title": "dev accuracy", "x_label": "step", "y_label": "accuracy",
            "series": [{"name": "lora", "points": [[0, 0.5], [50, 0.7], [100, 0.8]]},
                       {"name": "bitfit", "points": [[0, 0.5], [50, 0.6], [100, 0.65]]}]}]}"#,
    )
    .unwrap();
    let out = d.path().join("fig");
    let o = run(&[
        "plot",
        "--series",
        good.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let png = std::fs::read(d.path().join("fig.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let svg = std::fs::read_to_string(d.path().join("fig.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("bitfit"),
        "the legend names the series"
    );
    // An existing figure is kept unless --overwrite.
    let o = run(&[
        "plot",
        "--series",
        good.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--overwrite"), "{}", stderr(&o));
    assert_eq!(std::fs::read(d.path().join("fig.png")).unwrap(), png);
    let o = run(&[
        "plot",
        "--series",
        good.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // Bad files: the error names the file and what is wrong; nothing is written.
    for (text, needle) in [
        (r#"{"panels": []}"#, "\"panels\" is empty"),
        (
            r#"{"panels": [{"title": "t", "series": [{"name": "a", "points": []}]}]}"#,
            "has no points",
        ),
        (
            r#"{"panels": [{"title": "t", "series": [{"name": "a", "points": [[0, 1e999]]}]}]}"#,
            "bad.json",
        ),
        (
            r#"{"panels": [{"title": "t", "series": [{"name": "a", "points": [[0, 1]]}], "colour": 3}]}"#,
            "colour",
        ),
        ("not json", "not a curves file"),
    ] {
        let bad = d.path().join("bad.json");
        std::fs::write(&bad, text).unwrap();
        let o = run(&[
            "plot",
            "--series",
            bad.to_str().unwrap(),
            "--out",
            d.path().join("never").to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(1), "{text}");
        let e = stderr(&o);
        assert!(
            e.contains(needle) && e.contains("bad.json") && !e.contains("panicked"),
            "{text}: {e}"
        );
        assert!(!d.path().join("never.png").exists() && !d.path().join("never.svg").exists());
    }
}
