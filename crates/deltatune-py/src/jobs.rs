//! Jobs and helpers that need no loaded `Model`: method defaults and spec parsing for the config
//! classes, evaluation of a trained directory, structure search, generation (whole or streamed).

use crate::errors::{run, to_py, Failure, Outcome};
use crate::model::merged_json;
use crate::progress::PySink;
use deltatune::api::{self, Control, EvalSpec, GenerateSpec, Prompt, SearchSpec, Split};
use deltatune::core::Pooling;
use deltatune::data::{DataSource, TaskOptions};
use deltatune::delta::registry::{DeltaConfig, METHODS};
use deltatune::delta::DeltaSpec;
use deltatune::error::Error;
use deltatune::lm::generate::{GenerateOptions, Generation};
use deltatune::search::run::{Budget, SearchConfig};
use deltatune::search::space::Space;
use deltatune::train::config::TrainConfig;
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

fn to_json<T: serde::Serialize>(v: &T) -> Outcome<String> {
    serde_json::to_string(v).map_err(|e| Failure::Lib(Error::Delta(format!("serializing a result: {e}"))))
}

/// The default config of a method (by name or alias) as JSON, `"method"` included.
#[pyfunction]
pub fn method_defaults(py: Python<'_>, method: String) -> PyResult<String> {
    run(py, || to_json(&DeltaConfig::default_for(&method)?))
}

/// Every method: `[name, family, aliases, peft_type]` as JSON.
#[pyfunction]
pub fn methods(py: Python<'_>) -> PyResult<String> {
    run(py, || {
        let v: Vec<Value> = METHODS
            .iter()
            .map(|m| serde_json::json!({"name": m.name, "family": format!("{:?}", m.family), "aliases": m.aliases, "peft_type": m.peft_type}))
            .collect();
        to_json(&v)
    })
}

/// A CLI spec string (`lora:r=8,target=query+value`) as the flat JSON config.
#[pyfunction]
pub fn parse_spec(py: Python<'_>, spec: String) -> PyResult<String> {
    run(py, || to_json(&DeltaSpec::parse_cli(&spec)?.to_json()))
}

/// Checks a flat JSON config (as a config class writes it) and returns it completed with the
/// method's defaults. Unknown keys are errors.
#[pyfunction]
pub fn spec_from_json(py: Python<'_>, config: String) -> PyResult<String> {
    run(py, || {
        let v: Value = serde_json::from_str(&config).map_err(|e| Failure::Lib(Error::arg("config", e.to_string())))?;
        let (spec, warnings) = DeltaSpec::from_json(&v, "config")?;
        if let Some(w) = warnings.first() {
            return Err(Failure::Lib(Error::arg("config", w.clone())));
        }
        to_json(&spec.to_json())
    })
}

/// The training defaults as JSON (every key `train(**options)` accepts).
#[pyfunction]
pub fn train_defaults(py: Python<'_>) -> PyResult<String> {
    run(py, || to_json(&serde_json::json!({"train": TrainConfig::default(), "data": TaskOptions::default(), "search": SearchConfig::default()})))
}

/// Scores a trained directory on a split of its own data (`data=None`) or of other data.
#[pyfunction]
#[pyo3(signature = (model, delta, data, options, split, batch_size, on_event=None))]
#[allow(clippy::too_many_arguments)]
pub fn evaluate(py: Python<'_>, model: PathBuf, delta: PathBuf, data: Option<String>, options: String, split: String, batch_size: usize, on_event: Option<Py<PyAny>>) -> PyResult<String> {
    let sink = PySink::new(on_event);
    let r = run(py, || {
        let data = match data {
            Some(d) => {
                let src: DataSource = serde_json::from_str(&d).map_err(|e| Failure::Lib(Error::arg("data", e.to_string())))?;
                Some((src, merged_json(&TaskOptions::default(), &options, "data options")?))
            }
            None => None,
        };
        let spec = EvalSpec { model: Some(model), delta, data, split: split.parse::<Split>()?, batch_size };
        let ctl = Control::new(&sink, Some(&sink.cancel));
        to_json(&api::evaluate(&spec, &ctl)?)
    });
    match sink.take_raised() {
        Some(e) => Err(e),
        None => r,
    }
}

