//! `deltatune bench serve --soak N`: the server under a long mixed load on loopback.
//!
//! The server gets stable deltas and "churn" deltas; a churn thread unloads one of the latter and
//! loads it back every `--churn-seconds` over the admin API while client threads send `N`
//! requests, about a third of them invalid (bad JSON, unknown model or field, wrong types,
//! oversize inputs and bodies, unknown routes, path traversal). Before the load starts, every
//! valid request is sent once alone and its answer kept; during the load each valid answer must
//! equal it (embeddings and probabilities within 1e-4, generated text exactly), each invalid
//! request must get its own 4xx with an OpenAI error object, and no request may be lost. A valid
//! request for a churn delta may meet it unloaded (404 `model_not_found`): counted apart.
//! Resident memory is read after warm-up and at the end.

use crate::args::{BenchServeArgs, SoakBackbone};
use crate::serve::{agent, write_deltas, PROMPTS};
use anyhow::{bail, Context, Result};
use deltatune::lm::CausalLm;
use deltatune::{BertModel, Device};
use deltatune_serve::ServeConfig;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const STABLE: usize = 6;
const CHURN: usize = 3;
/// The server's body limit in the soak run (an oversize body is one of the invalid requests).
const BODY_LIMIT: usize = 64 << 10;

/// One valid request: route, model and text index; its answer is compared with the reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Valid {
    route: &'static str,
    model: String,
    text: usize,
}

/// What a request is.
enum Req {
    Valid(Valid),
    /// Method, path, raw body and the status it must get.
    Invalid { what: &'static str, method: &'static str, path: String, body: String, status: u16 },
}

/// splitmix64: a deterministic stream of choices.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn models() -> Vec<String> {
    let mut m = vec!["base".to_string()];
    m.extend((0..STABLE).map(|k| format!("d{k:02}")));
    m.extend((0..CHURN).map(|k| format!("c{k}")));
    m
}

fn routes(kind: SoakBackbone) -> &'static [&'static str] {
    match kind {
        SoakBackbone::Encoder => &["embeddings", "classify"],
        SoakBackbone::Decoder => &["completions", "chat/completions"],
    }
}

/// The k-th request of the run: every third one invalid, the rest spread over routes, models
/// (classify needs a head, so not the base) and texts.
fn request(k: usize, kind: SoakBackbone) -> Req {
    let r = mix(k as u64);
    if k % 3 == 2 {
        return invalid((r % 9) as usize, kind);
    }
    let rs = routes(kind);
    let route = rs[(r >> 8) as usize % rs.len()];
    let ms = models();
    let from = usize::from(route == "classify");
    let model = ms[from + (r >> 16) as usize % (ms.len() - from)].clone();
    Req::Valid(Valid { route, model, text: (r >> 32) as usize % PROMPTS.len() })
}

