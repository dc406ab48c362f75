//! The routes: OpenAI-compatible generation and embeddings, classify, models, health, metrics,
//! admin, and the page at `/`. Handlers validate, enqueue a job for the engine and turn its
//! answer into JSON or server-sent events.

use crate::config::ServeConfig;
use crate::engine::{ClassRow, EncodeJob, EncodeKind, EncodeOut, GenEvent, GenJob, Job, Prompt};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::openai::*;
use crate::registry::{check_name, resolve_inside, DeltaInfo, Registry};
use axum::body::Bytes;
use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use deltatune::lm::GenerateOptions;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tower::ServiceBuilder;

/// What every handler shares.
pub struct App {
    pub cfg: ServeConfig,
    pub jobs: mpsc::Sender<Job>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// `decoder` or `encoder`.
    pub kind: &'static str,
    /// The name clients use for the bare backbone.
    pub base_name: String,
    pub base_params: usize,
    pub draining: AtomicBool,
    next_id: AtomicU64,
    started: u64,
}

impl App {
    pub fn new(cfg: ServeConfig, jobs: mpsc::Sender<Job>, registry: Arc<Registry>, metrics: Arc<Metrics>, kind: &'static str, base_name: String, base_params: usize) -> Self {
        App { cfg, jobs, registry, metrics, kind, base_name, base_params, draining: AtomicBool::new(false), next_id: AtomicU64::new(1), started: now() }
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}-{}", self.started, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// The delta a request names (`None` for the base), or 404 naming what is loaded.
    fn delta(&self, model: &str) -> Result<Option<Arc<DeltaInfo>>, ApiError> {
        if model == self.base_name || model == "base" {
            return Ok(None);
        }
        self.registry.get(model).map(Some).ok_or_else(|| {
            let mut known = vec![self.base_name.clone()];
            known.extend(self.registry.names());
            ApiError::unknown_model(model, &known)
        })
    }

    /// Hands a job to the engine; a full queue is a 429.
    fn enqueue(&self, job: Job) -> Result<(), ApiError> {
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::new(429, "rate_limit_error", "the server is busy (request queue full); retry shortly").with_code("queue_full"),
            mpsc::error::TrySendError::Closed(_) => ApiError::new(503, "server_error", "the server is shutting down"),
        })
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The router with every route and layer.
pub fn router(app: Arc<App>) -> Router {
    let limit = app.cfg.max_body_bytes;
    let concurrent = app.cfg.max_concurrent.max(1);
    // Over `max_concurrent` requests in flight, the load shedder refuses at once (429) instead of
    // letting connections pile up behind the limit.
    let shed = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            ApiError::new(429, "rate_limit_error", "the server is handling too many requests; retry shortly").with_code("too_many_requests")
        }))
        .load_shed()
        .concurrency_limit(concurrent);
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/classify", post(classify))
        .route("/admin/deltas", post(admin_load))
        .route("/admin/deltas/{name}", delete(admin_unload))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(shed)
        .with_state(app)
}

/// Draining refuses new work; the API key guards every route but `/health` and the page.
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let open = path == "/health" || path == "/";
    if app.draining.load(Ordering::SeqCst) && path != "/health" {
        return ApiError::new(503, "server_error", "the server is shutting down").into_response();
    }
    // A declared length over the limit is refused before any of the body is read (chunked
    // bodies are cut by the body limit layer as they arrive).
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.cfg.max_body_bytes as u64) {
        app.metrics.request(route_label(&path), "", 413, 0.0);
        return ApiError::new(413, "invalid_request_error", format!("the request body is over the server's limit of {} bytes", app.cfg.max_body_bytes)).with_code("body_too_large").into_response();
    }
    if let (Some(key), false) = (&app.cfg.api_key, open) {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.trim().as_bytes(), key.as_bytes())) {
            let e = ApiError::new(401, "authentication_error", "missing or wrong API key (send `Authorization: Bearer <key>`)").with_code("invalid_api_key");
            app.metrics.request(route_label(&path), "", 401, 0.0);
            return e.into_response();
        }
    }
    next.run(req).await
}