/// S3Delta structure search; returns the outcome with the chosen structure (`structure`: flat
/// JSON configs) as JSON.
#[pyfunction]
#[pyo3(signature = (model, data, options, budget, space, config, max_length, pooling, out, overwrite, on_event=None))]
#[allow(clippy::too_many_arguments)]
pub fn search(
    py: Python<'_>,
    model: PathBuf,
    data: String,
    options: String,
    budget: String,
    space: String,
    config: String,
    max_length: usize,
    pooling: String,
    out: PathBuf,
    overwrite: bool,
    on_event: Option<Py<PyAny>>,
) -> PyResult<String> {
    let sink = PySink::new(on_event);
    let r = run(py, || {
        let ctl = Control::new(&sink, Some(&sink.cancel));
        let (space, warnings) = Space::parse(&space)?;
        for w in warnings {
            ctl.warn(w);
        }
        let spec = SearchSpec {
            model: Some(model),
            data: serde_json::from_str(&data).map_err(|e| Failure::Lib(Error::arg("data", e.to_string())))?,
            data_options: merged_json(&TaskOptions::default(), &options, "data options")?,
            max_length,
            budget: Budget::parse(&budget)?,
            space,
            pooling: pooling.parse::<Pooling>()?,
            config: merged_json(&SearchConfig::default(), &config, "search option")?,
            out,
            overwrite,
            candidates_only: false,
        };
        let outcome = api::search(&spec, &ctl)?;
        let mut v = serde_json::to_value(&outcome).unwrap_or_default();
        v["structure"] = Value::Array(outcome.structure.iter().map(DeltaSpec::to_json).collect());
        v["out"] = serde_json::to_value(&outcome.out).unwrap_or_default();
        to_json(&v)
    });
    match sink.take_raised() {
        Some(e) => Err(e),
        None => r,
    }
}

fn generate_spec(model: Option<PathBuf>, delta: Option<PathBuf>, prompt: String, chat: bool, system: Option<String>, options: &str) -> Outcome<GenerateSpec> {
    let options = generate_options(options)?;
    let prompt = if chat { Prompt::Chat { system, user: prompt } } else { Prompt::Text(prompt) };
    Ok(GenerateSpec { model, delta, prompt, options, exact: false })
}

/// Generation options from a JSON object of the keys `max_new_tokens`, `temperature`, `top_p`,
/// `top_k`, `seed`, `stop` (strings); an unknown key is an error.
fn generate_options(json: &str) -> Outcome<GenerateOptions> {
    let bad = |k: &str, e: String| Failure::Lib(Error::arg(k, e));
    let v: Value = serde_json::from_str(json).map_err(|e| bad("options", e.to_string()))?;
    let mut o = GenerateOptions::default();
    let Value::Object(m) = v else { return Err(bad("options", "expected a JSON object".into())) };
    for (k, v) in m {
        let num = || v.as_f64().ok_or_else(|| bad(&k, format!("{v} is not a number")));
        let count = || v.as_u64().map(|u| u as usize).ok_or_else(|| bad(&k, format!("{v} is not a count")));
        match k.as_str() {
            "max_new_tokens" => o.max_new_tokens = count()?,
            "temperature" => o.temperature = num()?,
            "top_p" => o.top_p = num()?,
            "top_k" => o.top_k = count()?,
            "seed" => o.seed = count()? as u64,
            "stop" => {
                o.stop_strings = serde_json::from_value(v.clone()).map_err(|_| bad("stop", "expected a list of strings".into()))?;
            }
            other => {
                let known = ["max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop"];
                return Err(bad(other, format!("unknown generation option{}", deltatune::error::suggest(other, known.into_iter()))));
            }
        }
    }
    Ok(o)
}

