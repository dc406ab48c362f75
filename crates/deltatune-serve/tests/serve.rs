//! The server over real HTTP on loopback: each test talks to a server started on a free port with
//! a blocking HTTP client. Servers are shared per configuration (one load of the backbone each).
//! Tests skip with a printed reason when the default decoder or encoder cannot be fetched.

use candle_core::{Device, Tensor};
use deltatune::artifacts::delta_dir;
use deltatune::attach::{self, AttachOptions};
use deltatune::core::Backbone;
use deltatune::delta::DeltaSpec;
use deltatune::head::{Head, HeadConfig, HeadKind};
use deltatune::lm::CausalLm;
use deltatune::{BertModel, LabelMap, Pooling};
use deltatune_serve::{ServeConfig, Server};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const KEY: &str = "test-key-123";

fn decoder_file() -> Option<PathBuf> {
    static F: OnceLock<Option<PathBuf>> = OnceLock::new();
    F.get_or_init(|| match deltatune::assets::default_decoder(&mut |m| eprintln!("{m}")) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("SKIP: the default decoder is not available ({e})");
            None
        }
    })
    .clone()
}

fn encoder_dir() -> Option<PathBuf> {
    static D: OnceLock<Option<PathBuf>> = OnceLock::new();
    D.get_or_init(|| match deltatune::assets::default_model(&mut |m| eprintln!("{m}")) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("SKIP: the default encoder is not available ({e})");
            None
        }
    })
    .clone()
}

/// Sets every tensor of group `name` to a deterministic table (so the delta changes outputs).
fn fill(model: &dyn Backbone, name: &str, center: f64, scale: f64) {
    for (k, (_, _, v)) in attach::group_vars(model, name).into_iter().enumerate() {
        let n = v.elem_count();
        let vals: Vec<f32> = (0..n).map(|i| (center + scale * ((i as f64) * 0.37 + k as f64).sin()) as f32).collect();
        v.set(&Tensor::from_vec(vals, v.dims(), &Device::Cpu).unwrap()).unwrap();
    }
}

/// Saves deltas for the decoder into `root`: `a` (LoRA), `b` (IA3), `p` (prefix).
fn decoder_deltas(root: &Path) {
    let f = decoder_file().unwrap();
    for (name, spec, center, scale) in [
        // Strong enough to change greedy answers (0.05 moved the logits by 2.7 but no argmax).
        ("a", "lora:r=4,lora_alpha=8,target=q_proj+v_proj+down_proj,name=lora", 0.0, 0.1),
        ("b", "ia3:name=ia3", 1.0, 0.2),
        ("p", "prefix:tokens=3,name=prefix", 0.0, 0.5),
    ] {
        let mut lm = CausalLm::load(&f, &Device::Cpu).unwrap();
        let spec = DeltaSpec::parse_cli(spec).unwrap();
        attach::attach(&mut lm.model, std::slice::from_ref(&spec), AttachOptions::default()).unwrap();
        fill(&lm.model, &spec.name, center, scale);
        delta_dir::save(&root.join(name), &lm.model, &[spec], &BTreeMap::new(), &serde_json::Map::new()).unwrap();
    }
}

