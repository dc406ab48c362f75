//! What `deltatune serve` is told: the backbone, the deltas, where to listen, and the limits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The server's settings (the CLI maps its flags onto this).
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Backbone: an encoder directory, or a decoder (GGUF file or HF directory). `None` with
    /// `decoder` = the default decoder, without = the default encoder.
    pub model: Option<PathBuf>,
    /// Serve the default decoder when `model` is `None`.
    pub decoder: bool,
    /// Deltas loaded at start, as (name, directory).
    pub deltas: Vec<(String, PathBuf)>,
    /// Every subfolder is loaded at start (named after the folder); admin loads are confined to it.
    pub delta_dir: Option<PathBuf>,
    /// Where to listen (127.0.0.1 unless told otherwise; port 0 picks a free one).
    pub addr: SocketAddr,
    /// Bearer token required on every route but `/health` and the page at `/`.
    pub api_key: Option<String>,
    /// Enables `POST /admin/deltas` and `DELETE /admin/deltas/{name}`.
    pub allow_admin: bool,
    /// Requests waiting for the engine; when full, new ones get 429 with Retry-After.
    pub queue_size: usize,
    /// Rows in one batched pass (sequences decoding together, texts encoded together).
    pub max_batch: usize,
    /// HTTP requests handled at once (streams count until their headers are sent); beyond,
    /// 429 at once (tower's concurrency limit behind its load shedder).
    pub max_concurrent: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// Most texts in one embeddings/classify request.
    pub max_inputs: usize,
    /// Longest encoder input in tokens (longer inputs are a 400 naming `input`).
    pub max_input_tokens: usize,
    /// Per-request time limit.
    pub timeout: Duration,
    /// Dequantize frozen decoder weights for every matmul (slower, bit-for-bit with f32 references).
    pub exact: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            model: None,
            decoder: false,
            deltas: Vec::new(),
            delta_dir: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            allow_admin: false,
            queue_size: 64,
            max_batch: 16,
            max_concurrent: 512,
            max_body_bytes: 1 << 20,
            max_tokens: 512,
            max_inputs: 64,
            max_input_tokens: 256,
            timeout: Duration::from_secs(120),
            exact: false,
        }
    }
}