/// A fixed metrics label for a request path (unknown paths share one label).
fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/embeddings" => "/v1/embeddings",
        "/v1/classify" => "/v1/classify",
        "/v1/models" => "/v1/models",
        "/metrics" => "/metrics",
        p if p.starts_with("/admin/") => "/admin/deltas",
        _ => "other",
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> ApiError {
    ApiError::new(404, "invalid_request_error", "no such route").with_code("not_found")
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let draining = app.draining.load(Ordering::SeqCst);
    let body = serde_json::json!({"status": if draining { "draining" } else { "ok" }, "backbone": app.kind, "deltas": app.registry.names().len()});
    let status = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn models(State(app): State<Arc<App>>) -> Json<ModelList> {
    let mut data = vec![ModelCard {
        id: app.base_name.clone(),
        object: "model",
        created: app.started,
        owned_by: "deltatune",
        kind: "base",
        methods: Vec::new(),
        parameters: app.base_params,
        batching: None,
        source: None,
        labels: None,
    }];
    for d in app.registry.all() {
        data.push(ModelCard {
            id: d.name.clone(),
            object: "model",
            created: d.created,
            owned_by: "deltatune",
            kind: "delta",
            methods: d.methods.clone(),
            parameters: d.params,
            batching: Some(d.batching),
            source: Some(d.source.clone()),
            labels: d.labels.clone(),
        });
    }
    Json(ModelList { object: "list", data, backbone_kind: app.kind, backbone: app.base_name.clone() })
}

/// Parses a JSON body; errors name the field (serde's message) and never echo the body.
fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(413, "invalid_request_error", "the request body is over the server's size limit").with_code("body_too_large")
        } else {
            ApiError::bad_request(format!("the request body cannot be read: {e}"))
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")).with_code("invalid_json"))
}

/// Records a finished request in the metrics and returns the response.
fn finish(app: &App, route: &str, model: &str, start: Instant, r: Result<Response, ApiError>) -> Response {
    let r = r.unwrap_or_else(IntoResponse::into_response);
    // Unknown model names are not used as label values (unbounded cardinality).
    let label = if model.is_empty() || model == app.base_name || app.registry.get(model).is_some() { model } else { "unknown" };
    let secs = start.elapsed().as_secs_f64();
    app.metrics.request(route, label, r.status().as_u16(), secs);
    tracing::info!(route, model = label, status = r.status().as_u16(), ms = (secs * 1e3) as u64, "request");
    r
}

/// Sampling settings checked against the server's limits.
fn options(app: &App, max_tokens: Option<usize>, temperature: Option<f64>, top_p: Option<f64>, seed: Option<u64>, stop: Option<OneOrMany>, n: Option<usize>, default_max: usize) -> Result<GenerateOptions, ApiError> {
    let max = max_tokens.unwrap_or(default_max.min(app.cfg.max_tokens));
    if max == 0 || max > app.cfg.max_tokens {
        return Err(ApiError::field("max_tokens", format!("max_tokens is {max}; this server allows 1 to {}", app.cfg.max_tokens)));
    }
    let temperature = temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::field("temperature", "temperature must be between 0 and 2"));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::field("top_p", "top_p must be in (0, 1]"));
    }
    if n.is_some_and(|n| n != 1) {
        return Err(ApiError::field("n", "only n = 1 is supported"));
    }
    let stop = stop.map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::field("stop", "stop takes up to 4 non-empty strings"));
    }
    Ok(GenerateOptions { max_new_tokens: max, temperature, top_p, top_k: 0, seed: seed.unwrap_or(0), stop_ids: Vec::new(), stop_strings: stop, ignore_eos: false })
}

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let start = Instant::now();
    let req: CompletionRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return finish(&app, "/v1/completions", "", start, Err(e)),
    };
    let model = req.model.clone();
    let r = async {
        let prompts = req.prompt.into_vec();
        if prompts.len() != 1 {
            return Err(ApiError::field("prompt", "send one prompt per request"));
        }
        if req.echo == Some(true) || req.best_of.is_some_and(|b| b > 1) || req.suffix.is_some() {
            return Err(ApiError::field("echo", "echo, best_of and suffix are not supported"));
        }
        let opts = options(&app, req.max_tokens.or(req.max_completion_tokens), req.temperature, req.top_p, req.seed, req.stop, req.n, 16)?;
        let prompt = prompts.into_iter().next().unwrap_or_default();
        generate(&app, &req.model, Prompt::Text(prompt), opts, req.stream, false, start).await
    }
    .await;
    finish(&app, "/v1/completions", &model, start, r)
}

