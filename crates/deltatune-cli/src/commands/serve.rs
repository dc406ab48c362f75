//! `deltatune serve`: flags onto [`deltatune_serve::ServeConfig`], then serve until SIGTERM or
//! Ctrl-C (which drain: running requests finish, new ones are refused).

use crate::args::ServeArgs;
use anyhow::{bail, Result};
use deltatune_serve::ServeConfig;

pub fn run(a: ServeArgs) -> Result<()> {
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        bail!("invalid --timeout: {} (expected a positive number of seconds)", a.timeout);
    }
    if a.max_tokens == 0 || a.max_input_tokens == 0 || a.max_body_bytes == 0 {
        bail!("invalid limits: --max-tokens, --max-input-tokens and --max-body-bytes must be at least 1");
    }
    if a.allow_admin && a.delta_dir.is_none() {
        bail!("--allow-admin needs --delta-dir (admin loads are confined to it)");
    }
    if let Some(d) = &a.delta_dir {
        if !d.is_dir() {
            bail!("--delta-dir {}: no such folder", d.display());
        }
    }
    deltatune_serve::init_logging();
    let cfg = ServeConfig {
        model: a.model,
        decoder: a.decoder,
        deltas: a.delta,
        delta_dir: a.delta_dir,
        addr: std::net::SocketAddr::new(a.host, a.port),
        api_key: a.api_key.filter(|k| !k.is_empty()),
        allow_admin: a.allow_admin,
        queue_size: a.queue_size as usize,
        max_batch: a.max_batch as usize,
        max_concurrent: a.max_concurrent as usize,
        max_body_bytes: a.max_body_bytes,
        max_tokens: a.max_tokens,
        max_inputs: 64,
        max_input_tokens: a.max_input_tokens,
        timeout: std::time::Duration::from_secs_f64(a.timeout),
        exact: a.exact,
    };
    let server = deltatune_serve::spawn(cfg, true)?;
    // Scripts and tests read this line for the address (port 0 picks one).
    println!("listening on http://{}", server.addr);
    server.join()?;
    eprintln!("stopped");
    Ok(())
}
