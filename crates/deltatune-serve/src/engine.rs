//! The engine: one thread that owns the backbone and every delta on it, and runs all model work.
//!
//! Requests reach it through a bounded queue. Generation is continuously batched: each loop
//! prefills the sequences that arrived (each alone, through its own delta), then runs one decoding
//! step for every running sequence together; a sequence leaves the batch when it finishes, its
//! client goes away or its time runs out. Rows of different deltas share a pass through the frozen
//! backbone, each applying its own delta (a [`RowRoute`]); deltas that replace base parameters
//! run in passes of their own. Encoder requests (embeddings, classify) waiting at the same time are
//! encoded in shared passes the same way. Loading and unloading deltas happen between passes.

use crate::error::{from_lib, ApiError};
use crate::metrics::Metrics;
use crate::registry::{Batching, DeltaInfo, Registry};
use candle_core::{DType, Device, Tensor};
use deltatune::artifacts::load::load_delta_as;
use deltatune::attach::{self, AttachOptions};
use deltatune::backbone::bert::BertModel;
use deltatune::backbone::llama::{last_position, KvCache};
use deltatune::core::{l2_normalize, Backbone, ForwardCtx, ModelOutput, Pooling, RowRoute};
use deltatune::data::tokenize::{Padding, TextEncoder};
use deltatune::head::{Head, HeadConfig, HeadKind};
use deltatune::lm::generate::{sample, GenerateOptions, TextStream};
use deltatune::lm::CausalLm;
use deltatune::ops::DropoutKey;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// The frozen backbone.
pub enum Model {
    Decoder(CausalLm),
    Encoder { model: BertModel, enc: TextEncoder },
}

impl Model {
    pub fn backbone(&self) -> &dyn Backbone {
        match self {
            Model::Decoder(lm) => &lm.model,
            Model::Encoder { model, .. } => model,
        }
    }

    fn backbone_mut(&mut self) -> &mut dyn Backbone {
        match self {
            Model::Decoder(lm) => &mut lm.model,
            Model::Encoder { model, .. } => model,
        }
    }
}

/// What a generation sends back as it runs.
#[derive(Debug)]
pub enum GenEvent {
    /// Settled text.
    Text(String),
    /// The end: `stop` (end of turn or a stop string) or `length`.
    Done { finish_reason: &'static str, prompt_tokens: usize, completion_tokens: usize },
    Error(ApiError),
}

pub struct GenJob {
    pub delta: Option<Arc<DeltaInfo>>,
    pub prompt: Prompt,
    pub opts: GenerateOptions,
    pub events: mpsc::UnboundedSender<GenEvent>,
    pub deadline: Instant,
    pub enqueued: Instant,
}

/// A prompt as text, or chat messages rendered with the model's template.
pub enum Prompt {
    Text(String),
    Chat(Vec<(String, String)>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeKind {
    Embed,
    Classify,
}

/// One row of a classify answer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClassRow {
    pub label: String,
    pub label_id: usize,
    pub probabilities: Vec<f32>,
}

#[derive(Debug)]
pub enum EncodeOut {
    Embeddings(Vec<Vec<f32>>),
    Classes(Vec<ClassRow>),
}

pub struct EncodeJob {
    pub delta: Option<Arc<DeltaInfo>>,
    pub texts: Vec<String>,
    pub kind: EncodeKind,
    pub reply: oneshot::Sender<Result<(EncodeOut, usize), ApiError>>,
    pub deadline: Instant,
    pub enqueued: Instant,
}

pub enum Job {
    Generate(GenJob),
    Encode(EncodeJob),
    /// Load the folder `path` as delta `name` (`source` is what `/v1/models` shows).
    Load { name: String, path: PathBuf, source: String, reply: oneshot::Sender<Result<Arc<DeltaInfo>, ApiError>> },
    /// Unload delta `name` once no request uses it.
    Unload { name: String, reply: oneshot::Sender<Result<(), ApiError>> },
}

/// A running generation.
struct Seq {
    job: GenJob,
    cache: KvCache,
    stream: TextStream,
    /// The token to feed next.
    next: u32,
    step: usize,
    max_new: usize,
    prompt_tokens: usize,
    stop_ids: Vec<u32>,
    key: DropoutKey,
    done: bool,
}

pub struct Engine {
    pub model: Model,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    max_batch: usize,
    max_input_tokens: usize,
    /// Saved heads by delta name (classify).
    heads: BTreeMap<String, Head>,
    waiting: Vec<GenJob>,
    running: Vec<Seq>,
    encodes: Vec<EncodeJob>,
    unloads: Vec<(Arc<DeltaInfo>, oneshot::Sender<Result<(), ApiError>>)>,
}

impl Engine {
    pub fn new(model: Model, registry: Arc<Registry>, metrics: Arc<Metrics>, max_batch: usize, max_input_tokens: usize) -> Self {
        Engine {
            model,
            registry,
            metrics,
            max_batch: max_batch.max(1),
            max_input_tokens,
            heads: BTreeMap::new(),
            waiting: Vec::new(),
            running: Vec::new(),
            encodes: Vec::new(),
            unloads: Vec::new(),
        }
    }