async fn chat(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let start = Instant::now();
    let req: ChatRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return finish(&app, "/v1/chat/completions", "", start, Err(e)),
    };
    let model = req.model.clone();
    let r = async {
        if req.messages.is_empty() {
            return Err(ApiError::field("messages", "messages is empty"));
        }
        for m in &req.messages {
            if !["system", "user", "assistant", "developer"].contains(&m.role.as_str()) {
                return Err(ApiError::field("messages", format!("unknown role `{}` (system, user, assistant)", m.role)));
            }
        }
        let msgs = req.messages.iter().map(|m| (if m.role == "developer" { "system".to_string() } else { m.role.clone() }, m.content.clone())).collect();
        let opts = options(&app, req.max_tokens.or(req.max_completion_tokens), req.temperature, req.top_p, req.seed, req.stop, req.n, 256)?;
        generate(&app, &req.model, Prompt::Chat(msgs), opts, req.stream, true, start).await
    }
    .await;
    finish(&app, "/v1/chat/completions", &model, start, r)
}

/// Enqueues a generation and answers with one JSON object or a stream of events.
async fn generate(app: &Arc<App>, model: &str, prompt: Prompt, opts: GenerateOptions, stream: bool, chat: bool, start: Instant) -> Result<Response, ApiError> {
    if app.kind != "decoder" {
        return Err(ApiError::field("model", "this server runs an encoder; use /v1/embeddings or /v1/classify"));
    }
    let delta = app.delta(model)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let deadline = start + app.cfg.timeout;
    app.enqueue(Job::Generate(GenJob { delta, prompt, opts, events: tx, deadline, enqueued: start }))?;
    let gone = || ApiError::internal("the engine stopped before answering");
    let late = || ApiError::new(504, "timeout_error", "the request ran past the server's time limit").with_code("timeout");
    // The first event settles the status: an error before any text is a plain error response.
    let first = match next_event(&mut rx, deadline).await {
        Ok(Some(GenEvent::Error(e))) => return Err(e),
        Ok(Some(ev)) => ev,
        Ok(None) => return Err(gone()),
        Err(_) => return Err(late()),
    };
    let id = app.id(if chat { "chatcmpl" } else { "cmpl" });
    let created = now();
    let model = model.to_string();
    if !stream {
        let mut text = String::new();
        let mut ev = first;
        loop {
            match ev {
                GenEvent::Text(t) => text.push_str(&t),
                GenEvent::Error(e) => return Err(e),
                GenEvent::Done { finish_reason, prompt_tokens, completion_tokens } => {
                    let usage = Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
                    return Ok(if chat {
                        let choice = ChatChoice { index: 0, message: AssistantMessage { role: "assistant", content: text }, logprobs: None, finish_reason: finish_reason.into() };
                        Json(ChatCompletion { id, object: "chat.completion", created, model, choices: vec![choice], usage }).into_response()
                    } else {
                        let choice = CompletionChoice { index: 0, text, logprobs: None, finish_reason: Some(finish_reason.into()) };
                        Json(Completion { id, object: "text_completion", created, model, choices: vec![choice], usage: Some(usage) }).into_response()
                    });
                }
            }
            ev = match next_event(&mut rx, deadline).await {
                Ok(Some(ev)) => ev,
                Ok(None) => return Err(gone()),
                Err(_) => return Err(late()),
            };
        }
    }
    // Streaming: every event becomes one `data:` line; `[DONE]` ends the stream.
    let chunk = move |content: Option<String>, role: bool, finish: Option<&str>, usage: Option<Usage>| -> String {
        let json = if chat {
            let delta = Delta { role: role.then_some("assistant"), content };
            serde_json::to_string(&ChatChunk { id: id.clone(), object: "chat.completion.chunk", created, model: model.clone(), choices: vec![ChunkChoice { index: 0, delta, logprobs: None, finish_reason: finish.map(str::to_string) }], usage })
        } else {
            let choice = CompletionChoice { index: 0, text: content.unwrap_or_default(), logprobs: None, finish_reason: finish.map(str::to_string) };
            serde_json::to_string(&Completion { id: id.clone(), object: "text_completion", created, model: model.clone(), choices: vec![choice], usage })
        };
        json.unwrap_or_default()
    };
    let mut first_chunk = true;
    let events = tokio_stream::once(first).chain(UnboundedReceiverStream::new(rx)).map(move |ev| {
        let role = std::mem::take(&mut first_chunk) && chat;
        let data = match ev {
            GenEvent::Text(t) => chunk(Some(t), role, None, None),
            GenEvent::Done { finish_reason, prompt_tokens, completion_tokens } => {
                let usage = Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
                chunk(if chat { None } else { Some(String::new()) }, role, Some(finish_reason), Some(usage))
            }
            GenEvent::Error(e) => e.json(),
        };
        Ok::<Event, Infallible>(Event::default().data(data))
    });
    let done = tokio_stream::once(Ok::<Event, Infallible>(Event::default().data("[DONE]")));
    Ok(Sse::new(events.chain(done)).keep_alive(KeepAlive::default()).into_response())
}

