//! Job events → a Python callable (as JSON text), and Ctrl-C → the job's cancellation flag.
//!
//! A job runs with the GIL released on the calling (main) thread. Python's SIGINT handler only
//! marks the signal; at every event the sink takes the GIL and runs pending signal handlers
//! (`check_signals`). A KeyboardInterrupt there — or an exception from the callback — sets the
//! job's [`Cancel`] flag: training then writes its checkpoint, stops at the next step and returns
//! `Cancelled`, and the caller re-raises the Python exception.

use deltatune::api::{Cancel, Event, Progress};
use pyo3::prelude::*;
use std::sync::Mutex;

pub struct PySink {
    callback: Option<Py<PyAny>>,
    pub cancel: Cancel,
    raised: Mutex<Option<PyErr>>,
}

impl PySink {
    pub fn new(callback: Option<Py<PyAny>>) -> Self {
        PySink { callback, cancel: Cancel::new(), raised: Mutex::new(None) }
    }

    fn keep(&self, e: PyErr) {
        if let Ok(mut slot) = self.raised.lock() {
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        self.cancel.cancel();
    }

    /// The Python exception that stopped the job (KeyboardInterrupt, a callback's error).
    pub fn take_raised(&self) -> Option<PyErr> {
        self.raised.lock().ok().and_then(|mut s| s.take())
    }
}

impl Progress for PySink {
    fn event(&self, event: &Event) {
        Python::attach(|py| {
            if let Err(e) = py.check_signals() {
                self.keep(e);
                return;
            }
            if let Some(cb) = &self.callback {
                let text = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
                if let Err(e) = cb.call1(py, (text,)) {
                    self.keep(e);
                }
            }
        });
    }
}