    /// Loads `path` as delta `name`: validated and attached, or refused with the model untouched.
    pub fn load(&mut self, name: &str, path: &std::path::Path, source: &str) -> Result<Arc<DeltaInfo>, ApiError> {
        if self.registry.get(name).is_some() {
            return Err(ApiError::field("name", format!("a delta named `{name}` is already loaded")).with_code("conflict"));
        }
        let backbone = self.model.backbone_mut();
        let loaded = load_delta_as(path, backbone, AttachOptions::default(), name).map_err(|e| refuse(&e, path, source))?;
        let groups: Vec<String> = loaded.specs.iter().map(|s| s.name.clone()).collect();
        let info = (|| -> Result<DeltaInfo, ApiError> {
            let b = self.model.backbone();
            let mut params = 0usize;
            let mut finite = true;
            for g in &groups {
                for (_, _, v) in attach::group_vars(b, g) {
                    params += v.elem_count();
                    let m = v.as_tensor().abs().and_then(|t| t.flatten_all()).and_then(|t| t.max(0)).and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.to_scalar::<f32>());
                    finite &= m.map(f32::is_finite).unwrap_or(false);
                }
            }
            if !finite {
                return Err(ApiError::field("path", format!("delta `{source}` holds non-finite values")).with_code("invalid_delta"));
            }
            let (mut replaces, mut virtual_tokens) = (false, 0usize);
            for s in b.sites() {
                for g in &groups {
                    replaces |= s.replaces_params(g).map_err(|e| ApiError::internal(e.to_string()))?;
                    virtual_tokens += s.virtual_tokens_of(g);
                }
            }
            let batching = if replaces {
                Batching::Alone
            } else if virtual_tokens > 0 {
                Batching::Virtual
            } else {
                Batching::Mixed
            };
            let labels = loaded.meta.get("task").and_then(|t| serde_json::from_value::<deltatune::LabelMap>(t["labels"].clone()).ok()).map(|l| l.names().to_vec());
            Ok(DeltaInfo {
                name: name.to_string(),
                methods: loaded.specs.iter().map(|s| s.config.method().to_string()).collect(),
                params,
                groups: groups.clone(),
                batching,
                source: source.to_string(),
                labels,
                created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            })
        })();
        let mut info = match info {
            Ok(i) => i,
            Err(e) => {
                attach::detach_named(self.model.backbone_mut(), &loaded.specs);
                return Err(e);
            }
        };
        if let (Model::Encoder { .. }, Some(cfg)) = (&self.model, loaded.meta.get("head")) {
            let head = serde_json::from_value::<HeadConfig>(cfg.clone())
                .map_err(|e| e.to_string())
                .and_then(|cfg| Head::from_tensors(cfg, &loaded.extra_tensors, source).map_err(|e| e.to_string()));
            match head {
                Ok(h) => {
                    if info.labels.is_none() {
                        if let HeadKind::Classification { num_labels } = h.config.kind {
                            info.labels = Some((0..num_labels).map(|i| format!("LABEL_{i}")).collect());
                        }
                    }
                    self.heads.insert(name.to_string(), h);
                }
                Err(e) => {
                    attach::detach_named(self.model.backbone_mut(), &loaded.specs);
                    return Err(ApiError::field("path", format!("delta `{source}`: its head cannot be read: {e}")).with_code("invalid_delta"));
                }
            }
        }
        let info = Arc::new(info);
        self.registry.insert(info.clone());
        self.metrics.set_deltas(self.registry.names().len());
        Ok(info)
    }