/// The next event of a generation, or an error once the request's time is up (with a little
/// slack for the engine's own timeout answer).
async fn next_event(rx: &mut mpsc::UnboundedReceiver<GenEvent>, deadline: Instant) -> Result<Option<GenEvent>, tokio::time::error::Elapsed> {
    let left = deadline.saturating_duration_since(Instant::now()) + std::time::Duration::from_millis(500);
    tokio::time::timeout(left, rx.recv()).await
}

async fn encode(app: &Arc<App>, model: &str, input: OneOrMany, kind: EncodeKind, start: Instant) -> Result<(EncodeOut, usize), ApiError> {
    if app.kind != "encoder" {
        return Err(ApiError::field("model", "this server runs a decoder; use /v1/completions or /v1/chat/completions"));
    }
    let delta = app.delta(model)?;
    let texts = input.into_vec();
    if texts.is_empty() || texts.len() > app.cfg.max_inputs.min(app.cfg.max_batch) {
        return Err(ApiError::field("input", format!("send 1 to {} texts", app.cfg.max_inputs.min(app.cfg.max_batch))));
    }
    let (tx, rx) = oneshot::channel();
    let deadline = start + app.cfg.timeout;
    app.enqueue(Job::Encode(EncodeJob { delta, texts, kind, reply: tx, deadline, enqueued: start }))?;
    match tokio::time::timeout(app.cfg.timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(ApiError::new(504, "timeout_error", "the request ran past the server's time limit").with_code("timeout")),
        Err(_) => Err(ApiError::new(504, "timeout_error", "the request ran past the server's time limit").with_code("timeout")),
    }
}