fn invalid(which: usize, kind: SoakBackbone) -> Req {
    let main = match kind {
        SoakBackbone::Encoder => "/v1/embeddings",
        SoakBackbone::Decoder => "/v1/completions",
    };
    let good = |extra: &str| match kind {
        SoakBackbone::Encoder => format!(r#"{{"model": "d00", "input": ["a text"]{extra}}}"#),
        SoakBackbone::Decoder => format!(r#"{{"model": "d00", "prompt": "a text", "max_tokens": 2{extra}}}"#),
    };
    let (what, method, path, body, status) = match which {
        0 => ("bad JSON", "POST", main.to_string(), good("").trim_end_matches('}').to_string() + ",", 400),
        1 => ("unknown model", "POST", main.to_string(), good("").replace("d00", "no-such-delta"), 404),
        2 => ("unknown field", "POST", main.to_string(), good(r#", "bogus": 1"#), 400),
        3 => (
            "wrong type",
            "POST",
            main.to_string(),
            match kind {
                SoakBackbone::Encoder => r#"{"model": "d00", "input": 42}"#.to_string(),
                SoakBackbone::Decoder => r#"{"model": "d00", "prompt": "x", "max_tokens": "many"}"#.to_string(),
            },
            400,
        ),
        4 => match kind {
            SoakBackbone::Encoder => ("input over the token limit", "POST", main.to_string(), json!({"model": "d00", "input": ["word ".repeat(2000)]}).to_string(), 400),
            SoakBackbone::Decoder => ("max_tokens over the limit", "POST", main.to_string(), good("").replace(r#""max_tokens": 2"#, r#""max_tokens": 1000000"#), 400),
        },
        5 => ("body over the size limit", "POST", main.to_string(), good("").replace("a text", &"x".repeat(BODY_LIMIT + 10)), 413),
        6 => ("unknown route", "POST", "/v1/nothing-here".to_string(), good(""), 404),
        7 => ("path traversal", "POST", "/admin/deltas".to_string(), r#"{"name": "evil", "path": "../../etc"}"#.to_string(), 400),
        _ => ("empty body", "POST", main.to_string(), String::new(), 400),
    };
    Req::Invalid { what, method, path, body, status }
}

/// Sends a raw request; the reply's status and body (JSON, or the text as a JSON string).
fn send(url: &str, method: &str, path: &str, body: &str) -> Result<(u16, Value)> {
    let a = agent();
    let full = format!("{url}{path}");
    let mut r = match method {
        "DELETE" => a.delete(&full).call()?,
        _ => a.post(&full).header("Content-Type", "application/json").send(body)?,
    };
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string()?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

fn valid_body(v: &Valid) -> String {
    let text = PROMPTS[v.text];
    match v.route {
        "embeddings" | "classify" => json!({"model": v.model, "input": [text]}),
        "completions" => json!({"model": v.model, "prompt": text, "max_tokens": 4, "temperature": 0}),
        _ => json!({"model": v.model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0}),
    }
    .to_string()
}

/// The part of an answer that must not depend on the batch it ran in.
#[derive(Clone, Debug)]
enum Answer {
    Numbers(Vec<f64>),
    Text(String),
}

fn answer(route: &str, v: &Value) -> Option<Answer> {
    let nums = |x: &Value| x.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect::<Vec<_>>());
    match route {
        "embeddings" => nums(&v["data"][0]["embedding"]).map(Answer::Numbers),
        "classify" => {
            let mut p = nums(&v["data"][0]["probabilities"])?;
            p.push(v["data"][0]["label_id"].as_f64()?);
            Some(Answer::Numbers(p))
        }
        "completions" => v["choices"][0]["text"].as_str().map(|s| Answer::Text(s.to_string())),
        _ => v["choices"][0]["message"]["content"].as_str().map(|s| Answer::Text(s.to_string())),
    }
}

fn same(a: &Answer, b: &Answer) -> bool {
    match (a, b) {
        (Answer::Numbers(x), Answer::Numbers(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| (p - q).abs() <= 1e-4),
        (Answer::Text(x), Answer::Text(y)) => x == y,
        _ => false,
    }
}

/// Resident memory of this process (server and clients) in MiB.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

#[derive(Default)]
struct Tally {
    valid_ok: usize,
    valid_unloaded: usize,
    valid_wrong: Vec<String>,
    invalid_ok: usize,
    invalid_wrong: Vec<String>,
    lost: Vec<String>,
    by_invalid: HashMap<&'static str, usize>,
}

pub fn run(a: &BenchServeArgs, n: usize) -> Result<()> {
    let kind = a.soak_backbone;
    let tmp = tempfile::tempdir()?;
    let (model, decoder) = match kind {
        SoakBackbone::Encoder => {
            let dir = match &a.encoder {
                Some(p) => p.clone(),
                None => deltatune::assets::default_model(&mut |m| eprintln!("{m}"))?,
            };
            let mut m = BertModel::load(&dir, &Device::Cpu)?;
            write_deltas(tmp.path(), STABLE + CHURN, &mut m, "lora:r=8,lora_alpha=16,target=query+value", true)?;
            (dir, false)
        }
        SoakBackbone::Decoder => {
            let path = match &a.decoder {
                Some(p) => p.clone(),
                None => deltatune::assets::default_decoder(&mut |m| eprintln!("{m}"))?,
            };
            let mut lm = CausalLm::load(&path, &Device::Cpu)?;
            write_deltas(tmp.path(), STABLE + CHURN, &mut lm.model, "lora:r=8,lora_alpha=16,target=q_proj+v_proj", false)?;
            (path, true)
        }
    };
    // write_deltas names its folders d00, d01, …; the last CHURN become c0, c1, ….
    for c in 0..CHURN {
        std::fs::rename(tmp.path().join(format!("d{:02}", STABLE + c)), tmp.path().join(format!("c{c}")))?;
    }
    let cfg = ServeConfig {
        model: Some(model.clone()),
        decoder,
        delta_dir: Some(tmp.path().to_path_buf()),
        allow_admin: true,
        addr: "127.0.0.1:0".parse()?,
        max_batch: 16,
        queue_size: 4 * a.soak_clients.max(1),
        max_body_bytes: BODY_LIMIT,
        max_tokens: 64,
        timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let server = deltatune_serve::spawn(cfg, false).context("starting the server")?;
    let url = format!("http://{}", server.addr);
    println!("# deltatune bench serve --soak {n} ({:?} backbone {}, {} clients, {} threads, churn every {} s)", kind, model.display(), a.soak_clients, a.bench_threads, a.churn_seconds);

    // References: every valid request once, alone.
    let t0 = Instant::now();
    let mut reference = HashMap::new();
    for route in routes(kind) {
        for m in models() {
            if *route == "classify" && m == "base" {
                continue;
            }
            for text in 0..PROMPTS.len() {
                let v = Valid { route, model: m.clone(), text };
                let (st, body) = send(&url, "POST", &format!("/v1/{route}"), &valid_body(&v))?;
                if st != 200 {
                    bail!("reference request {v:?} failed: HTTP {st}: {body}");
                }
                let ans = answer(route, &body).with_context(|| format!("reference answer of {v:?} has no result: {body}"))?;
                reference.insert(v, ans);
            }
        }
    }
    println!("{} reference answers, each request alone ({:.1} s)", reference.len(), t0.elapsed().as_secs_f64());

    let next = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let tally = Mutex::new(Tally::default());
    let rss = Mutex::new(Vec::<(usize, f64)>::new());
    let churn = Mutex::new((0usize, 0usize, Vec::<String>::new()));
    let start = Instant::now();
    std::thread::scope(|sc| {
        // Unload one churn delta and load it back, in turn.
        sc.spawn(|| {
            let mut i = 0usize;
            let nap = |s: f64| {
                let until = Instant::now() + Duration::from_secs_f64(s);
                while Instant::now() < until && !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            };
            loop {
                nap(a.churn_seconds);
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let name = format!("c{}", i % CHURN);
                i += 1;
                let r = send(&url, "DELETE", &format!("/admin/deltas/{name}"), "");
                nap(a.churn_seconds / 2.0);
                let l = send(&url, "POST", "/admin/deltas", &json!({"name": name, "path": name}).to_string());
                let mut c = churn.lock().unwrap();
                match (r, l) {
                    (Ok((200, _)), Ok((201, _))) => {
                        c.0 += 1;
                        c.1 += 1;
                    }
                    (r, l) => c.2.push(format!("{name}: unload {r:?}, load {l:?}")),
                }
            }
        });
        let workers: Vec<_> = (0..a.soak_clients.max(1))
            .map(|_| {
                sc.spawn(|| loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= n {
                        break;
                    }
                    if k == n / 10 || k == n / 2 || k == n - 1 {
                        rss.lock().unwrap().push((k, rss_mib()));
                    }
                    if k % 1000 == 0 && k > 0 {
                        eprintln!("{k}/{n} requests, {:.0} s", start.elapsed().as_secs_f64());
                    }
                    match request(k, kind) {
                        Req::Valid(v) => {
                            let r = send(&url, "POST", &format!("/v1/{}", v.route), &valid_body(&v));
                            let mut t = tally.lock().unwrap();
                            match r {
                                Ok((200, body)) => match answer(v.route, &body) {
                                    Some(ans) if same(&ans, &reference[&v]) => t.valid_ok += 1,
                                    other => t.valid_wrong.push(format!("#{k} {v:?}: {other:?} vs {:?}", reference[&v])),
                                },
                                Ok((404, body)) if v.model.starts_with('c') && body["error"]["code"] == "model_not_found" => t.valid_unloaded += 1,
                                Ok((st, body)) => t.valid_wrong.push(format!("#{k} {v:?}: HTTP {st} {body}")),
                                Err(e) => t.lost.push(format!("#{k} {v:?}: {e:#}")),
                            }
                        }
                        Req::Invalid { what, method, path, body, status } => {
                            let r = send(&url, method, &path, &body);
                            let mut t = tally.lock().unwrap();
                            *t.by_invalid.entry(what).or_default() += 1;
                            match r {
                                Ok((st, v)) if st == status && v["error"]["message"].is_string() => t.invalid_ok += 1,
                                Ok((st, v)) => t.invalid_wrong.push(format!("#{k} {what}: HTTP {st} (wanted {status}) {v}")),
                                // A body over the limit may be cut off by the server before it is sent whole.
                                Err(_) if status == 413 => t.invalid_ok += 1,
                                Err(e) => t.lost.push(format!("#{k} {what}: {e:#}")),
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        done.store(true, Ordering::Relaxed);
    });
    let wall = start.elapsed().as_secs_f64();
    let (st, health) = {
        let mut r = agent().get(&format!("{url}/health")).call()?;
        (r.status().as_u16(), r.body_mut().read_to_string()?)
    };
    let t = tally.into_inner().unwrap();
    let (unloads, loads, churn_errors) = churn.into_inner().unwrap();
    let rss = rss.into_inner().unwrap();
    let valid = t.valid_ok + t.valid_unloaded + t.valid_wrong.len();
    let invalid = t.invalid_ok + t.invalid_wrong.len();
    println!("\n| requests | valid | answered = alone | churn delta unloaded (404) | wrong | invalid | refused as expected | wrong status | lost | unloads | loads | requests/s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {valid} | {} | {} | {} | {invalid} | {} | {} | {} | {unloads} | {loads} | {:.1} |",
        valid + invalid + t.lost.len(),
        t.valid_ok,
        t.valid_unloaded,
        t.valid_wrong.len(),
        t.invalid_ok,
        t.invalid_wrong.len(),
        t.lost.len(),
        n as f64 / wall
    );
    let mut kinds: Vec<_> = t.by_invalid.iter().collect();
    kinds.sort();
    println!("\ninvalid requests by kind: {}", kinds.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "));
    let rss_line = rss.iter().map(|(k, m)| format!("{m:.0} MiB at request {k}")).collect::<Vec<_>>().join(", ");
    let growth = match (rss.first(), rss.last()) {
        (Some(a), Some(b)) if rss.len() > 1 => (b.1 / a.1 - 1.0) * 100.0,
        _ => f64::NAN,
    };
    println!("resident memory: {rss_line}; growth after warm-up {growth:+.1}%");
    println!("health after the run: HTTP {st} {health}; {:.0} s in all", wall);
    for m in t.valid_wrong.iter().chain(&t.invalid_wrong).chain(&t.lost).chain(&churn_errors).take(20) {
        eprintln!("  {m}");
    }
    drop(server);
    if !t.valid_wrong.is_empty() || !t.invalid_wrong.is_empty() || !t.lost.is_empty() || !churn_errors.is_empty() || st != 200 {
        bail!(
            "soak run failed: {} wrong answers, {} wrong statuses, {} lost requests, {} failed unload/load cycles",
            t.valid_wrong.len(),
            t.invalid_wrong.len(),
            t.lost.len(),
            churn_errors.len()
        );
    }
    Ok(())
}