    /// Runs until every sender of `rx` is gone and all accepted work is finished.
    pub fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut open = true;
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty() && self.encodes.is_empty() && self.unloads.is_empty();
            if idle {
                if !open {
                    break;
                }
                match rx.blocking_recv() {
                    Some(j) => self.accept(j),
                    None => break,
                }
            }
            // Take only what the next passes can hold: the rest waits in the bounded queue,
            // which is what turns overload into 429s instead of memory.
            while self.running.len() + self.waiting.len() + self.encodes.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(j) => self.accept(j),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.metrics.set_queue(rx.len());
            self.run_encodes();
            self.admit();
            self.decode_step();
            self.finish_unloads();
            if !self.unloads.is_empty() && self.running.is_empty() && self.waiting.is_empty() && self.encodes.is_empty() {
                // Waiting for a request on another thread to drop its hold.
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }

    fn accept(&mut self, job: Job) {
        match job {
            Job::Generate(g) => self.waiting.push(g),
            Job::Encode(e) => self.encodes.push(e),
            Job::Load { name, path, source, reply } => {
                let _ = reply.send(self.load(&name, &path, &source));
            }
            Job::Unload { name, reply } => match self.registry.remove(&name) {
                Some(info) => {
                    self.metrics.set_deltas(self.registry.names().len());
                    self.unloads.push((info, reply));
                }
                None => {
                    let _ = reply.send(Err(ApiError::unknown_model(&name, &self.registry.names())));
                }
            },
        }
    }

