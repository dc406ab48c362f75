//! The bad-input suite: every command fed broken files, bad specs, out-of-range numbers, bad
//! data, forbidden outputs, kills, a full disk and concurrent runs. Each case asserts the exit
//! code, that the message names the culprit (file, flag, key, line), that no process died by a
//! signal, that nothing outside the case's own output changed, and that no staging file is left.
//! The counts per group are printed (`cargo test -p deltatune-cli --test bad_input -- --nocapture`).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{bin, model};

/// One bad input.
struct Case {
    group: &'static str,
    args: Vec<String>,
    /// Substrings the error message must contain (the culprit).
    needles: Vec<String>,
    /// Expected exit code (1 for errors we report, 2 for clap's usage errors).
    code: i32,
    /// A file-size limit for the process (a full disk), in bytes.
    fsize: Option<u64>,
    /// Text fed on standard input.
    stdin: Option<&'static str>,
}

fn case(group: &'static str, args: &[&str], needles: &[&str]) -> Case {
    Case {
        group,
        args: args.iter().map(|s| s.to_string()).collect(),
        needles: needles.iter().map(|s| s.to_string()).collect(),
        code: 1,
        fsize: None,
        stdin: None,
    }
}

impl Case {
    fn code(mut self, c: i32) -> Self {
        self.code = c;
        self
    }
    fn fsize(mut self, bytes: u64) -> Self {
        self.fsize = Some(bytes);
        self
    }
    fn stdin(mut self, text: &'static str) -> Self {
        self.stdin = Some(text);
        self
    }
}

/// (size, mtime, inode) of every file and directory under the roots.
fn snapshot(roots: &[&Path]) -> BTreeMap<PathBuf, (u64, i64, u64)> {
    fn walk(p: &Path, out: &mut BTreeMap<PathBuf, (u64, i64, u64)>) {
        let Ok(m) = std::fs::symlink_metadata(p) else { return };
        // Directories by existence only: a failed write creates and removes its staging entry,
        // which moves the parent's mtime without changing anything in it.
        let stamp = if m.is_dir() { (0, 0, 0) } else { (m.len(), m.mtime_nsec() + m.mtime() * 1_000_000_000, m.ino()) };
        out.insert(p.to_path_buf(), stamp);
        if m.is_dir() {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for r in roots {
        walk(r, &mut out);
    }
    out
}

fn leftovers(root: &Path) -> Vec<PathBuf> {
    snapshot(&[root]).into_keys().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains(".deltatune-"))).collect()
}

fn spawn(args: &[String], fsize: Option<u64>, stdin: Option<&str>) -> Output {
    let mut cmd = bin();
    cmd.args(args).env("DELTATUNE_THREADS", "2");
    if let Some(limit) = fsize {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let r = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    match stdin {
        Some(text) => {
            use std::io::Write;
            let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            child.wait_with_output().unwrap()
        }
        None => cmd.output().unwrap(),
    }
}

/// A minimal safetensors file with one f32 tensor.
fn safetensors(name: &str, shape: &[usize], values: &[f32]) -> Vec<u8> {
    let header = format!(
        "{{\"{name}\":{{\"dtype\":\"F32\",\"shape\":{shape:?},\"data_offsets\":[0,{}]}}}}",
        values.len() * 4
    );
    let mut header = header.into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    for v in values {
        out.extend(v.to_le_bytes());
    }
    out
}

/// Sets the first f32 of the first tensor of a safetensors file to NaN.
fn poison(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data = 8 + n;
    bytes[data..data + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &dst.join(e.file_name()));
        } else {
            std::fs::copy(&p, dst.join(e.file_name())).unwrap();
        }
    }
}

/// A model directory whose files link to the real model, except `replace` (name → bytes).
fn model_variant(real: &Path, dir: &Path, replace: &[(&str, &[u8])]) {
    std::fs::create_dir_all(dir).unwrap();
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        match replace.iter().find(|(n, _)| *n == name) {
            Some((_, bytes)) => std::fs::write(dir.join(name), bytes).unwrap(),
            None => std::os::unix::fs::symlink(real.join(name), dir.join(name)).unwrap(),
        }
    }
}

