//! Helpers shared by the binary's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deltatune"))
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("running deltatune")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The default model through the asset command, or `None` with a printed reason.
pub fn model() -> Option<PathBuf> {
    let o = run(&["setup", "--model-only", "--json"]);
    if !o.status.success() {
        eprintln!("SKIP: default model unavailable: {}", stderr(&o));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    Some(PathBuf::from(v["model"].as_str().unwrap()))
}

/// The default decoder's GGUF file through the asset command, or `None` with a printed reason.
pub fn decoder() -> Option<String> {
    let o = run(&["setup", "--model-only", "--decoder", "--json"]);
    if !o.status.success() {
        eprintln!("SKIP: default decoder unavailable: {}", stderr(&o));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    Some(v["decoder"].as_str().unwrap().to_string())
}

/// 96 labelled sentences (CSV with a header) and 24 dev sentences.
pub fn write_data(dir: &Path) -> (PathBuf, PathBuf) {
    let good = ["wonderful", "great", "delightful", "superb", "excellent", "moving", "brilliant", "charming"];
    let bad = ["awful", "boring", "dreadful", "terrible", "dull", "clumsy", "tedious", "lifeless"];
    let things = ["film", "story", "acting", "plot", "ending", "score"];
    let mut rows = vec!["text,label".to_string()];
    let mut dev = vec!["text,label".to_string()];
    for (i, (g, b)) in good.iter().zip(bad.iter()).enumerate() {
        for (j, t) in things.iter().enumerate() {
            let target = if (i + j) % 4 == 0 { &mut dev } else { &mut rows };
            target.push(format!("\"The {t} was {g}, really {g}.\",positive"));
            target.push(format!("\"The {t} was {b}, really {b}.\",negative"));
        }
    }
    let (tr, dv) = (dir.join("train.csv"), dir.join("dev.csv"));
    std::fs::write(&tr, rows.join("\n") + "\n").unwrap();
    std::fs::write(&dv, dev.join("\n") + "\n").unwrap();
    (tr, dv)
}
