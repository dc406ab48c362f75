//! How a caller watches and stops a job: progress [`Event`]s delivered to a [`Progress`] sink, and a
//! [`Cancel`] flag checked between steps. The library never prints; the CLI renders events as
//! a progress bar, the server as metrics, Python as a tqdm bar or a callback.

use crate::dist::Collective;
use crate::error::{Error, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Something a job reports while it runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A line of information: what is being loaded, a note about the data.
    Message { text: String },
    /// Something the user should know that does not stop the job.
    Warning { text: String },
    /// Long work begins: `total` steps, of which `done` are already done (a resumed run).
    Start { what: String, total: usize, done: usize },
    /// One optimizer step finished.
    Step { step: usize, total: usize, loss: f64, lr: f64, examples_per_s: f64, eta_s: f64 },
    /// An evaluation finished; `best` when it is the best so far.
    Eval { step: usize, metric: String, score: f64, loss: f64, best: bool },
    /// Long work ended (also after an error or a cancellation).
    Finish,
}

/// Receives a job's events. Called on the job's thread; keep it cheap.
pub trait Progress: Send + Sync {
    fn event(&self, event: &Event);
}

/// Discards every event.
pub struct Silent;

impl Progress for Silent {
    fn event(&self, _event: &Event) {}
}

impl<F: Fn(&Event) + Send + Sync> Progress for F {
    fn event(&self, event: &Event) {
        self(event)
    }
}

/// A flag another thread (a signal handler, a server, Python) sets to stop a job at its next
/// check. Cloning shares the flag.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What every job receives besides its spec: where events go, whether to stop, and — for
/// training started on several processes — the ranks it trains with.
#[derive(Clone, Copy)]
pub struct Control<'a> {
    pub progress: &'a dyn Progress,
    pub cancel: Option<&'a Cancel>,
    /// Data-parallel training: the other processes (see [`crate::dist`]); `None` runs alone.
    pub world: Option<&'a dyn Collective>,
}

impl<'a> Control<'a> {
    /// No events, never cancelled.
    pub fn silent() -> Control<'static> {
        Control { progress: &Silent, cancel: None, world: None }
    }

    pub fn new(progress: &'a dyn Progress, cancel: Option<&'a Cancel>) -> Self {
        Control { progress, cancel, world: None }
    }

    /// The same control, training data-parallel with `world`.
    pub fn with_world(self, world: &'a dyn Collective) -> Self {
        Control { world: Some(world), ..self }
    }

    /// This process's rank and the number of ranks ((0, 1) alone).
    pub fn rank_size(&self) -> (usize, usize) {
        crate::dist::rank_size(self.world)
    }

    /// Whether this process writes the job's files (rank 0, or alone).
    pub fn writes(&self) -> bool {
        self.rank_size().0 == 0
    }

    pub fn emit(&self, event: Event) {
        self.progress.event(&event);
    }

    pub fn message(&self, text: impl Into<String>) {
        self.emit(Event::Message { text: text.into() });
    }

    pub fn warn(&self, text: impl Into<String>) {
        self.emit(Event::Warning { text: text.into() });
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.is_some_and(Cancel::is_cancelled)
    }

    /// `Err(Cancelled)` once the flag is set; `what` says where the job stopped.
    pub fn check(&self, what: impl FnOnce() -> String) -> Result<()> {
        if self.cancelled() {
            return Err(Error::Cancelled(what()));
        }
        Ok(())
    }

    /// A `FnMut(&str)` that forwards lines as messages (for asset fetching and data loading).
    pub fn messages(&self) -> impl FnMut(&str) + '_ {
        move |m: &str| self.message(m)
    }
}
