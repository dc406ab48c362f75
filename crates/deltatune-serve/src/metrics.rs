//! Figures for `GET /metrics` in Prometheus' text format: requests and errors by route and delta,
//! latency, time to first token and queue-wait histograms, generated tokens, queue depth, batch
//! sizes.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Instant;

const SECONDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const ROWS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.len() != bounds.len() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, b) in self.counts.iter_mut().zip(bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in bounds.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}", self.counts.get(i).copied().unwrap_or(0));
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Debug, Default)]
struct State {
    /// (route, model, status) → count.
    requests: BTreeMap<(String, String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    ttft: Histogram,
    queue_wait: Histogram,
    batch: Histogram,
    tokens: u64,
    cancelled: u64,
    rejected: u64,
    queue: usize,
    deltas: usize,
}

/// The server's counters.
#[derive(Debug)]
pub struct Metrics {
    state: Mutex<State>,
    started: Instant,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics { state: Mutex::new(State::default()), started: Instant::now() }
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A finished request.
    pub fn request(&self, route: &str, model: &str, status: u16, seconds: f64) {
        let mut s = self.lock();
        *s.requests.entry((route.to_string(), model.to_string(), status)).or_default() += 1;
        s.latency.entry(route.to_string()).or_default().observe(SECONDS, seconds);
        if status == 429 {
            s.rejected += 1;
        }
    }

    pub fn ttft(&self, seconds: f64) {
        self.lock().ttft.observe(SECONDS, seconds);
    }

    pub fn queue_wait(&self, seconds: f64) {
        self.lock().queue_wait.observe(SECONDS, seconds);
    }

    pub fn batch(&self, rows: usize) {
        self.lock().batch.observe(ROWS, rows as f64);
    }

    pub fn tokens(&self, n: u64) {
        self.lock().tokens += n;
    }

    pub fn cancelled(&self) {
        self.lock().cancelled += 1;
    }

    pub fn set_queue(&self, n: usize) {
        self.lock().queue = n;
    }

    pub fn set_deltas(&self, n: usize) {
        self.lock().deltas = n;
    }

    /// Total generated tokens.
    pub fn generated(&self) -> u64 {
        self.lock().tokens
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let s = self.lock();
        let mut o = String::new();
        let up = self.started.elapsed().as_secs_f64();
        let _ = writeln!(o, "# HELP deltatune_requests_total Requests answered, by route, model and status.\n# TYPE deltatune_requests_total counter");
        for ((route, model, status), n) in &s.requests {
            let _ = writeln!(o, "deltatune_requests_total{{route=\"{route}\",model=\"{model}\",status=\"{status}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP deltatune_errors_total Requests answered with a 4xx or 5xx, by route and model.\n# TYPE deltatune_errors_total counter");
        let mut errors: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for ((route, model, status), n) in &s.requests {
            if *status >= 400 {
                *errors.entry((route, model)).or_default() += n;
            }
        }
        for ((route, model), n) in errors {
            let _ = writeln!(o, "deltatune_errors_total{{route=\"{route}\",model=\"{model}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP deltatune_request_seconds Request latency by route.\n# TYPE deltatune_request_seconds histogram");
        for (route, h) in &s.latency {
            h.write(&mut o, "deltatune_request_seconds", &format!("route=\"{route}\""), SECONDS);
        }
        let _ = writeln!(o, "# HELP deltatune_time_to_first_token_seconds From arrival to the first generated token.\n# TYPE deltatune_time_to_first_token_seconds histogram");
        s.ttft.write(&mut o, "deltatune_time_to_first_token_seconds", "", SECONDS);
        let _ = writeln!(o, "# HELP deltatune_queue_wait_seconds Time requests wait in the queue.\n# TYPE deltatune_queue_wait_seconds histogram");
        s.queue_wait.write(&mut o, "deltatune_queue_wait_seconds", "", SECONDS);
        let _ = writeln!(o, "# HELP deltatune_batch_rows Rows in each batched pass through the backbone.\n# TYPE deltatune_batch_rows histogram");
        s.batch.write(&mut o, "deltatune_batch_rows", "", ROWS);
        let _ = writeln!(o, "# HELP deltatune_generated_tokens_total Tokens generated.\n# TYPE deltatune_generated_tokens_total counter\ndeltatune_generated_tokens_total {}", s.tokens);
        let tps = if up > 0.0 { s.tokens as f64 / up } else { 0.0 };
        let _ = writeln!(o, "# HELP deltatune_tokens_per_second Generated tokens per second since start.\n# TYPE deltatune_tokens_per_second gauge\ndeltatune_tokens_per_second {tps}");
        let _ = writeln!(o, "# HELP deltatune_cancelled_total Generations dropped because the client went away.\n# TYPE deltatune_cancelled_total counter\ndeltatune_cancelled_total {}", s.cancelled);
        let _ = writeln!(o, "# HELP deltatune_rejected_total Requests refused with 429 (queue full).\n# TYPE deltatune_rejected_total counter\ndeltatune_rejected_total {}", s.rejected);
        let _ = writeln!(o, "# HELP deltatune_queue_depth Requests waiting for the engine.\n# TYPE deltatune_queue_depth gauge\ndeltatune_queue_depth {}", s.queue);
        let _ = writeln!(o, "# HELP deltatune_deltas_loaded Deltas loaded.\n# TYPE deltatune_deltas_loaded gauge\ndeltatune_deltas_loaded {}", s.deltas);
        let _ = writeln!(o, "# HELP deltatune_uptime_seconds Seconds since start.\n# TYPE deltatune_uptime_seconds gauge\ndeltatune_uptime_seconds {up}");
        o
    }
}