/// Saves encoder deltas into `root`: `lora` (LoRA) and `cls` (IA3 with a two-label head).
fn encoder_deltas(root: &Path) {
    let dir = encoder_dir().unwrap();
    let mut m = BertModel::load(&dir, &Device::Cpu).unwrap();
    let spec = DeltaSpec::parse_cli("lora:r=4,lora_alpha=8,target=query+value,name=lora").unwrap();
    attach::attach(&mut m, std::slice::from_ref(&spec), AttachOptions::default()).unwrap();
    fill(&m, "lora", 0.0, 0.05);
    delta_dir::save(&root.join("lora"), &m, &[spec], &BTreeMap::new(), &serde_json::Map::new()).unwrap();

    let mut m = BertModel::load(&dir, &Device::Cpu).unwrap();
    let spec = DeltaSpec::parse_cli("ia3:name=ia3").unwrap();
    attach::attach(&mut m, std::slice::from_ref(&spec), AttachOptions::default()).unwrap();
    fill(&m, "ia3", 1.0, 0.2);
    let cfg = HeadConfig { kind: HeadKind::Classification { num_labels: 2 }, pooling: Pooling::Mean, hidden_size: m.hidden_size() };
    let head = Head::new(cfg.clone(), 7, &Device::Cpu).unwrap();
    let mut meta = serde_json::Map::new();
    meta.insert("head".into(), serde_json::to_value(&cfg).unwrap());
    meta.insert("task".into(), json!({"labels": serde_json::to_value(LabelMap::new(["negative", "positive"]).unwrap()).unwrap()}));
    delta_dir::save(&root.join("cls"), &m, &[spec], &head.tensors(), &meta).unwrap();
}

struct Running {
    server: Server,
    url: String,
    delta_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

fn start(cfg: ServeConfig, tmp: tempfile::TempDir, delta_dir: PathBuf) -> Running {
    let server = deltatune_serve::spawn(cfg, false).unwrap();
    let url = format!("http://{}", server.addr);
    Running { server, url, delta_dir, _tmp: tmp }
}

fn base_cfg() -> ServeConfig {
    ServeConfig { addr: "127.0.0.1:0".parse().unwrap(), timeout: Duration::from_secs(60), ..Default::default() }
}

/// The shared decoder server: deltas `a`, `b`, `p` from its delta dir, API key, admin on.
fn decoder() -> Option<&'static Running> {
    static S: OnceLock<Option<Running>> = OnceLock::new();
    S.get_or_init(|| {
        decoder_file()?;
        let tmp = tempfile::tempdir().unwrap();
        let dd = tmp.path().join("deltas");
        std::fs::create_dir(&dd).unwrap();
        decoder_deltas(&dd);
        // A spare copy outside the served folder for admin loads.
        let spare = tmp.path().join("spare");
        std::fs::create_dir(&spare).unwrap();
        let cfg = ServeConfig {
            decoder: true,
            delta_dir: Some(dd.clone()),
            api_key: Some(KEY.into()),
            allow_admin: true,
            max_batch: 8,
            max_tokens: 64,
            ..base_cfg()
        };
        Some(start(cfg, tmp, dd))
    })
    .as_ref()
}

fn encoder() -> Option<&'static Running> {
    static S: OnceLock<Option<Running>> = OnceLock::new();
    S.get_or_init(|| {
        encoder_dir()?;
        let tmp = tempfile::tempdir().unwrap();
        let dd = tmp.path().join("deltas");
        std::fs::create_dir(&dd).unwrap();
        encoder_deltas(&dd);
        let cfg = ServeConfig { delta_dir: Some(dd.clone()), max_batch: 32, max_input_tokens: 64, ..base_cfg() };
        Some(start(cfg, tmp, dd))
    })
    .as_ref()
}

macro_rules! require {
    ($s:expr) => {
        match $s {
            Some(s) => s,
            None => {
                eprintln!("SKIP {}: model unavailable", module_path!());
                return;
            }
        }
    };
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(120))).build().into()
}

/// POSTs a JSON body (with the key when `key`); returns status, headers' Retry-After and body.
fn post(url: &str, body: &str, key: Option<&str>) -> (u16, Option<String>, Value) {
    let mut req = agent().post(url).header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let mut r = req.send(body).unwrap();
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let text = r.body_mut().read_to_string().unwrap();
    (status, retry, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn get(url: &str, key: Option<&str>) -> (u16, String) {
    let mut req = agent().get(url);
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let mut r = req.call().unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

fn complete(s: &Running, model: &str, prompt: &str, max_tokens: usize) -> Value {
    let (st, _, v) = post(&format!("{}/v1/completions", s.url), &json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).to_string(), Some(KEY));
    assert_eq!(st, 200, "{v}");
    v
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(name) && (l.as_bytes().get(name.len()) == Some(&b' ') || l.as_bytes().get(name.len()) == Some(&b'{'))).map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap()).sum()
}

