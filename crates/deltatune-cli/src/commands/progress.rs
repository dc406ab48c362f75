//! Rendering a job's events on stderr: an indicatif bar on a terminal, a line every few steps
//! otherwise; messages and evaluations as lines that the bar does not overwrite.

use deltatune::api::{Event, Progress};
use std::io::IsTerminal;
use std::sync::Mutex;

/// What to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verbosity {
    /// Messages, evaluations and a progress bar (or periodic step lines).
    Normal,
    /// Warnings only.
    Quiet,
}

pub struct Reporter {
    verbosity: Verbosity,
    tty: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    bar: Option<indicatif::ProgressBar>,
    every: usize,
}

impl Reporter {
    pub fn new(verbosity: Verbosity) -> Self {
        Reporter { verbosity, tty: std::io::stderr().is_terminal(), state: Mutex::new(State::default()) }
    }

    pub fn quiet_if(quiet: bool) -> Self {
        Self::new(if quiet { Verbosity::Quiet } else { Verbosity::Normal })
    }

    fn line(&self, st: &State, text: &str) {
        match &st.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }
}

impl Progress for Reporter {
    fn event(&self, e: &Event) {
        let Ok(mut st) = self.state.lock() else { return };
        let normal = self.verbosity == Verbosity::Normal;
        match e {
            Event::Warning { text } => self.line(&st, &format!("warning: {text}")),
            Event::Message { text } if normal => self.line(&st, text),
            Event::Start { total, done, .. } if normal => {
                st.every = (total / 20).clamp(1, 50);
                if self.tty {
                    let b = indicatif::ProgressBar::new(*total as u64);
                    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta}") {
                        b.set_style(style);
                    }
                    b.set_position(*done as u64);
                    st.bar = Some(b);
                }
            }
            Event::Step { step, total, loss, lr, examples_per_s, eta_s } if normal => {
                let msg = format!("loss {loss:.4}  lr {lr:.2e}  {examples_per_s:.1} ex/s");
                match &st.bar {
                    Some(b) => {
                        b.set_position(*step as u64);
                        b.set_message(msg);
                    }
                    None if step.is_multiple_of(st.every.max(1)) || step == total => {
                        eprintln!("step {step}/{total}  {msg}  ETA {:.0}s", eta_s.max(0.0));
                    }
                    None => {}
                }
            }
            Event::Eval { step, metric, score, loss, best } if normal => {
                let loss = if loss.is_finite() { format!(" (dev loss {loss:.4})") } else { String::new() };
                self.line(&st, &format!("eval step {step}: {metric} {score:.4}{loss}{}", if *best { "  * best" } else { "" }));
            }
            Event::Finish => {
                if let Some(b) = st.bar.take() {
                    b.finish_and_clear();
                }
            }
            _ => {}
        }
    }
}