    /// Detaches unloaded deltas that no request holds any more.
    fn finish_unloads(&mut self) {
        let mut i = 0;
        while i < self.unloads.len() {
            if Arc::strong_count(&self.unloads[i].0) == 1 {
                let (info, reply) = self.unloads.swap_remove(i);
                let names: Vec<&str> = info.groups.iter().map(String::as_str).collect();
                for s in self.model.backbone_mut().sites_mut() {
                    s.deltas.retain(|a| !names.contains(&a.name.as_str()));
                }
                self.heads.remove(&info.name);
                let _ = reply.send(Ok(()));
            } else {
                i += 1;
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Generation.

    /// Prefills waiting sequences while the batch has room.
    fn admit(&mut self) {
        while self.running.len() < self.max_batch && !self.waiting.is_empty() {
            let job = self.waiting.remove(0);
            if job.events.is_closed() {
                self.metrics.cancelled();
                continue;
            }
            if Instant::now() > job.deadline {
                let _ = job.events.send(GenEvent::Error(timeout()));
                continue;
            }
            self.metrics.queue_wait(job.enqueued.elapsed().as_secs_f64());
            match self.prefill(job) {
                Ok(Some(seq)) => self.running.push(seq),
                Ok(None) => {}
                Err((job, e)) => {
                    let _ = job.events.send(GenEvent::Error(e));
                }
            }
        }
    }

    fn prefill(&mut self, job: GenJob) -> Result<Option<Seq>, (GenJob, ApiError)> {
        let Model::Decoder(lm) = &self.model else { return Err((job, ApiError::bad_request("this server runs an encoder"))) };
        let text = match &job.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(msgs) => {
                let m: Vec<(&str, &str)> = msgs.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
                match lm.tokenizer.chat_prompt(&m) {
                    Ok(t) => t,
                    Err(e) => return Err((job, ApiError::field("messages", e.to_string()))),
                }
            }
        };
        let field = if matches!(job.prompt, Prompt::Chat(_)) { "messages" } else { "prompt" };
        let ids = match lm.tokenizer.encode(&text) {
            Ok(ids) => ids,
            Err(e) => return Err((job, ApiError::field(field, e.to_string()))),
        };
        if ids.is_empty() {
            return Err((job, ApiError::field(field, "the prompt has no tokens")));
        }
        let route = route_for(1, &[(job.delta.as_ref(), 0, 1)]);
        let ctx = ForwardCtx::inference().with_route(&route);
        let ctx_len = lm.model.config.max_position_embeddings.saturating_sub(lm.model.num_virtual_tokens_in(&ctx));
        if ids.len() >= ctx_len {
            return Err((job, ApiError::field(field, format!("the prompt has {} tokens; the model's context holds {ctx_len}", ids.len())).with_code("context_length_exceeded")));
        }
        if ids.len() + job.opts.max_new_tokens > ctx_len {
            let msg = format!("max_tokens {} and the prompt's {} tokens exceed the model's context of {ctx_len}", job.opts.max_new_tokens, ids.len());
            return Err((job, ApiError::field("max_tokens", msg).with_code("context_length_exceeded")));
        }
        let mut cache = KvCache::new(lm.model.num_layers());
        let logits = (|| -> deltatune::Result<Vec<f32>> {
            let x = Tensor::new(ids.as_slice(), lm.model.device())?.unsqueeze(0)?;
            let h = lm.model.forward(&x, None, Some(&mut cache), &ctx)?;
            let l = lm.model.logits(&last_position(&h)?, &ctx)?;
            Ok(l.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        })();
        let logits = match logits {
            Ok(l) => l,
            Err(e) => return Err((job, from_lib(&e, field))),
        };
        self.metrics.batch(1);
        let mut stop_ids = job.opts.stop_ids.clone();
        if !job.opts.ignore_eos {
            stop_ids.extend(lm.tokenizer.eos_ids.iter().copied());
        }
        let mut seq = Seq {
            stream: TextStream::new(&job.opts.stop_strings),
            key: DropoutKey(job.opts.seed).derive("generate"),
            max_new: job.opts.max_new_tokens,
            prompt_tokens: ids.len(),
            job,
            cache,
            next: 0,
            step: 0,
            stop_ids,
            done: false,
        };
        self.metrics.ttft(seq.job.enqueued.elapsed().as_secs_f64());
        let Model::Decoder(lm) = &self.model else { return Ok(None) };
        take_token(lm, &mut seq, &logits, &self.metrics);
        Ok(if seq.done { None } else { Some(seq) })
    }

    /// One decoding step for every running sequence.
    fn decode_step(&mut self) {
        let now = Instant::now();
        self.running.retain(|s| {
            if s.job.events.is_closed() {
                return false;
            }
            if now > s.job.deadline {
                let _ = s.job.events.send(GenEvent::Error(timeout()));
                return false;
            }
            true
        });
        if self.running.is_empty() {
            return;
        }
        let Model::Decoder(lm) = &self.model else { return };
        // Passes: one shared by every row-local delta (and the bare backbone), one per delta
        // that replaces base parameters. Inside a pass, rows of one delta are contiguous.
        self.running.sort_by(|a, b| pass_key(a).cmp(&pass_key(b)));
        let mut start = 0;
        while start < self.running.len() {
            let key = pass_key(&self.running[start]).0;
            let mut end = start;
            while end < self.running.len() && pass_key(&self.running[end]).0 == key {
                end += 1;
            }
            let rows = &mut self.running[start..end];
            let mut spans: Vec<(Option<&Arc<DeltaInfo>>, usize, usize)> = Vec::new();
            for (i, s) in rows.iter().enumerate() {
                let d = s.job.delta.as_ref();
                match spans.last_mut() {
                    Some(last) if last.0.map(|x| &x.name) == d.map(|x| &x.name) => last.2 += 1,
                    _ => spans.push((d, i, 1)),
                }
            }
            let route = route_for(rows.len(), &spans);
            let ctx = ForwardCtx::inference().with_route(&route);
            let ids: Vec<u32> = rows.iter().map(|s| s.next).collect();
            let out = (|| -> deltatune::Result<Vec<Vec<f32>>> {
                let mut caches: Vec<&mut KvCache> = rows.iter_mut().map(|s| &mut s.cache).collect();
                let h = lm.model.decode_rows(&ids, &mut caches, &ctx)?;
                let l = lm.model.logits(&h, &ctx)?;
                Ok(l.to_dtype(DType::F32)?.to_vec2::<f32>()?)
            })();
            self.metrics.batch(rows.len());
            match out {
                Ok(logits) => {
                    for (s, row) in rows.iter_mut().zip(&logits) {
                        take_token(lm, s, row, &self.metrics);
                    }
                }
                Err(e) => {
                    for s in rows.iter_mut() {
                        let _ = s.job.events.send(GenEvent::Error(from_lib(&e, "max_tokens")));
                        s.done = true;
                    }
                }
            }
            start = end;
        }
        self.running.retain(|s| !s.done);
    }

    // -----------------------------------------------------------------------------------------
    // Encoders.

    fn run_encodes(&mut self) {
        if self.encodes.is_empty() {
            return;
        }
        let mut jobs = std::mem::take(&mut self.encodes);
        let now = Instant::now();
        jobs.retain(|j| {
            if j.reply.is_closed() {
                return false;
            }
            if now > j.deadline {
                return false;
            }
            true
        });
        jobs.sort_by(|a, b| enc_key(a).cmp(&enc_key(b)));
        // Group into passes of at most `max_batch` texts; a pass holds one key's jobs.
        let mut passes: Vec<Vec<EncodeJob>> = Vec::new();
        let mut rows_in_last = 0usize;
        for j in jobs {
            let new_pass = match passes.last() {
                None => true,
                Some(p) => enc_key(&p[0]).0 != enc_key(&j).0 || rows_in_last + j.texts.len() > self.max_batch,
            };
            if new_pass {
                rows_in_last = 0;
                passes.push(Vec::new());
            }
            rows_in_last += j.texts.len();
            if let Some(p) = passes.last_mut() {
                p.push(j);
            }
        }
        for pass in passes {
            for j in &pass {
                self.metrics.queue_wait(j.enqueued.elapsed().as_secs_f64());
            }
            match self.encode_pass(&pass) {
                Ok(outs) => {
                    for (j, o) in pass.into_iter().zip(outs) {
                        let _ = j.reply.send(o);
                    }
                }
                Err(e) => {
                    for j in pass {
                        let _ = j.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn encode_pass(&self, pass: &[EncodeJob]) -> Result<Vec<Result<(EncodeOut, usize), ApiError>>, ApiError> {
        let Model::Encoder { model, enc } = &self.model else { return Err(ApiError::bad_request("this server runs a decoder")) };
        // Per job: an input over the limit fails that job alone.
        let mut results: Vec<Option<Result<(EncodeOut, usize), ApiError>>> = Vec::with_capacity(pass.len());
        let mut live: Vec<(usize, &EncodeJob, usize)> = Vec::new();
        for (k, j) in pass.iter().enumerate() {
            let mut tokens = 0usize;
            let mut bad = None;
            for (i, t) in j.texts.iter().enumerate() {
                match enc.encode(t, None) {
                    Ok(e) if e.input_ids.len() > self.max_input_tokens => {
                        bad = Some(ApiError::field("input", format!("input {i} has {} tokens; the limit is {}", e.input_ids.len(), self.max_input_tokens)).with_code("context_length_exceeded"));
                        break;
                    }
                    Ok(e) => tokens += e.input_ids.len(),
                    Err(e) => {
                        bad = Some(ApiError::field("input", e.to_string()));
                        break;
                    }
                }
            }
            if j.kind == EncodeKind::Classify && j.delta.as_ref().is_none_or(|d| !self.heads.contains_key(&d.name)) {
                bad = Some(ApiError::field("model", "classification needs a delta saved with a task head (train one with `deltatune train`)"));
            }
            match bad {
                Some(e) => results.push(Some(Err(e))),
                None => {
                    results.push(None);
                    live.push((k, j, tokens));
                }
            }
        }
        if !live.is_empty() {
            let texts: Vec<(&str, Option<&str>)> = live.iter().flat_map(|(_, j, _)| j.texts.iter().map(|t| (t.as_str(), None))).collect();
            let mut spans: Vec<(Option<&Arc<DeltaInfo>>, usize, usize)> = Vec::new();
            let mut row = 0;
            for (_, j, _) in &live {
                let d = j.delta.as_ref();
                match spans.last_mut() {
                    Some(last) if last.0.map(|x| &x.name) == d.map(|x| &x.name) => last.2 += j.texts.len(),
                    _ => spans.push((d, row, j.texts.len())),
                }
                row += j.texts.len();
            }
            let route = route_for(texts.len(), &spans);
            let ctx = ForwardCtx::inference().with_route(&route);
            let lib = |e: deltatune::Error| from_lib(&e, "input");
            let batch = enc.batch(&texts, Padding::Longest, &Device::Cpu).map_err(lib)?;
            let out = model.forward(&batch, &ctx).map_err(lib)?;
            self.metrics.batch(texts.len());
            let mut row = 0;
            for (k, j, tokens) in live {
                let n = j.texts.len();
                let sub = ModelOutput {
                    last_hidden_state: out.last_hidden_state.narrow(0, row, n).map_err(|e| lib(e.into()))?,
                    attention_mask: out.attention_mask.narrow(0, row, n).map_err(|e| lib(e.into()))?,
                    num_virtual: out.num_virtual,
                    hidden_states: Vec::new(),
                };
                row += n;
                let r = match j.kind {
                    EncodeKind::Embed => {
                        let e = sub.pool(Pooling::Mean).and_then(|p| l2_normalize(&p)).and_then(|p| Ok(p.to_vec2::<f32>()?)).map_err(lib)?;
                        EncodeOut::Embeddings(e)
                    }
                    EncodeKind::Classify => {
                        let name = j.delta.as_ref().map(|d| d.name.clone()).unwrap_or_default();
                        let head = self.heads.get(&name).ok_or_else(|| ApiError::field("model", "no head"))?;
                        let logits = head.forward(&sub).map_err(lib)?;
                        let probs = candle_core::Tensor::to_vec2::<f32>(&deltatune::ops::softmax_composed(&logits).map_err(lib)?).map_err(|e| lib(e.into()))?;
                        let labels = j.delta.as_ref().and_then(|d| d.labels.clone()).unwrap_or_default();
                        EncodeOut::Classes(
                            probs
                                .into_iter()
                                .map(|p| {
                                    let id = p.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
                                    ClassRow { label: labels.get(id).cloned().unwrap_or_else(|| format!("LABEL_{id}")), label_id: id, probabilities: p }
                                })
                                .collect(),
                        )
                    }
                };
                results[k] = Some(Ok((r, tokens)));
            }
        }
        Ok(results.into_iter().map(|r| r.unwrap_or_else(|| Err(ApiError::internal("no result")))).collect())
    }
}

fn timeout() -> ApiError {
    ApiError::new(504, "timeout_error", "the request ran past the server's time limit").with_code("timeout")
}

/// A load failure as the client sees it: the message with the folder's absolute path replaced by
/// the name the client gave.
fn refuse(e: &deltatune::Error, path: &std::path::Path, source: &str) -> ApiError {
    let msg = e.to_string().replace(&path.display().to_string(), source);
    let msg = match dirs_home() {
        Some(h) => msg.replace(&h, "~"),
        None => msg,
    };
    ApiError::field("path", format!("delta `{source}` cannot be loaded: {msg}")).with_code("invalid_delta")
}

fn dirs_home() -> Option<String> {
    std::env::var("HOME").ok().filter(|h| h.len() > 1)
}

/// Where a sequence decodes: 0 = the shared pass; 1 = a pass of its own delta. Then the delta name
/// so that its rows are contiguous.
fn pass_key(s: &Seq) -> (u8, String) {
    match &s.job.delta {
        None => (0, String::new()),
        Some(d) if d.batching == Batching::Alone => (1, d.name.clone()),
        Some(d) => (0, d.name.clone()),
    }
}

/// Encoder passes: row-local deltas share; prompt/prefix and parameter-replacing deltas alone.
fn enc_key(j: &EncodeJob) -> (String, String) {
    match &j.delta {
        None => (String::new(), String::new()),
        Some(d) if d.batching == Batching::Mixed => (String::new(), d.name.clone()),
        Some(d) => (d.name.clone(), d.name.clone()),
    }
}

/// The route of a pass: each span's delta groups on its rows.
fn route_for(batch: usize, spans: &[(Option<&Arc<DeltaInfo>>, usize, usize)]) -> RowRoute {
    let mut r = RowRoute::new(batch);
    for (d, start, len) in spans {
        if let Some(d) = d {
            for g in &d.groups {
                r = r.with(g.clone(), *start, *len);
            }
        }
    }
    r
}

/// Samples the next token of `s` from `logits`, streams its text, and marks the sequence done
/// when it stops.
fn take_token(lm: &CausalLm, s: &mut Seq, logits: &[f32], metrics: &Metrics) {
    let send_done = |s: &Seq, reason: &'static str| {
        let _ = s.job.events.send(GenEvent::Done { finish_reason: reason, prompt_tokens: s.prompt_tokens, completion_tokens: s.stream.tokens.len() });
    };
    let next = match sample(logits, &s.job.opts, s.key.uniform(s.step as u64) as f64) {
        Ok(t) => t,
        Err(e) => {
            let _ = s.job.events.send(GenEvent::Error(ApiError::internal(e.to_string())));
            s.done = true;
            return;
        }
    };
    s.step += 1;
    if s.stop_ids.contains(&next) {
        flush(lm, s, false);
        send_done(s, "stop");
        s.done = true;
        return;
    }
    metrics.tokens(1);
    match s.stream.push(&lm.tokenizer, next) {
        Ok((piece, stopped)) => {
            if !piece.is_empty() {
                let _ = s.job.events.send(GenEvent::Text(piece));
            }
            if stopped {
                send_done(s, "stop");
                s.done = true;
                return;
            }
        }
        Err(e) => {
            let _ = s.job.events.send(GenEvent::Error(ApiError::internal(e.to_string())));
            s.done = true;
            return;
        }
    }
    if s.stream.tokens.len() >= s.max_new {
        flush(lm, s, false);
        send_done(s, "length");
        s.done = true;
        return;
    }
    s.next = next;
}

/// Sends the text still held back at the end of a sequence.
fn flush(lm: &CausalLm, s: &mut Seq, stopped: bool) {
    if let Ok((_, rest)) = s.stream.finish(&lm.tokenizer, stopped) {
        if !rest.is_empty() {
            let _ = s.job.events.send(GenEvent::Text(rest));
        }
    }
}