async fn embeddings(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let start = Instant::now();
    let req: EmbeddingsRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return finish(&app, "/v1/embeddings", "", start, Err(e)),
    };
    let model = req.model.clone();
    let r = async {
        if req.encoding_format.as_deref().is_some_and(|f| f != "float") {
            return Err(ApiError::field("encoding_format", "only `float` is supported"));
        }
        if req.dimensions.is_some() {
            return Err(ApiError::field("dimensions", "dimensions is not supported (the backbone's width is fixed)"));
        }
        let (out, tokens) = encode(&app, &req.model, req.input, EncodeKind::Embed, start).await?;
        let EncodeOut::Embeddings(rows) = out else { return Err(ApiError::internal("wrong answer kind")) };
        let data = rows.into_iter().enumerate().map(|(index, embedding)| Embedding { object: "embedding", index, embedding }).collect();
        Ok(Json(Embeddings { object: "list", data, model: req.model.clone(), usage: EmbeddingUsage { prompt_tokens: tokens, total_tokens: tokens } }).into_response())
    }
    .await;
    finish(&app, "/v1/embeddings", &model, start, r)
}

async fn classify(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let start = Instant::now();
    let req: ClassifyRequest = match parse(body) {
        Ok(r) => r,
        Err(e) => return finish(&app, "/v1/classify", "", start, Err(e)),
    };
    let model = req.model.clone();
    let r = async {
        let labels = app.delta(&req.model)?.and_then(|d| d.labels.clone()).unwrap_or_default();
        let (out, tokens) = encode(&app, &req.model, req.input, EncodeKind::Classify, start).await?;
        let EncodeOut::Classes(rows) = out else { return Err(ApiError::internal("wrong answer kind")) };
        let data = rows.into_iter().enumerate().map(|(index, ClassRow { label, label_id, probabilities })| Classification { index, label, label_id, probabilities }).collect();
        Ok(Json(Classifications { object: "list", model: req.model.clone(), labels, data, usage: EmbeddingUsage { prompt_tokens: tokens, total_tokens: tokens } }).into_response())
    }
    .await;
    finish(&app, "/v1/classify", &model, start, r)
}

fn admin_enabled(app: &App) -> Result<&std::path::Path, ApiError> {
    if !app.cfg.allow_admin {
        return Err(ApiError::new(403, "permission_error", "admin routes are off (start the server with --allow-admin)").with_code("admin_disabled"));
    }
    app.cfg.delta_dir.as_deref().ok_or_else(|| ApiError::new(403, "permission_error", "admin loads need --delta-dir").with_code("admin_disabled"))
}

async fn admin_load(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    let start = Instant::now();
    let r = async {
        let root = admin_enabled(&app)?.to_path_buf();
        let req: LoadRequest = parse(body)?;
        check_name(&req.name)?;
        if req.name == app.base_name || req.name == "base" {
            return Err(ApiError::field("name", "that name is the base model's"));
        }
        let path = resolve_inside(&root, &req.path)?;
        let (tx, rx) = oneshot::channel();
        let job = Job::Load { name: req.name.clone(), path, source: req.path.clone(), reply: tx };
        app.jobs.send(job).await.map_err(|_| ApiError::new(503, "server_error", "the server is shutting down"))?;
        let info = rx.await.map_err(|_| ApiError::internal("the engine stopped"))??;
        Ok((StatusCode::CREATED, Json(serde_json::json!({"loaded": info.name, "methods": info.methods, "parameters": info.params, "batching": info.batching}))).into_response())
    }
    .await;
    finish(&app, "/admin/deltas", "", start, r)
}

async fn admin_unload(State(app): State<Arc<App>>, UrlPath(name): UrlPath<String>) -> Response {
    let start = Instant::now();
    let r = async {
        admin_enabled(&app)?;
        let (tx, rx) = oneshot::channel();
        app.jobs.send(Job::Unload { name: name.clone(), reply: tx }).await.map_err(|_| ApiError::new(503, "server_error", "the server is shutting down"))?;
        rx.await.map_err(|_| ApiError::internal("the engine stopped"))??;
        Ok(Json(serde_json::json!({"unloaded": name})).into_response())
    }
    .await;
    finish(&app, "/admin/deltas", "", start, r)
}
