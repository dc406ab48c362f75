//! Op-level time profile of the fused kernels: wall time per (op, forward/backward), switched on
//! with [`set_enabled`] (the `bench train --profile` flag). Off, a timer costs one atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<(&'static str, &'static str), (f64, u64)>> = Mutex::new(BTreeMap::new());

pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Records the time until it is dropped under (op, phase).
pub struct Timer {
    key: (&'static str, &'static str),
    t0: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        let secs = self.t0.elapsed().as_secs_f64();
        if let Ok(mut t) = TABLE.lock() {
            let e = t.entry(self.key).or_insert((0.0, 0));
            e.0 += secs;
            e.1 += 1;
        }
    }
}

/// A timer for `op` in `phase` ("fwd" or "bwd"), or `None` when profiling is off.
#[inline]
pub fn timer(op: &'static str, phase: &'static str) -> Option<Timer> {
    ENABLED.load(Ordering::Relaxed).then(|| Timer { key: (op, phase), t0: Instant::now() })
}

/// One row of the profile: op, phase, total seconds, calls.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    pub op: String,
    pub phase: String,
    pub seconds: f64,
    pub calls: u64,
}

/// The profile so far, emptied.
pub fn take() -> Vec<Entry> {
    let mut t = match TABLE.lock() {
        Ok(t) => t,
        Err(p) => p.into_inner(),
    };
    std::mem::take(&mut *t)
        .into_iter()
        .map(|((op, phase), (seconds, calls))| Entry { op: op.into(), phase: phase.into(), seconds, calls })
        .collect()
}
