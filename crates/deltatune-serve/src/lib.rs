//! `deltatune serve`: one frozen backbone, many deltas, one HTTP server.
//!
//! The process loads the backbone once (an encoder or a decoder) and any number of saved deltas
//! (deltatune's format or PEFT adapter folders) onto it, each under its own name. Requests name a
//! delta as their `model`; rows of different deltas share batched passes through the frozen
//! backbone (see [`engine`]). The API follows OpenAI's shapes ([`openai`], [`http`]).
//!
//! ```no_run
//! let cfg = deltatune_serve::ServeConfig { decoder: true, ..Default::default() };
//! let server = deltatune_serve::spawn(cfg, false)?;
//! println!("listening on http://{}", server.addr);
//! server.join()?;
//! # Ok::<(), deltatune_serve::ServeError>(())
//! ```

pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod registry;

pub use config::ServeConfig;
pub use error::ApiError;

use deltatune::api::common::{decoder_path, encoder_dir};
use deltatune::backbone::llama::is_decoder_path;
use deltatune::control::Control;
use deltatune::data::tokenize::TextEncoder;
use deltatune::lm::CausalLm;
use deltatune::BertModel;
use engine::{Engine, Model};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Lib(#[from] deltatune::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// A running server.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
}

impl Server {
    /// Starts draining: new requests are refused, running ones finish, then the server stops.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Waits until the server has stopped (after [`Server::stop`], SIGTERM or Ctrl-C).
    pub fn join(mut self) -> Result<(), ServeError> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| ServeError::Config("the server thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Loads the backbone and the deltas, binds the address and starts serving on a thread of its
/// own. With `signals`, SIGTERM and Ctrl-C start draining too.
pub fn spawn(cfg: ServeConfig, signals: bool) -> Result<Server, ServeError> {
    let ctl = Control::silent();
    let want_decoder = match &cfg.model {
        Some(p) => is_decoder_path(p),
        None => cfg.decoder,
    };
    let (model, base_name) = if want_decoder {
        let path = decoder_path(cfg.model.as_deref(), &ctl)?;
        let mut lm = CausalLm::load(&path, &deltatune::Device::Cpu)?;
        lm.model.set_exact(cfg.exact);
        (Model::Decoder(lm), display_name(&path))
    } else {
        let dir = encoder_dir(cfg.model.as_deref(), &ctl)?;
        let model = BertModel::load(&dir, &deltatune::Device::Cpu)?;
        let enc = TextEncoder::from_file(&model.files.tokenizer, 100_000)?;
        (Model::Encoder { model, enc }, display_name(&dir))
    };
    let kind = if want_decoder { "decoder" } else { "encoder" };
    let base_params = model.backbone().num_params();
    let registry = Arc::new(registry::Registry::default());
    let metrics = Arc::new(metrics::Metrics::default());
    let mut engine = Engine::new(model, registry.clone(), metrics.clone(), cfg.max_batch, cfg.max_input_tokens);
    // Deltas named on the command line, then every folder of --delta-dir.
    let mut initial: Vec<(String, std::path::PathBuf, String)> = cfg.deltas.iter().map(|(n, p)| (n.clone(), p.clone(), n.clone())).collect();
    if let Some(dir) = &cfg.delta_dir {
        let mut subs: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| ServeError::Config(format!("--delta-dir {}: {e}", dir.display())))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        subs.sort();
        for p in subs {
            let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            if name.starts_with('.') {
                continue;
            }
            initial.push((name.clone(), p, name));
        }
    }
    for (name, path, source) in initial {
        registry::check_name(&name).map_err(|e| ServeError::Config(format!("delta `{name}`: {}", e.message)))?;
        engine.load(&name, &path, &source).map_err(|e| ServeError::Config(format!("--delta {name}={}: {}", path.display(), e.message)))?;
    }
    let listener = std::net::TcpListener::bind(cfg.addr)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (jobs_tx, jobs_rx) = tokio::sync::mpsc::channel(cfg.queue_size.max(1));
    let app = Arc::new(http::App::new(cfg, jobs_tx, registry, metrics, kind, base_name, base_params));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    // The engine runs on a thread of its own kernel pool (as many threads as the global one):
    // kernels called from it take part in their own work instead of handing it over and sleeping
    // (see `deltatune::ops::in_pool`), and servers in one process never wait on each other.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("deltatune-kernels-{i}"))
        .build()
        .map_err(|e| ServeError::Config(format!("the engine's thread pool: {e}")))?;
    let engine_thread = std::thread::Builder::new().name("deltatune-engine".into()).spawn(move || pool.install(move || engine.run(jobs_rx)))?;
    let thread = std::thread::Builder::new().name("deltatune-http".into()).spawn(move || -> Result<(), ServeError> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let result = rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let app2 = app.clone();
            let shutdown = async move {
                wait_for_stop(stop_rx, signals).await;
                app2.draining.store(true, Ordering::SeqCst);
                tracing::info!("draining: finishing running requests, refusing new ones");
            };
            axum::serve(listener, http::router(app)).with_graceful_shutdown(shutdown).await
        });
        // The router (and with it the job sender) is gone: the engine finishes and stops.
        let joined = engine_thread.join();
        result?;
        joined.map_err(|_| ServeError::Config("the engine thread panicked".into()))
    })?;
    Ok(Server { addr, stop: Some(stop_tx), thread: Some(thread) })
}

/// Logs to stderr (`RUST_LOG` filters; `info` by default). Safe to call more than once.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

async fn wait_for_stop(stop: oneshot::Receiver<()>, signals: bool) {
    if !signals {
        let _ = stop.await;
        return;
    }
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = stop.await;
                return;
            }
        };
        tokio::select! {
            _ = stop => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        tokio::select! {
            _ = stop => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
}

/// The base model's name for clients: the file or folder name, never the full path.
fn display_name(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "base".into());
    name.trim_end_matches(".gguf").to_string()
}