fn generation_json(g: &Generation) -> Value {
    serde_json::json!({
        "text": g.text,
        "tokens": g.tokens.len(),
        "prompt_tokens": g.prompt_tokens,
        "stop_reason": g.stop_reason,
        "prefill_seconds": g.prefill_seconds,
        "decode_seconds": g.decode_seconds,
    })
}

/// Generates a continuation with a decoder (GGUF or HF directory; `None`: the default decoder).
#[pyfunction]
#[pyo3(signature = (model, delta, prompt, chat, system, options, on_event=None))]
pub fn generate(py: Python<'_>, model: Option<PathBuf>, delta: Option<PathBuf>, prompt: String, chat: bool, system: Option<String>, options: String, on_event: Option<Py<PyAny>>) -> PyResult<String> {
    let sink = PySink::new(on_event);
    let r = run(py, || {
        let spec = generate_spec(model, delta, prompt, chat, system, &options)?;
        let ctl = Control::new(&sink, Some(&sink.cancel));
        let g = api::generate(&spec, &ctl, &mut |_| {})?;
        to_json(&generation_json(&g))
    });
    match sink.take_raised() {
        Some(e) => Err(e),
        None => r,
    }
}

enum Piece {
    Text(String),
    Done(Outcome<Value>),
}

/// An iterator over the text pieces of a generation running on its own thread.
#[pyclass(module = "deltatune._native")]
pub struct TextStream {
    rx: Mutex<Option<Receiver<Piece>>>,
    /// The summary once generation ended (JSON).
    result: Mutex<Option<String>>,
}

#[pyfunction]
#[pyo3(signature = (model, delta, prompt, chat, system, options))]
pub fn generate_stream(model: Option<PathBuf>, delta: Option<PathBuf>, prompt: String, chat: bool, system: Option<String>, options: String) -> TextStream {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let done = deltatune::ops::in_pool(|| crate::errors::guarded(|| {
            let spec = generate_spec(model, delta, prompt, chat, system, &options)?;
            let tx2 = tx.clone();
            let g = api::generate(&spec, &Control::silent(), &mut |t: &str| {
                let _ = tx2.send(Piece::Text(t.to_string())); // a dropped stream stops listening
            })?;
            Ok(generation_json(&g))
        }));
        let _ = tx.send(Piece::Done(done));
    });
    TextStream { rx: Mutex::new(Some(rx)), result: Mutex::new(None) }
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<String> {
        loop {
            let got = py.detach(|| {
                let guard = self.rx.lock().ok()?;
                let rx = guard.as_ref()?;
                Some(rx.recv_timeout(Duration::from_millis(100)))
            });
            match got {
                None => return Err(PyStopIteration::new_err(())),
                Some(Ok(Piece::Text(t))) => return Ok(t),
                Some(Ok(Piece::Done(r))) => {
                    if let Ok(mut g) = self.rx.lock() {
                        *g = None;
                    }
                    match r {
                        Ok(v) => {
                            if let Ok(mut s) = self.result.lock() {
                                *s = Some(v.to_string());
                            }
                            return Err(PyStopIteration::new_err(()));
                        }
                        Err(f) => return Err(to_py(py, f)),
                    }
                }
                Some(Err(RecvTimeoutError::Timeout)) => py.check_signals()?,
                Some(Err(RecvTimeoutError::Disconnected)) => {
                    if let Ok(mut g) = self.rx.lock() {
                        *g = None;
                    }
                    return Err(to_py(py, Failure::Panic("the generation thread ended without a result".into())));
                }
            }
        }
    }

    /// The generation summary (JSON) once the stream is exhausted, else None.
    fn result(&self) -> Option<String> {
        self.result.lock().ok().and_then(|s| s.clone())
    }
}
