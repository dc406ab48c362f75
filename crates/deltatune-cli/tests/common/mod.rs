//! Helpers shared by the binary's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
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