#[test]
fn bad_input_suite() {
    let Some(m) = model() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path().to_path_buf();
    let p = |rel: &str| w.join(rel).display().to_string();
    let ms = m.display().to_string();

    // --- Fixtures: data, a trained delta, broken copies of files.
    let mut rows = vec!["text,label".to_string()];
    for i in 0..24 {
        rows.push(format!("\"a {} film, number {i}\",{}", if i % 2 == 0 { "fine" } else { "dull" }, if i % 2 == 0 { "positive" } else { "negative" }));
    }
    std::fs::write(w.join("train.csv"), rows.join("\n") + "\n").unwrap();
    std::fs::write(w.join("dev.csv"), rows[..9].join("\n") + "\n").unwrap();
    std::fs::write(w.join("texts.txt"), "a fine film\na dull film\n").unwrap();
    let o = spawn(
        &["train", "--model", &ms, "--train", &p("train.csv"), "--dev", &p("dev.csv"), "--delta", "lora:r=2", "--max-steps", "2", "--batch-size", "8", "--max-length", "16", "--quiet", "--out", &p("run")]
            .map(String::from),
        None,
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let delta = p("run/best");
    copy_dir(&w.join("run/best"), &w.join("nan_delta"));
    poison(&w.join("nan_delta/delta.safetensors"));
    let o = spawn(&["export", "--model", &ms, "--delta", &delta, "--out", &p("peft")].map(String::from), None, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    copy_dir(&w.join("peft"), &w.join("peft_nan"));
    poison(&w.join("peft_nan/adapter_model.safetensors"));
    copy_dir(&w.join("peft"), &w.join("peft_badtype"));
    let cfg = std::fs::read_to_string(w.join("peft/adapter_config.json")).unwrap();
    std::fs::write(w.join("peft_badtype/adapter_config.json"), cfg.replace("\"LORA\"", "\"FOURIER\"")).unwrap();
    copy_dir(&w.join("peft"), &w.join("peft_noweights"));
    std::fs::remove_file(w.join("peft_noweights/adapter_model.safetensors")).unwrap();
    copy_dir(&w.join("run/best"), &w.join("delta_badjson"));
    std::fs::write(w.join("delta_badjson/delta_config.json"), "{\"format\": \"deltatune-delta\", \"deltas\": [").unwrap();
    copy_dir(&w.join("run/best"), &w.join("delta_trunc"));
    let st = std::fs::read(w.join("delta_trunc/delta.safetensors")).unwrap();
    std::fs::write(w.join("delta_trunc/delta.safetensors"), &st[..st.len() / 2]).unwrap();
    copy_dir(&w.join("run/best"), &w.join("delta_foreign"));
    let dc = std::fs::read_to_string(w.join("delta_foreign/delta_config.json")).unwrap();
    let fp = serde_json::from_str::<serde_json::Value>(&dc).unwrap()["backbone"]["fingerprint"].as_str().unwrap().to_string();
    std::fs::write(w.join("delta_foreign/delta_config.json"), dc.replace(&fp, "0000")).unwrap();
    std::fs::write(w.join("tiny.safetensors"), safetensors("x", &[2], &[1.0, 2.0])).unwrap();
    model_variant(&m, &w.join("m_badcfg"), &[("config.json", b"{\"model_type\": \"bert\", \"hidden_size\": ")]);
    model_variant(&m, &w.join("m_notbert"), &[("config.json", b"{\"model_type\": \"vit\"}")]);
    model_variant(&m, &w.join("m_truncweights"), &[("model.safetensors", b"\x10\x00\x00")]);
    model_variant(&m, &w.join("m_garbage"), &[("model.safetensors", &[0xffu8; 64])]);
    model_variant(&m, &w.join("m_wrongtensor"), &[("model.safetensors", &safetensors("x", &[2], &[1.0, 2.0]))]);
    model_variant(&m, &w.join("m_badtok"), &[("tokenizer.json", b"{\"version\": 1")]);
    std::fs::create_dir_all(w.join("m_empty")).unwrap();
    std::fs::write(w.join("notgguf.gguf"), b"this is not a gguf file at all").unwrap();
    std::fs::write(w.join("v1.gguf"), [b"GGUF".as_slice(), &1u32.to_le_bytes(), &[0u8; 16]].concat()).unwrap();
    std::fs::write(w.join("trunc.gguf"), [b"GGUF".as_slice(), &3u32.to_le_bytes(), &5u64.to_le_bytes()].concat()).unwrap();
    std::fs::write(w.join("bad_utf8.txt"), b"fine\n\xff\xfe\n").unwrap();
    std::fs::write(w.join("quote.csv"), "text,label\n\"open quote,positive\n").unwrap();
    std::fs::write(w.join("nolabel.csv"), "text\nonly text\n").unwrap();
    std::fs::write(w.join("empty.csv"), "text,label\n").unwrap();
    std::fs::write(w.join("bad.jsonl"), "{\"text\": \"a\", \"label\": \"x\"}\n{broken\n").unwrap();
    std::fs::write(w.join("nonum.csv"), "text,label\na,1.5\nb,high\n").unwrap();
    std::fs::write(w.join("onelabel.csv"), "text,label\na,x\nb,x\nc,x\n").unwrap();
    std::fs::write(w.join("three.csv"), "text,label\na,red\nb,green\nc,blue\nd,red\ne,green\nf,blue\n").unwrap();
    std::fs::write(w.join("pairs_bad.jsonl"), "{\"prompt\": \"only a prompt\"}\n").unwrap();
    std::fs::write(w.join("space_bad.json"), "[{\"method\": \"lora\", \"target_modules\": [\"nothing_here\"]}]").unwrap();
    std::fs::write(w.join("deltas_bad.json"), "{\"deltas\": 3}").unwrap();
    std::fs::write(w.join("deltas_syntax.json"), "[{\"method\": \"lora\",").unwrap();
    std::fs::create_dir_all(w.join("busy")).unwrap();
    std::fs::write(w.join("busy/keep.txt"), "user data").unwrap();
    std::fs::write(w.join("afile"), "user data").unwrap();
    std::fs::write(w.join("reg.csv"), "text,label\na,1.5\nb,2.5\nc,0.5\nd,3.0\ne,1.0\nf,2.0\n").unwrap();
    std::fs::create_dir_all(w.join("norun")).unwrap();
    std::fs::write(w.join("norun/notes.txt"), "not a run").unwrap();

    let (tr, dv, txt) = (p("train.csv"), p("dev.csv"), p("texts.txt"));
    // A training command; flags in `extra` replace the defaults (`--epochs` also drops `--max-steps`).
    let runs = std::cell::Cell::new(0);
    let train = |extra: &[&str]| -> Vec<String> {
        // A fresh output per case, so that one accidental success cannot mask the next case.
        runs.set(runs.get() + 1);
        let defaults = [("--model", ms.as_str()), ("--train", tr.as_str()), ("--dev", dv.as_str()), ("--delta", "lora:r=2"), ("--max-steps", "2"), ("--batch-size", "8"), ("--max-length", "16"), ("--out", "")];
        let given: Vec<&str> = extra.iter().filter(|a| a.starts_with("--")).map(|a| a.split('=').next().unwrap_or(a)).collect();
        let mut v: Vec<String> = vec!["train".into(), "--quiet".into()];
        for (flag, value) in defaults {
            if given.contains(&flag) || (flag == "--max-steps" && given.contains(&"--epochs")) {
                continue;
            }
            v.push(flag.into());
            v.push(if flag == "--out" { p(&format!("t_out{}", runs.get())) } else { value.to_string() });
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut cases: Vec<Case> = Vec::new();
    let s = |v: Vec<String>| v;
    let add = |cases: &mut Vec<Case>, group: &'static str, args: Vec<String>, needles: &[&str]| {
        cases.push(Case { group, args, needles: needles.iter().map(|s| s.to_string()).collect(), code: 1, fsize: None, stdin: None });
    };

    // --- files: broken models, deltas, adapters, GGUF headers.
    for (dir, needle) in [
        ("m_badcfg", "config.json"),
        ("m_notbert", "vit"),
        ("m_truncweights", "model.safetensors"),
        ("m_garbage", "model.safetensors"),
        ("m_wrongtensor", "model.safetensors"),
        ("m_empty", "config.json"),
        ("nonexistent_model", "nonexistent_model"),
    ] {
        add(&mut cases, "files", s(vec!["inspect".into(), "--model".into(), p(dir)]), &[needle]);
        add(&mut cases, "files", s(vec!["embed".into(), "--model".into(), p(dir), "-i".into(), txt.clone()]), &[needle]);
    }
    add(&mut cases, "files", s(vec!["embed".into(), "--model".into(), p("m_badtok"), "-i".into(), txt.clone()]), &["tokenizer.json"]);
    add(&mut cases, "files", s(vec!["train".into(), "--model".into(), p("m_badtok"), "--train".into(), tr.clone(), "--delta".into(), "lora".into(), "--out".into(), p("t_out")]), &["tokenizer.json"]);
    for (dir, needle) in [
        ("nan_delta", "NaN"),
        ("delta_badjson", "delta_config.json"),
        ("delta_trunc", "delta.safetensors"),
        ("delta_foreign", "different backbone"),
        ("peft_nan", "NaN"),
        ("peft_badtype", "FOURIER"),
        ("peft_noweights", "adapter_model.safetensors"),
        ("busy", "busy"),
    ] {
        add(&mut cases, "files", s(vec!["embed".into(), "--model".into(), ms.clone(), "--delta".into(), p(dir), "-i".into(), txt.clone()]), &[needle]);
    }
    for (dir, needle) in [("nan_delta", "NaN"), ("delta_badjson", "delta_config.json"), ("delta_trunc", "delta.safetensors"), ("peft", "no task head"), ("busy", "busy")] {
        add(&mut cases, "files", s(vec!["predict".into(), "--model".into(), ms.clone(), "--delta".into(), p(dir), "-i".into(), txt.clone()]), &[needle]);
        add(&mut cases, "files", s(vec!["eval".into(), "--model".into(), ms.clone(), "--delta".into(), p(dir)]), &[needle]);
    }
    add(&mut cases, "files", s(vec!["export".into(), "--model".into(), ms.clone(), "--delta".into(), p("nan_delta"), "--out".into(), p("x_out")]), &["NaN"]);
    add(&mut cases, "files", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), p("nan_delta"), "--out".into(), p("x_out")]), &["NaN"]);
    for g in ["notgguf.gguf", "v1.gguf", "trunc.gguf"] {
        add(&mut cases, "files", s(vec!["generate".into(), "--model".into(), p(g), "--prompt".into(), "hi".into()]), &[g]);
        add(&mut cases, "files", s(vec!["inspect".into(), "--model".into(), p(g)]), &[g]);
    }
    add(&mut cases, "files", s(vec!["generate".into(), "--model".into(), p("no/such/model.gguf"), "--prompt".into(), "hi".into()]), &["no/such/model.gguf"]);
    add(&mut cases, "files", train(&["--delta-config", &p("deltas_bad.json")]), &["deltas_bad.json"]);
    add(&mut cases, "files", train(&["--delta-config", &p("deltas_syntax.json")]), &["deltas_syntax.json"]);
    add(&mut cases, "files", train(&["--delta-config", &p("missing.json")]), &["missing.json"]);
    add(&mut cases, "files", s(vec!["plot".into(), p("norun")]), &["metrics.jsonl"]);
    add(&mut cases, "files", s(vec!["search".into(), "--model".into(), ms.clone(), "--train".into(), tr.clone(), "--budget".into(), "0.01%".into(), "--space".into(), p("space_bad.json"), "--out".into(), p("s_out")]), &["nothing_here"]);
    add(&mut cases, "files", s(vec!["search".into(), "--model".into(), ms.clone(), "--train".into(), tr.clone(), "--budget".into(), "0.01%".into(), "--space".into(), p("nospace.json"), "--out".into(), p("s_out")]), &["--space"]);

    // --- specs: delta spec strings.
    for (spec, needle) in [
        ("lorra", "did you mean `lora`"),
        ("lora:r=0", "r must be at least 1"),
        ("lora:r=-3", "lora"),
        ("lora:r=eight", "lora"),
        ("lora:alpah=3", "alpah"),
        ("lora:lora_alpha=-5", "lora_alpha"),
        ("lora:lora_alpha=nan", "lora_alpha"),
        ("lora:lora_dropout=1.5", "lora_dropout"),
        ("lora:r=100000000000", "would allocate"),
        ("lora:target=", "target_modules"),
        ("lora:target=quer", "quer"),
        ("lora:target=re:[", "regex"),
        ("lora:layers=9", "layers"),
        ("lora:layers=2-1", "layers"),
        ("lora:r=8,r=4", "given twice"),
        ("lora:fan_in_fan_out=true", "fan_in_fan_out"),
        ("lora:name=bad name", "name"),
        ("ia3:init_ia3_weights=maybe", "ia3"),
        ("prompt:num_virtual_tokens=100000000000", "would allocate"),
        ("prefix:num_virtual_tokens=100000000000", "would allocate"),
        ("adapter:bottleneck_size=0", "bottleneck_size"),
        ("adapter:bottleneck_size=100000000000", "would allocate"),
        ("adapter:non_linearity=sigmoidish", "sigmoidish"),
        ("compacter:phm_dim=5", "phm_dim"),
        ("ln_tuning:weight=false,bias=false", "ln_tuning"),
        ("bitfit:target=attention.self.query.weight", "attention.self.query.weight"),
        ("prompt:target=encoder.layer.0.attention.self.query", "prompt cannot attach"),
        ("lora:target=encoder.layer.0.attention", "lora cannot attach"),
        ("low_rank_adapter:rank=0", "rank"),
        (":r=8", "method"),
    ] {
        add(&mut cases, "specs", s(vec!["inspect".into(), "--model".into(), ms.clone(), "--delta".into(), spec.into()]), &[needle]);
    }
    add(&mut cases, "specs", train(&["--delta", "lora", "--delta", "lora"]), &["two deltas are named `lora`"]);
    add(&mut cases, "specs", s(vec!["train-lm".into(), "--delta".into(), "lorra".into(), "--task".into(), "sst2".into()]), &["lorra"]);
    add(&mut cases, "specs", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), "prefix".into(), "--out".into(), p("x_out")]), &["cannot be merged"]);
    add(&mut cases, "specs", s(vec!["merge".into(), "--model".into(), ms.clone(), "--out".into(), p("x_out")]), &["--delta"]);
    add(&mut cases, "specs", s(vec!["export".into(), "--model".into(), ms.clone(), "--delta".into(), p("no_delta_here"), "--out".into(), p("x_out")]), &["no_delta_here"]);

    // --- numbers: flags out of range.
    for (flag, value, needle) in [
        ("--lr", "nan", "--lr"),
        ("--lr", "inf", "--lr"),
        ("--lr=-1", "", "--lr"),
        ("--lr", "0", "--lr"),
        ("--epochs", "0", "--epochs"),
        ("--max-steps", "0", "--max-steps"),
        ("--batch-size", "0", "--batch-size"),
        ("--grad-accum", "0", "--grad-accum"),
        ("--warmup-ratio", "1.5", "--warmup-ratio"),
        ("--warmup-ratio=-0.1", "", "--warmup-ratio"),
        ("--weight-decay", "nan", "--weight-decay"),
        ("--max-grad-norm", "nan", "--max-grad-norm"),
        ("--eval-every", "0", "--eval-every"),
        ("--eval-batch-size", "0", "--eval-batch-size"),
        ("--checkpoint-every", "0", "--checkpoint-every"),
        ("--patience", "0", "--patience"),
        ("--max-length", "1", "--max-length"),
        ("--cache-mb=-1", "", "--cache-mb"),
        ("--pooling", "max", "--pooling"),
        ("--schedule", "wavy", "--schedule"),
        ("--dev-fraction", "1.5", "--dev-fraction"),
        ("--max-train", "0", "--max-train"),
        ("--max-dev", "0", "--max-dev"),
    ] {
        let args: Vec<&str> = if value.is_empty() { vec![flag] } else { vec![flag, value] };
        add(&mut cases, "numbers", train(&args), &[needle]);
    }
    let search = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["search", "--model", &ms, "--train", &tr, "--dev", &dv, "--space", "L", "--quiet"].iter().map(|s| s.to_string()).collect();
        if !extra.contains(&"--out") {
            v.extend(["--out".to_string(), p("s_out")]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    for (extra, needle) in [
        (vec!["--budget", "0"], "--budget"),
        (vec!["--budget", "200%"], "--budget"),
        (vec!["--budget=-5"], "--budget"),
        (vec!["--budget", "abc"], "--budget"),
        (vec!["--budget", "1"], "cheapest candidate"),
        (vec!["--budget", "0.01%", "--alpha-lr", "nan"], "--alpha-lr"),
        (vec!["--budget", "0.01%", "--tau", "0"], "--tau"),
        (vec!["--budget", "0.01%", "--beta=-1"], "--beta"),
        (vec!["--budget", "0.01%", "--lr", "inf"], "--lr"),
        (vec!["--budget", "0.01%", "--epochs", "0"], "--epochs"),
        (vec!["--budget", "0.01%", "--batch-size", "0"], "--batch-size"),
    ] {
        add(&mut cases, "numbers", search(&extra), &[needle]);
    }
    for (extra, needle) in [
        (vec!["--top-p", "0"], "--top-p"),
        (vec!["--top-p", "1.5"], "--top-p"),
        (vec!["--temperature=-1"], "--temperature"),
        (vec!["--temperature", "nan"], "--temperature"),
        (vec!["--max-new-tokens", "0"], "--max-new-tokens"),
        (vec!["--stop", ""], "--stop"),
    ] {
        let mut v: Vec<String> = ["generate", "--model", &p("notgguf.gguf"), "--prompt", "hi"].iter().map(|s| s.to_string()).collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        add(&mut cases, "numbers", v, &[needle]);
    }
    for (extra, needle) in [
        (vec!["--lr", "nan"], "--lr"),
        (vec!["--lr=-1"], "--lr"),
        (vec!["--epochs", "0"], "--epochs"),
        (vec!["--batch-size", "0"], "--batch-size"),
        (vec!["--max-length", "0"], "--max-length"),
    ] {
        let mut v: Vec<String> = ["train-lm", "--model", &p("notgguf.gguf"), "--train", &p("pairs_bad.jsonl")].iter().map(|s| s.to_string()).collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        add(&mut cases, "numbers", v, &[needle]);
    }
    add(&mut cases, "numbers", s(vec!["embed".into(), "--model".into(), ms.clone(), "--batch-size".into(), "0".into(), "-i".into(), txt.clone()]), &["--batch-size"]);
    add(&mut cases, "numbers", s(vec!["embed".into(), "--model".into(), ms.clone(), "--pooling".into(), "max".into(), "-i".into(), txt.clone()]), &["--pooling"]);
    add(&mut cases, "numbers", s(vec!["eval".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--batch-size".into(), "0".into()]), &["--batch-size"]);
    add(&mut cases, "numbers", s(vec!["eval".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--split".into(), "valid".into()]), &["--split"]);
    add(&mut cases, "numbers", s(vec!["predict".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "-i".into(), txt.clone(), "--batch-size".into(), "0".into()]), &["--batch-size"]);
    add(&mut cases, "numbers", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), "lora".into(), "--out".into(), p("x_out"), "--dtype".into(), "f8".into()]), &["--dtype"]);
    add(&mut cases, "numbers", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), "lora".into(), "--out".into(), p("x_out"), "--format".into(), "onnx".into()]), &["--format", "hf, gguf"]);
    add(&mut cases, "numbers", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), "lora".into(), "--out".into(), p("x_out"), "--format".into(), "gguf".into(), "--dtype".into(), "q4".into()]), &["--dtype", "q8_0"]);
    add(&mut cases, "specs", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), "lora".into(), "--out".into(), p("x_out"), "--format".into(), "gguf".into()]), &["--format", "GGUF decoder"]);
    add(&mut cases, "numbers", s(vec!["export".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--out".into(), p("x_out"), "--format".into(), "onnx".into()]), &["--format"]);
    cases.push(case("numbers", &["--threads", "0", "inspect"], &["--threads"]).code(2));

    // --- data: files, columns, labels.
    for (file, needle) in [
        ("quote.csv", "quote.csv"),
        ("nolabel.csv", "label"),
        ("empty.csv", "empty.csv"),
        ("bad.jsonl", "bad.jsonl:2"),
        ("onelabel.csv", "onelabel.csv"),
        ("missing.csv", "missing.csv"),
    ] {
        let mut v = train(&[]);
        let i = v.iter().position(|a| a == &tr).unwrap();
        v[i] = p(file);
        add(&mut cases, "data", v, &[needle]);
    }
    add(&mut cases, "data", train(&["--text-col", "sentence"]), &["sentence"]);
    add(&mut cases, "data", train(&["--label-col", "stars"]), &["stars"]);
    add(&mut cases, "data", train(&["--format", "xml"]), &["--format"]);
    {
        let mut v = train(&["--regression"]);
        let i = v.iter().position(|a| a == &tr).unwrap();
        v[i] = p("nonum.csv");
        let j = v.iter().position(|a| a == &dv).unwrap();
        v[j] = p("nonum.csv");
        add(&mut cases, "data", v, &["nonum.csv:3"]);
    }
    add(&mut cases, "data", s(vec!["train".into(), "--model".into(), ms.clone(), "--task".into(), "mnli".into(), "--data-dir".into(), p("datadir"), "--delta".into(), "lora".into(), "--out".into(), p("t_out")]), &["unknown task `mnli`"]);
    add(&mut cases, "data", s(vec!["train".into(), "--model".into(), ms.clone(), "--task".into(), "sst2".into(), "--data-dir".into(), p("nodata"), "--delta".into(), "lora".into(), "--out".into(), p("t_out")]), &["nodata"]);
    add(&mut cases, "data", s(vec!["train".into(), "--model".into(), ms.clone(), "--delta".into(), "lora".into(), "--out".into(), p("t_out")]), &["--task"]);
    // Mismatched labels: a head trained on positive/negative scored on other labels or a regression.
    add(&mut cases, "data", s(vec!["eval".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--train".into(), p("three.csv")]), &["labels", "red"]);
    add(&mut cases, "data", s(vec!["eval".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--train".into(), p("reg.csv"), "--regression".into()]), &["regression"]);
    add(&mut cases, "data", s(vec!["predict".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "-i".into(), p("nolabel.csv"), "--text-col".into(), "words".into()]), &["words"]);
    add(&mut cases, "data", s(vec!["predict".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "-i".into(), p("bad.jsonl")]), &["bad.jsonl:2"]);
    add(&mut cases, "data", s(vec!["embed".into(), "--model".into(), ms.clone(), "-i".into(), p("missing.txt")]), &["missing.txt"]);
    add(&mut cases, "data", s(vec!["embed".into(), "--model".into(), ms.clone(), "-i".into(), p("bad_utf8.txt")]), &["bad_utf8.txt:2"]);
    cases.push(case("data", &["embed", "--model", &ms, "--max-length", "0"], &["--max-length"]).stdin("a text\n"));
    add(&mut cases, "data", s(vec!["train-lm".into(), "--model".into(), p("notgguf.gguf"), "--task".into(), "sst2".into(), "--template".into(), "no placeholder".into()]), &["--template"]);
    add(&mut cases, "data", s(vec!["train-lm".into(), "--model".into(), p("notgguf.gguf"), "--train".into(), p("missing.jsonl")]), &["notgguf.gguf"]);

    // --- outputs: the policy.
    add(&mut cases, "outputs", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), "lora".into(), "--out".into(), ms.clone()]), &["is the input --model"]);
    add(&mut cases, "outputs", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), "lora".into(), "--out".into(), ms.clone(), "--overwrite".into()]), &["is the input --model"]);
    add(&mut cases, "outputs", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--out".into(), delta.clone(), "--overwrite".into()]), &["is the input --delta"]);
    add(&mut cases, "outputs", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--out".into(), format!("{delta}/sub")]), &["lies inside the input --delta"]);
    add(&mut cases, "outputs", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--out".into(), p("run")]), &["contains the input --delta"]);
    add(&mut cases, "outputs", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), "lora".into(), "--out".into(), p("busy")]), &["--overwrite"]);
    add(&mut cases, "outputs", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), "lora".into(), "--out".into(), p("afile")]), &["--overwrite"]);
    add(&mut cases, "outputs", s(vec!["export".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--out".into(), delta.clone()]), &["is the input --delta"]);
    add(&mut cases, "outputs", s(vec!["export".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--out".into(), p("busy")]), &["--overwrite"]);
    add(&mut cases, "outputs", s(vec!["export".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--out".into(), p("afile")]), &["--overwrite"]);
    add(&mut cases, "outputs", s(vec!["export".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--out".into(), ms.clone(), "--overwrite".into()]), &["is the input --model"]);
    add(&mut cases, "outputs", train(&["--out", &p("busy")]), &["--out"]);
    add(&mut cases, "outputs", train(&["--out", &p("norun")]), &["not a deltatune run"]);
    add(&mut cases, "outputs", train(&["--out", &p("run")]), &["holds another run"]);
    add(&mut cases, "outputs", train(&["--out", &p("norun"), "--resume"]), &["holds no run to resume"]);
    add(&mut cases, "outputs", train(&["--out", &p("run"), "--resume", "--lr", "1e-2"]), &["different settings", "train.lr"]);
    add(&mut cases, "outputs", train(&["--out", &ms]), &["is the input --model"]);
    add(&mut cases, "outputs", train(&["--out", &tr]), &["is the input --data"]);
    add(&mut cases, "outputs", search(&["--budget", "0.01%", "--out", &p("busy")]), &["--overwrite"]);
    add(&mut cases, "outputs", search(&["--budget", "0.01%", "--out", &p("run")]), &["--overwrite"]);
    add(&mut cases, "outputs", s(vec!["predict".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "-i".into(), txt.clone(), "-o".into(), txt.clone()]), &["is the input --input"]);
    add(&mut cases, "outputs", s(vec!["predict".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "-i".into(), txt.clone(), "-o".into(), p("afile")]), &["--overwrite"]);
    add(&mut cases, "outputs", s(vec!["embed".into(), "--model".into(), ms.clone(), "-i".into(), txt.clone(), "-o".into(), txt.clone(), "--overwrite".into()]), &["is the input --input"]);
    add(&mut cases, "outputs", s(vec!["embed".into(), "--model".into(), ms.clone(), "-i".into(), txt.clone(), "-o".into(), p("afile")]), &["--overwrite"]);
    add(&mut cases, "outputs", s(vec!["train-lm".into(), "--model".into(), p("notgguf.gguf"), "--train".into(), p("pairs_bad.jsonl"), "--out".into(), p("busy")]), &["--overwrite"]);
    add(&mut cases, "outputs", s(vec!["train-lm".into(), "--model".into(), p("notgguf.gguf"), "--train".into(), p("pairs_bad.jsonl"), "--out".into(), p("pairs_bad.jsonl"), "--overwrite".into()]), &["is the input --train"]);
    // Unwritable places: a path under a file, and a kernel filesystem.
    add(&mut cases, "outputs", s(vec!["merge".into(), "--model".into(), ms.clone(), "--delta".into(), "lora".into(), "--out".into(), format!("{}/sub", p("afile"))]), &["afile"]);
    add(&mut cases, "outputs", s(vec!["export".into(), "--model".into(), ms.clone(), "--delta".into(), delta.clone(), "--out".into(), "/sys/deltatune-test".into()]), &["/sys"]);
    add(&mut cases, "outputs", s(vec!["embed".into(), "--model".into(), ms.clone(), "-i".into(), txt.clone(), "-o".into(), "/sys/deltatune-test.jsonl".into()]), &["/sys"]);
    add(&mut cases, "outputs", train(&["--out", "/sys/deltatune-test"]), &["/sys"]);

    // --- full disk: writes fail at a file-size limit; nothing half-written stays.
    cases.push(case("faults", &["merge", "--model", &ms, "--delta", "lora", "--out", &p("x_out")], &["x_out"]).fsize(1 << 20));
    cases.push(case("faults", &["merge", "--model", &ms, "--delta", &delta, "--out", &p("busy"), "--overwrite"], &["busy"]).fsize(1 << 20));
    cases.push(case("faults", &["embed", "--model", &ms, "-i", &txt, "-o", &p("x_out.jsonl")], &["x_out.jsonl"]).fsize(100));
    cases.push(case("faults", &["export", "--model", &ms, "--delta", &delta, "--out", &p("x_out")], &["x_out"]).fsize(1000));
    let full = train(&["--out", &p("full_run")]);
    cases.push(Case { group: "faults", args: full, needles: vec!["full_run".into()], code: 1, fsize: Some(4096), stdin: None });

    // --- run all cases.
    let watched = [w.as_path(), m.as_path()];
    let mut counts: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for c in &cases {
        let before = snapshot(&watched);
        let o = spawn(&c.args, c.fsize, c.stdin);
        let after = snapshot(&watched);
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        let entry = counts.entry(c.group).or_default();
        entry.0 += 1;
        let clear = o.status.code() == Some(c.code) && o.status.signal().is_none() && !e.contains("panicked") && c.needles.iter().all(|n| e.contains(n.as_str()));
        let unchanged = before == after && leftovers(&w).is_empty();
        entry.1 += usize::from(clear);
        entry.2 += usize::from(unchanged);
        if !clear || !unchanged {
            let changed: Vec<_> = after.keys().filter(|k| before.get(*k) != after.get(*k)).chain(before.keys().filter(|k| !after.contains_key(*k))).take(5).collect();
            failures.push(format!(
                "[{}] deltatune {}\n  exit {:?} signal {:?}; wanted code {} and {:?}\n  stderr: {}\n  changed: {changed:?}; leftovers: {:?}",
                c.group,
                c.args.join(" "),
                o.status.code(),
                o.status.signal(),
                c.code,
                c.needles,
                e.trim(),
                leftovers(&w)
            ));
        }
    }

    // --- faults that need more than one process.
    let entry = |counts: &mut BTreeMap<&str, (usize, usize, usize)>, ok_msg: bool, ok_files: bool| {
        let e = counts.entry("faults").or_default();
        e.0 += 1;
        e.1 += usize::from(ok_msg);
        e.2 += usize::from(ok_files);
    };
    // Two runs into one directory: the second is refused while the first holds it.
    let long = |out: &str| -> Vec<String> {
        ["train", "--model", &ms, "--train", &tr, "--dev", &dv, "--delta", "lora:r=2", "--max-steps", "150", "--batch-size", "8", "--max-length", "16", "--checkpoint-every", "1", "--quiet", "--out", out]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let out = p("concurrent");
    let mut first = bin().args(long(&out)).env("DELTATUNE_THREADS", "1").stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while !w.join("concurrent/checkpoints/last/state.json").exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut second_args = long(&out);
    second_args.push("--resume".into());
    let o = spawn(&second_args, None, None);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    let ok = o.status.code() == Some(1) && e.contains("another deltatune process is writing");
    if !ok {
        failures.push(format!("[faults] concurrent --resume while a run holds the directory: {e}"));
    }
    // kill -9 mid-run (checkpoints every step), then resume: completes, no staging left.
    // SAFETY: kill on a child we spawned.
    unsafe { libc::kill(first.id() as libc::pid_t, libc::SIGKILL) };
    let _ = first.wait();
    let mut resume = long(&out);
    resume.push("--resume".into());
    let r = resume.iter().position(|a| a == "150").unwrap();
    resume[r] = "150".into();
    let o2 = spawn(&resume, None, None);
    let ok_resume = o2.status.success() && leftovers(&w).is_empty();
    if !ok_resume {
        failures.push(format!("[faults] resume after kill -9: {} leftovers {:?}", String::from_utf8_lossy(&o2.stderr), leftovers(&w)));
    }
    entry(&mut counts, ok, ok);
    entry(&mut counts, ok_resume, ok_resume);
    // A kill before the first optimizer step still leaves a resumable run.
    let out2 = p("early_kill");
    let mut early = bin().args(long(&out2)).env("DELTATUNE_THREADS", "1").stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while !w.join("early_kill/checkpoints/last/state.json").exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill on a child we spawned.
    unsafe { libc::kill(early.id() as libc::pid_t, libc::SIGKILL) };
    let _ = early.wait();
    let mut resume = long(&out2);
    resume.push("--resume".into());
    let r = resume.iter().position(|a| a == "150").unwrap();
    resume[r] = "3".into();
    let mut fresh_short = long(&out2);
    fresh_short[r] = "3".into();
    // The run was started with 400 steps; resuming with other settings is refused by name.
    let o3 = spawn(&resume, None, None);
    let e3 = String::from_utf8_lossy(&o3.stderr).into_owned();
    let ok_early = o3.status.code() == Some(1) && e3.contains("max_steps");
    let mut resume_same = long(&out2);
    resume_same.push("--resume".into());
    let o4 = spawn(&resume_same[..], None, None);
    let _ = fresh_short;
    // Resuming with the same settings works (and finishes: 150 tiny steps).
    let ok_early = ok_early && o4.status.success() && leftovers(&w).is_empty();
    if !ok_early {
        failures.push(format!("[faults] resume after an early kill: {e3} / {}", String::from_utf8_lossy(&o4.stderr)));
    }
    entry(&mut counts, ok_early, ok_early);

    let total: usize = counts.values().map(|c| c.0).sum();
    println!("bad-input suite: {total} cases");
    println!("{:<10} {:>6} {:>13} {:>16}", "group", "tried", "clear error", "nothing changed");
    for (g, (n, clear, unchanged)) in &counts {
        println!("{g:<10} {n:>6} {clear:>13} {unchanged:>16}");
    }
    assert!(total >= 150, "only {total} cases");
    assert!(failures.is_empty(), "{} of {total} cases failed:\n{}", failures.len(), failures.join("\n"));
}
