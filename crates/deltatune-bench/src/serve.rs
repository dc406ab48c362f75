//! `deltatune bench serve`: the server under load on loopback, with our own load generator.
//!
//! Each run starts clients on threads; every client sends a bounded number of requests one after
//! another and stops early when the run's time is up. Generation requests stream, so the time to
//! the first token is measured where the client sees it. Figures: aggregate tokens/s (or
//! requests/s), p50/p99 latency and time to first token.

use crate::args::BenchServeArgs;
use anyhow::{Context, Result};
use deltatune::artifacts::delta_dir;
use deltatune::attach::{self, AttachOptions};
use deltatune::core::Backbone;
use deltatune::delta::DeltaSpec;
use deltatune::head::{Head, HeadConfig, HeadKind};
use deltatune::lm::CausalLm;
use deltatune::{BertModel, Device, Tensor};
use deltatune_serve::ServeConfig;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

pub(crate) const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "The best way to learn a language is",
    "In 1969, the first humans",
    "A good breakfast includes",
];

/// One finished request as the client saw it.
#[derive(Clone, Copy, Debug)]
struct Sample {
    seconds: f64,
    ttft: f64,
    tokens: usize,
}

#[derive(Debug)]
struct RunResult {
    samples: Vec<Sample>,
    errors: usize,
    wall: f64,
}

impl RunResult {
    fn pct(&self, f: impl Fn(&Sample) -> f64, q: f64) -> f64 {
        let mut v: Vec<f64> = self.samples.iter().map(f).collect();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 - 1.0) * q).round() as usize]
    }
    fn tokens_per_second(&self) -> f64 {
        self.samples.iter().map(|s| s.tokens).sum::<usize>() as f64 / self.wall
    }
    fn requests_per_second(&self) -> f64 {
        self.samples.len() as f64 / self.wall
    }
}

pub(crate) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(600))).build().into()
}

/// One streamed completion: latency, time to first token, completion tokens.
fn stream_completion(url: &str, model: &str, prompt: &str, max_tokens: usize) -> Result<Sample> {
    let t0 = Instant::now();
    let body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true}).to_string();
    let mut r = agent().post(&format!("{url}/v1/completions")).header("Content-Type", "application/json").send(body.as_str())?;
    if r.status().as_u16() != 200 {
        anyhow::bail!("HTTP {}: {}", r.status(), r.body_mut().read_to_string().unwrap_or_default());
    }
    let (mut ttft, mut tokens, mut chunks, mut counted) = (None, 0usize, 0usize, false);
    for line in BufReader::new(r.body_mut().as_reader()).lines() {
        let line = line?;
        let Some(d) = line.strip_prefix("data: ") else { continue };
        if d == "[DONE]" {
            break;
        }
        ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        let v: Value = serde_json::from_str(d)?;
        if let Some(e) = v.get("error") {
            anyhow::bail!("{e}");
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
            counted = true;
        } else if !counted && v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
            // Servers that send no usage in streams (llama.cpp's Python server): one chunk per token.
            chunks += 1;
        }
    }
    if !counted {
        tokens = chunks;
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Sample { seconds, ttft: ttft.unwrap_or(seconds), tokens })
}

fn post_json(url: &str, body: &Value) -> Result<Sample> {
    let t0 = Instant::now();
    let mut r = agent().post(url).header("Content-Type", "application/json").send(body.to_string().as_str())?;
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string()?;
    if status != 200 {
        anyhow::bail!("HTTP {status}: {text}");
    }
    let s = t0.elapsed().as_secs_f64();
    Ok(Sample { seconds: s, ttft: s, tokens: 0 })
}