// ---------------------------------------------------------------------------------------------
// Decoder.

#[test]
fn completions_chat_and_streaming() {
    let s = require!(decoder());
    let v = complete(s, "a", "The capital of France is", 8);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "a");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(!text.is_empty());
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap() as usize <= 8, true);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    // The same request streamed gives the same text, piece by piece, then [DONE].
    let mut r = agent()
        .post(&format!("{}/v1/completions", s.url))
        .header("Authorization", &format!("Bearer {KEY}"))
        .header("Content-Type", "application/json")
        .send(json!({"model": "a", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stream": true}).to_string().as_str())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().get("content-type").unwrap().to_str().unwrap().starts_with("text/event-stream"));
    let reader = BufReader::new(r.body_mut().as_reader());
    let (mut streamed, mut done, mut finish) = (String::new(), false, None);
    for line in reader.lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let c: Value = serde_json::from_str(data).unwrap();
        streamed.push_str(c["choices"][0]["text"].as_str().unwrap());
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert!(done, "no [DONE]");
    assert_eq!(streamed, text);
    assert!(finish.is_some());
    // Chat through the model's template.
    let (st, _, v) = post(
        &format!("{}/v1/chat/completions", s.url),
        &json!({"model": "a", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6, "temperature": 0}).to_string(),
        Some(KEY),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    // Stop strings cut the text.
    let (st, _, v) = post(
        &format!("{}/v1/completions", s.url),
        &json!({"model": "base", "prompt": "1, 2, 3, 4,", "max_tokens": 20, "temperature": 0, "stop": ["7"]}).to_string(),
        Some(KEY),
    );
    assert_eq!(st, 200, "{v}");
    assert!(!v["choices"][0]["text"].as_str().unwrap().contains('7'), "{v}");
}

#[test]
fn mixed_delta_batch_answers_equal_each_request_alone() {
    let s = require!(decoder());
    let reqs = [("a", "The capital of France is"), ("base", "Once upon a time"), ("b", "def add(x, y):"), ("p", "Water boils at"), ("a", "My favourite food is")];
    let alone: Vec<String> = reqs.iter().map(|(m, p)| complete(s, m, p, 10)["choices"][0]["text"].as_str().unwrap().to_string()).collect();
    let (_, before) = get(&format!("{}/metrics", s.url), Some(KEY));
    let together: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = reqs.iter().map(|(m, p)| sc.spawn(move || complete(s, m, p, 10)["choices"][0]["text"].as_str().unwrap().to_string())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
    // The deltas change the answers (LoRA `a` on at least one of its two prompts; IA3 `b`), and
    // some passes held several rows.
    let base_of = |p: &str| complete(s, "base", p, 10)["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(base_of(reqs[0].1) != alone[0] || base_of(reqs[4].1) != alone[4], "LoRA `a` left both answers unchanged: {alone:?}");
    assert_ne!(base_of(reqs[2].1), alone[2], "IA3 `b` left the answer unchanged");
    let (_, after) = get(&format!("{}/metrics", s.url), Some(KEY));
    let multi = |t: &str| metric(t, "deltatune_batch_rows_count") - metric(t, "deltatune_batch_rows_bucket{le=\"1\"}");
    assert!(multi(&after) > multi(&before), "no pass held more than one row");
}

#[test]
fn bad_requests_get_openai_errors() {
    let s = require!(decoder());
    let u = format!("{}/v1/completions", s.url);
    let (st, _, v) = post(&u, "{not json", Some(KEY));
    assert_eq!(st, 400);
    assert_eq!(v["error"]["code"], "invalid_json");
    let (st, _, v) = post(&u, &json!({"model": "a", "prompt": "x", "bogus": 1}).to_string(), Some(KEY));
    assert_eq!(st, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("bogus"), "{v}");
    let (st, _, v) = post(&u, &json!({"model": "nope", "prompt": "x"}).to_string(), Some(KEY));
    assert_eq!(st, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(v["error"]["param"], "model");
    let (st, _, v) = post(&u, &json!({"model": "a", "prompt": "x", "max_tokens": 100000}).to_string(), Some(KEY));
    assert_eq!(st, 400);
    assert_eq!(v["error"]["param"], "max_tokens");
    let (st, _, v) = post(&u, &json!({"model": "a", "prompt": "x", "temperature": -1}).to_string(), Some(KEY));
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("temperature")));
    // A prompt longer than the context: 400 naming the prompt.
    let long = "hello ".repeat(9000);
    let (st, _, v) = post(&u, &json!({"model": "a", "prompt": long, "max_tokens": 4}).to_string(), Some(KEY));
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["param"], "prompt");
    // A body over the limit is refused from its declared length, before it is read.
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(s.server.addr).unwrap();
        let head = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", 2 << 20);
        c.write_all(head.as_bytes()).unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    }
    // An encoder route on a decoder server.
    let (st, _, _) = post(&format!("{}/v1/embeddings", s.url), &json!({"model": "a", "input": "x"}).to_string(), Some(KEY));
    assert_eq!(st, 400);
    // The server still answers.
    complete(s, "a", "Still there?", 2);
}

#[test]
fn auth_is_required_except_on_health() {
    let s = require!(decoder());
    let (st, _, v) = post(&format!("{}/v1/completions", s.url), &json!({"model": "a", "prompt": "x"}).to_string(), None);
    assert_eq!(st, 401);
    assert_eq!(v["error"]["type"], "authentication_error");
    let (st, _, _) = post(&format!("{}/v1/completions", s.url), &json!({"model": "a", "prompt": "x"}).to_string(), Some("wrong"));
    assert_eq!(st, 401);
    assert_eq!(get(&format!("{}/v1/models", s.url), None).0, 401);
    assert_eq!(get(&format!("{}/metrics", s.url), None).0, 401);
    assert_eq!(get(&format!("{}/health", s.url), None).0, 200);
    let (st, body) = get(&format!("{}/v1/models", s.url), Some(KEY));
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    for want in ["a", "b", "p"] {
        assert!(ids.contains(&want), "{ids:?}");
    }
    let a = v["data"].as_array().unwrap().iter().find(|m| m["id"] == "a").unwrap();
    assert_eq!(a["methods"], json!(["lora"]));
    assert!(a["parameters"].as_u64().unwrap() > 0);
    assert_eq!(a["batching"], "mixed");
    // The page is served without a key (it holds no data) and is HTML.
    let (st, page) = get(&format!("{}/", s.url), None);
    assert_eq!(st, 200);
    assert!(page.contains("<title>deltatune serve</title>"));
    // Metrics in Prometheus' text format.
    let (_, m) = get(&format!("{}/metrics", s.url), Some(KEY));
    assert!(m.contains("# TYPE deltatune_requests_total counter"), "{m}");
    assert!(m.contains("deltatune_time_to_first_token_seconds_bucket"));
}

#[test]
fn admin_load_is_confined_validated_and_unload_waits() {
    let s = require!(decoder());
    let u = format!("{}/admin/deltas", s.url);
    // Traversal and absolute paths are refused without naming the server's folders.
    for bad in ["../spare", "/etc", "a/../../spare", "/"] {
        let (st, _, v) = post(&u, &json!({"name": "x", "path": bad}).to_string(), Some(KEY));
        assert_eq!(st, 400, "{bad}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(!msg.contains(s.delta_dir.to_str().unwrap()), "{msg}");
    }
    // A foreign delta (an encoder's) is refused and nothing changes.
    if let Some(enc) = encoder_dir() {
        let mut m = BertModel::load(&enc, &Device::Cpu).unwrap();
        let spec = DeltaSpec::parse_cli("lora:r=2,target=query+value").unwrap();
        attach::attach(&mut m, std::slice::from_ref(&spec), AttachOptions::default()).unwrap();
        delta_dir::save(&s.delta_dir.join("foreign"), &m, &[spec], &BTreeMap::new(), &serde_json::Map::new()).unwrap();
        let (st, _, v) = post(&u, &json!({"name": "foreign", "path": "foreign"}).to_string(), Some(KEY));
        assert_eq!(st, 400, "{v}");
        assert_eq!(v["error"]["code"], "invalid_delta");
        assert!(!v["error"]["message"].as_str().unwrap().contains(s.delta_dir.to_str().unwrap()));
    }
    // Load a copy of `a` as `a2`: it answers like `a`.
    let (st, _, v) = post(&u, &json!({"name": "a2", "path": "a"}).to_string(), Some(KEY));
    assert_eq!(st, 201, "{v}");
    let want = complete(s, "a", "The sky is", 6)["choices"][0]["text"].clone();
    assert_eq!(complete(s, "a2", "The sky is", 6)["choices"][0]["text"], want);
    // Unloading while a stream runs on it waits for the stream to finish.
    let mut r = agent()
        .post(&format!("{}/v1/completions", s.url))
        .header("Authorization", &format!("Bearer {KEY}"))
        .header("Content-Type", "application/json")
        .send(json!({"model": "a2", "prompt": "Count: 1, 2,", "max_tokens": 40, "temperature": 0, "stream": true}).to_string().as_str())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let unload = std::thread::spawn({
        let url = format!("{}/admin/deltas/a2", s.url);
        move || {
            let mut r = agent().delete(&url).header("Authorization", &format!("Bearer {KEY}")).call().unwrap();
            (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
        }
    });
    let mut finish = None;
    for line in BufReader::new(r.body_mut().as_reader()).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            if d == "[DONE]" {
                break;
            }
            let c: Value = serde_json::from_str(d).unwrap();
            assert!(c.get("error").is_none(), "{c}");
            if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    assert!(finish.is_some(), "the stream was cut");
    let (st, body) = unload.join().unwrap();
    assert_eq!(st, 200, "{body}");
    let (st, _, _) = post(&format!("{}/v1/completions", s.url), &json!({"model": "a2", "prompt": "x"}).to_string(), Some(KEY));
    assert_eq!(st, 404);
}

/// A tiny queue: a full queue answers 429 with Retry-After; a client that disconnects frees its
/// slot; stopping the server drains running work and refuses new requests.
#[test]
fn queue_full_disconnect_and_drain() {
    require!(decoder_file());
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().to_path_buf();
    let cfg = ServeConfig { decoder: true, max_batch: 1, queue_size: 1, max_tokens: 400, ..base_cfg() };
    let mut s = start(cfg, tmp, dd);
    let u = format!("{}/v1/completions", s.url);
    let body = |n: usize, stream: bool| json!({"model": "base", "prompt": "List the numbers: 1, 2, 3,", "max_tokens": n, "temperature": 0, "stream": stream}).to_string();
    // 1: a long stream holding the only batch row.
    let mut r1 = agent().post(&u).header("Content-Type", "application/json").send(body(400, true).as_str()).unwrap();
    assert_eq!(r1.status().as_u16(), 200);
    let mut lines = BufReader::new(r1.body_mut().as_reader()).lines();
    lines.next().unwrap().unwrap();
    // 2: waits in the queue.
    let u2 = u.clone();
    let b2 = body(3, false);
    let second = std::thread::spawn(move || post(&u2, &b2, None));
    std::thread::sleep(Duration::from_millis(500));
    // 3: the queue is full.
    let (st, retry, v) = post(&u, &body(3, false), None);
    assert_eq!(st, 429, "{v}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(v["error"]["type"], "rate_limit_error");
    // Disconnecting 1 cancels it and lets 2 run.
    drop(lines);
    drop(r1);
    let (st, _, v) = second.join().unwrap();
    assert_eq!(st, 200, "{v}");
    let (_, m) = get(&format!("{}/metrics", s.url), None);
    assert!(metric(&m, "deltatune_generated_tokens_total") < 400.0, "the disconnected generation ran on");
    // Drain: a running request finishes, new ones are refused, then the server stops.
    let u3 = u.clone();
    let b3 = body(20, false);
    let running = std::thread::spawn(move || post(&u3, &b3, None));
    std::thread::sleep(Duration::from_millis(300));
    s.server.stop();
    let (st, _, v) = running.join().unwrap();
    assert_eq!(st, 200, "the running request was cut: {v}");
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, true);
    std::thread::sleep(Duration::from_millis(300));
    let refused = agent().post(&u).header("Content-Type", "application/json").send(body(3, false).as_str());
    match refused {
        Ok(r) => assert!(r.status().as_u16() == 503, "{}", r.status()),
        Err(_) => {} // the listener is closed
    }
    s.server.join().unwrap();
}

/// Over `max_concurrent` requests in flight, the load shedder answers 429 at once; the running
/// request is untouched.
#[test]
fn concurrency_limit_sheds_load() {
    require!(decoder_file());
    let tmp = tempfile::tempdir().unwrap();
    let dd = tmp.path().to_path_buf();
    let cfg = ServeConfig { decoder: true, max_concurrent: 1, max_tokens: 400, ..base_cfg() };
    let s = start(cfg, tmp, dd);
    let u = format!("{}/v1/completions", s.url);
    let body = |n: usize| json!({"model": "base", "prompt": "List the numbers: 1, 2, 3,", "max_tokens": n, "temperature": 0}).to_string();
    let (u1, b1) = (u.clone(), body(120));
    let first = std::thread::spawn(move || post(&u1, &b1, None));
    std::thread::sleep(Duration::from_millis(400));
    let t = Instant::now();
    let (st, retry, v) = post(&u, &body(3), None);
    assert_eq!(st, 429, "{v}");
    assert_eq!(v["error"]["code"], "too_many_requests");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(t.elapsed() < Duration::from_secs(2), "shedding waited {:?}", t.elapsed());
    let (st, _, v) = first.join().unwrap();
    assert_eq!(st, 200, "{v}");
    // Capacity is back once the first request has finished.
    let (st, _, v) = post(&u, &body(2), None);
    assert_eq!(st, 200, "{v}");
}

// ---------------------------------------------------------------------------------------------
// Encoder.

fn embed(s: &Running, model: &str, input: &[&str]) -> Vec<Vec<f32>> {
    let (st, _, v) = post(&format!("{}/v1/embeddings", s.url), &json!({"model": model, "input": input}).to_string(), None);
    assert_eq!(st, 200, "{v}");
    v["data"].as_array().unwrap().iter().map(|d| d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn embeddings_match_the_library_and_mixed_batches_equal_alone() {
    let s = require!(encoder());
    let texts = ["A cat sits on the mat.", "Stocks fell sharply on Monday."];
    let base = embed(s, "base", &texts);
    assert_eq!(base.len(), 2);
    // The library's embed job on the bare model.
    let dir = encoder_dir().unwrap();
    let m = BertModel::load(&dir, &Device::Cpu).unwrap();
    let enc = deltatune::TextEncoder::from_file(&m.files.tokenizer, 256).unwrap();
    let owned: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
    let mut lib = Vec::new();
    deltatune::api::embed_with(&m, &enc, &owned, Pooling::Mean, true, 8, &mut |rows| {
        lib.extend(rows);
        Ok(())
    })
    .unwrap();
    assert!(max_diff(&base, &lib) < 1e-5, "{}", max_diff(&base, &lib));
    let lora = embed(s, "lora", &texts);
    assert!(max_diff(&base, &lora) > 1e-3, "the delta changed nothing");
    // Concurrent requests for different deltas share passes; each answer equals its answer alone.
    let models = ["lora", "base", "cls", "lora", "base", "cls"];
    let alone: Vec<Vec<Vec<f32>>> = models.iter().map(|m| embed(s, m, &texts)).collect();
    let together: Vec<Vec<Vec<f32>>> = std::thread::scope(|sc| {
        let hs: Vec<_> = models.iter().map(|m| sc.spawn(move || embed(s, m, &texts))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, t) in alone.iter().zip(&together) {
        assert!(max_diff(a, t) < 1e-4, "{}", max_diff(a, t));
    }
}

#[test]
fn classify_through_the_saved_head() {
    let s = require!(encoder());
    let (st, _, v) = post(&format!("{}/v1/classify", s.url), &json!({"model": "cls", "input": ["great film", "awful film"]}).to_string(), None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["labels"], json!(["negative", "positive"]));
    for d in v["data"].as_array().unwrap() {
        let p: Vec<f64> = d["probabilities"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-4);
        let id = d["label_id"].as_u64().unwrap() as usize;
        assert_eq!(d["label"], json!(["negative", "positive"][id]));
        assert!(p[id] >= p[1 - id]);
    }
    // A delta without a head cannot classify; an over-long input is a 400 naming `input`.
    let (st, _, v) = post(&format!("{}/v1/classify", s.url), &json!({"model": "lora", "input": ["x"]}).to_string(), None);
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("model")));
    let long = "word ".repeat(200);
    let (st, _, v) = post(&format!("{}/v1/embeddings", s.url), &json!({"model": "base", "input": [long]}).to_string(), None);
    assert_eq!((st, v["error"]["param"].as_str()), (400, Some("input")), "{v}");
    let (st, _, _) = post(&format!("{}/v1/completions", s.url), &json!({"model": "base", "prompt": "x"}).to_string(), None);
    assert_eq!(st, 400);
}

// ---------------------------------------------------------------------------------------------
// The web page in a real browser.

/// Headless Chromium loads `/`, runs one streamed completion through the playground and the DOM
/// shows the answer (set `DELTATUNE_SCREENSHOT=path.png` to also save a screenshot). Skips when
/// no `chromium` is installed.
#[test]
fn page_runs_a_request_in_headless_chromium() {
    let s = require!(decoder());
    let Some(browser) = ["chromium", "chromium-browser", "google-chrome"].into_iter().find(|b| std::process::Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success())) else {
        eprintln!("SKIP page_runs_a_request_in_headless_chromium: no chromium installed");
        return;
    };
    let want = complete(s, "a", "The capital of France is", 12)["choices"][0]["text"].as_str().unwrap().to_string();
    let page = format!("{}/?key={KEY}&model=a&route=completions&max=12&run=1&stream=0&input=The%20capital%20of%20France%20is", s.url);
    let profile = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        format!("--user-data-dir={}", profile.path().display()),
        "--window-size=1280,900".into(),
        "--virtual-time-budget=120000".into(),
    ];
    let shot = std::env::var("DELTATUNE_SCREENSHOT").ok();
    if let Some(p) = &shot {
        let mut a = args.clone();
        a.push(format!("--screenshot={p}"));
        a.push(page.clone());
        let out = std::process::Command::new(browser).args(&a).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    args.push("--dump-dom".into());
    args.push(page);
    let out = std::process::Command::new(browser).args(&args).output().unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let answer = dom.split("id=\"answer\"").nth(1).unwrap_or_default();
    assert!(answer.contains("data-done=\"1\""), "the playground did not finish: {dom}");
    let shown = answer.split_once('>').map(|(_, r)| r).unwrap_or_default().split("</pre>").next().unwrap_or_default();
    assert_eq!(shown.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"), want);
}