/// `clients` threads, each sending `requests` requests made by `one(client, i)`, stopping when
/// `max_seconds` have passed.
fn load(clients: usize, requests: usize, max_seconds: f64, one: &(dyn Fn(usize, usize) -> Result<Sample> + Sync)) -> RunResult {
    let start = Instant::now();
    let results: Vec<(Vec<Sample>, usize)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..clients)
            .map(|c| {
                sc.spawn(move || {
                    let (mut ok, mut errors) = (Vec::new(), 0);
                    for i in 0..requests {
                        if start.elapsed().as_secs_f64() > max_seconds {
                            break;
                        }
                        match one(c, i) {
                            Ok(s) => ok.push(s),
                            Err(e) => {
                                errors += 1;
                                eprintln!("request failed: {e:#}");
                            }
                        }
                    }
                    (ok, errors)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_default()).collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let mut samples = Vec::new();
    let mut errors = 0;
    for (s, e) in results {
        samples.extend(s);
        errors += e;
    }
    RunResult { samples, errors, wall }
}

/// Writes `n` LoRA deltas (deterministic non-zero values) for `model`; with `head`, each with a
/// two-label classification head (for `/v1/classify`).
pub(crate) fn write_deltas(root: &Path, n: usize, model: &mut dyn Backbone, spec: &str, head: bool) -> Result<()> {
    for k in 0..n {
        let spec = DeltaSpec::parse_cli(&format!("{spec},name=d{k}"))?;
        attach::attach(model, std::slice::from_ref(&spec), AttachOptions { seed: k as u64, tokenizer: None })?;
        for (j, (_, _, v)) in attach::group_vars(model, &spec.name).into_iter().enumerate() {
            let vals: Vec<f32> = (0..v.elem_count()).map(|i| (0.02 * ((i * 7 + j * 13 + k * 31) as f64 * 0.1).sin()) as f32).collect();
            v.set(&Tensor::from_vec(vals, v.dims(), &Device::Cpu)?)?;
        }
        let (mut tensors, mut meta) = (BTreeMap::new(), serde_json::Map::new());
        if head {
            let cfg = HeadConfig { kind: HeadKind::Classification { num_labels: 2 }, pooling: deltatune::Pooling::Mean, hidden_size: model.hidden_size() };
            tensors = Head::new(cfg.clone(), k as u64, &Device::Cpu)?.tensors();
            meta.insert("head".into(), serde_json::to_value(&cfg)?);
        }
        delta_dir::save(&root.join(format!("d{k:02}")), model, std::slice::from_ref(&spec), &tensors, &meta)?;
        attach::detach_named(model, std::slice::from_ref(&spec));
    }
    Ok(())
}

pub fn run(a: BenchServeArgs) -> Result<()> {
    deltatune::ops::set_threads(a.bench_threads)?;
    if let Some(n) = a.soak {
        return crate::soak::run(&a, n);
    }
    println!("# deltatune bench serve ({} threads, {} requests per client, max_tokens {}, runs capped at {} s)", a.bench_threads, a.requests, a.tokens, a.max_seconds);
    if !a.no_decoder {
        decoder(&a)?;
    }
    if !a.no_encoder {
        encoder(&a)?;
    }
    Ok(())
}

fn decoder(a: &BenchServeArgs) -> Result<()> {
    let path = match &a.decoder {
        Some(p) => p.clone(),
        None => deltatune::assets::default_decoder(&mut |m| eprintln!("{m}"))?,
    };
    let most = a.deltas.iter().copied().max().unwrap_or(1);
    let tmp = tempfile::tempdir()?;
    {
        let mut lm = CausalLm::load(&path, &Device::Cpu)?;
        write_deltas(tmp.path(), most, &mut lm.model, "lora:r=8,lora_alpha=16,target=q_proj+v_proj", false)?;
    }
    let max_clients = a.clients.iter().copied().max().unwrap_or(1);
    let cfg = ServeConfig {
        model: Some(path.clone()),
        delta_dir: Some(tmp.path().to_path_buf()),
        addr: "127.0.0.1:0".parse()?,
        max_batch: max_clients.max(8),
        queue_size: 4 * max_clients.max(8),
        max_tokens: a.tokens.max(1),
        timeout: Duration::from_secs_f64(a.max_seconds * 4.0),
        ..Default::default()
    };
    let server = deltatune_serve::spawn(cfg, false).context("starting the server")?;
    let url = format!("http://{}", server.addr);
    // Warm-up.
    stream_completion(&url, "base", PROMPTS[0], 4)?;
    println!("\n## decoder: {} (greedy, max_tokens {})\n", path.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(), a.tokens);
    println!("| clients | deltas | requests | errors | tokens/s | ×1 client | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut single = None;
    let mut row = |clients: usize, deltas: usize| -> Result<f64> {
        let one = |c: usize, i: usize| {
            let k = (c * 7 + i * 3) % deltas.max(1);
            let model = if deltas == 0 { "base".to_string() } else { format!("d{k:02}") };
            stream_completion(&url, &model, PROMPTS[(c + i) % PROMPTS.len()], a.tokens)
        };
        let r = load(clients, a.requests, a.max_seconds, &one);
        let tps = r.tokens_per_second();
        if clients == 1 && single.is_none() {
            single = Some(tps);
        }
        let ratio = single.map(|s| tps / s).unwrap_or(f64::NAN);
        println!(
            "| {clients} | {deltas} | {} | {} | {tps:.1} | {ratio:.2} | {:.2} | {:.2} | {:.3} | {:.3} |",
            r.samples.len(),
            r.errors,
            r.pct(|s| s.seconds, 0.5),
            r.pct(|s| s.seconds, 0.99),
            r.pct(|s| s.ttft, 0.5),
            r.pct(|s| s.ttft, 0.99)
        );
        Ok(tps)
    };
    let mut ours = Vec::new();
    for &c in &a.clients {
        ours.push((c, row(c, 0)?));
    }
    let mut one_delta = None;
    for &d in &a.deltas {
        let tps = row(8, d)?;
        if d == 1 {
            one_delta = Some(tps);
        } else if let Some(base) = one_delta {
            println!("|  | ({d} deltas: {:.2}× the one-delta throughput) | | | | | | | | |", tps / base);
        }
    }
    drop(server);
    if let Some(py) = &a.llama_cpp_python {
        llama_cpp(a, py, &path, &ours)?;
    }
    Ok(())
}

/// The same client grid (no delta) against llama.cpp's server from llama-cpp-python, started by
/// `python` on the same GGUF with the same number of threads; prints both side by side.
fn llama_cpp(a: &BenchServeArgs, python: &Path, gguf: &Path, ours: &[(usize, f64)]) -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let threads = a.bench_threads.to_string();
    let mut child = std::process::Command::new(python)
        .args(["-m", "llama_cpp.server", "--host", "127.0.0.1", "--port", &port.to_string(), "--n_ctx", "2048"])
        // By default a new request interrupts the one streaming; every client should get its answer.
        .args(["--interrupt_requests", "False"])
        .args(["--n_threads", &threads, "--n_threads_batch", &threads])
        .arg("--model")
        .arg(gguf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting llama.cpp's server with {}", python.display()))?;
    let url = format!("http://127.0.0.1:{port}");
    let ready = Instant::now();
    let result = (|| -> Result<()> {
        loop {
            if let Ok(r) = agent().get(&format!("{url}/v1/models")).call() {
                if r.status().as_u16() == 200 {
                    break;
                }
            }
            if let Some(st) = child.try_wait()? {
                anyhow::bail!("llama.cpp's server exited ({st}) before answering; is llama-cpp-python[server] installed for {}?", python.display());
            }
            if ready.elapsed() > Duration::from_secs(180) {
                anyhow::bail!("llama.cpp's server did not answer within 180 s");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        stream_completion(&url, "base", PROMPTS[0], 4)?;
        println!("\n## decoder: deltatune and llama.cpp's server (llama-cpp-python) side by side, no delta, greedy, max_tokens {}\n", a.tokens);
        println!("| clients | llama.cpp requests | errors | llama.cpp tokens/s | p50 latency s | p50 TTFT s | deltatune tokens/s | deltatune / llama.cpp |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        for &(clients, mine) in ours {
            let one = |c: usize, i: usize| stream_completion(&url, "base", PROMPTS[(c + i) % PROMPTS.len()], a.tokens);
            let r = load(clients, a.requests, a.max_seconds, &one);
            let tps = r.tokens_per_second();
            println!("| {clients} | {} | {} | {tps:.1} | {:.2} | {:.3} | {mine:.1} | {:.2} |", r.samples.len(), r.errors, r.pct(|s| s.seconds, 0.5), r.pct(|s| s.ttft, 0.5), mine / tps);
        }
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn encoder(a: &BenchServeArgs) -> Result<()> {
    let dir = match &a.encoder {
        Some(p) => p.clone(),
        None => deltatune::assets::default_model(&mut |m| eprintln!("{m}"))?,
    };
    let tmp = tempfile::tempdir()?;
    {
        let mut m = BertModel::load(&dir, &Device::Cpu)?;
        write_deltas(tmp.path(), 16, &mut m, "lora:r=8,lora_alpha=16,target=query+value", true)?;
    }
    let cfg = ServeConfig {
        model: Some(dir.clone()),
        delta_dir: Some(tmp.path().to_path_buf()),
        addr: "127.0.0.1:0".parse()?,
        max_batch: 64,
        queue_size: 4 * a.encoder_clients.max(1),
        timeout: Duration::from_secs_f64(a.max_seconds * 4.0),
        ..Default::default()
    };
    let server = deltatune_serve::spawn(cfg, false).context("starting the server")?;
    let url = format!("http://{}", server.addr);
    post_json(&format!("{url}/v1/embeddings"), &json!({"model": "base", "input": ["warm up"]}))?;
    println!("\n## encoder: {} ({} clients, one text per request)\n", dir.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(), a.encoder_clients);
    println!("| route | deltas | requests | errors | requests/s | p50 latency s | p99 latency s |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for route in ["embeddings", "classify"] {
        for deltas in [1usize, 16] {
            let one = |c: usize, i: usize| {
                let k = (c * 5 + i) % deltas;
                let text = format!("{} (client {c}, request {i})", PROMPTS[(c + i) % PROMPTS.len()]);
                post_json(&format!("{url}/v1/{route}"), &json!({"model": format!("d{k:02}"), "input": [text]}))
            };
            let r = load(a.encoder_clients, a.requests * 4, a.max_seconds, &one);
            println!("| {route} | {deltas} | {} | {} | {:.1} | {:.3} | {:.3} |", r.samples.len(), r.errors, r.requests_per_second(), r.pct(|s| s.seconds, 0.5), r.pct(|s| s.seconds, 0.99));
        }
    }
    drop(server);
    Ok(())
}
