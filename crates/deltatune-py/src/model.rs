//! `Model`: a frozen encoder with its named deltas and, once trained or loaded from a trained
//! directory, a task head. PEFT's operations (add/set/disable/delete adapters, save, load,
//! merge) and the jobs that keep the model in memory (embed, predict, train).

use crate::errors::{run, Failure, Outcome};
use crate::progress::PySink;
use deltatune::api::{self, Control, RunMode, TrainSpec};
use deltatune::artifacts::{delta_dir, load::load_delta, merged::write_merged, peft, TaskModel};
use deltatune::attach::{self, AttachOptions};
use deltatune::backbone::bert::{BertModel, ModelDir};
use deltatune::core::{Backbone, Pooling};
use deltatune::data::tokenize::TextEncoder;
use deltatune::data::{DataSource, TaskOptions};
use deltatune::delta::DeltaSpec;
use deltatune::error::Error;
use deltatune::head::{Head, HeadConfig};
use deltatune::train::config::TrainConfig;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

struct State {
    /// The backbone directory (absolute).
    dir: PathBuf,
    /// `None` only after a panic lost it mid-call.
    backbone: Option<BertModel>,
    /// Every attached group, in attach order.
    specs: Vec<DeltaSpec>,
    /// A task head and the metadata saved with it (task, labels, data source).
    head: Option<(Head, Map<String, Value>)>,
    /// The directory the head (and its deltas) was last loaded from or trained into.
    trained_dir: Option<PathBuf>,
}

impl State {
    fn bb(&self) -> Outcome<&BertModel> {
        self.backbone.as_ref().ok_or_else(lost)
    }
    fn bb_mut(&mut self) -> Outcome<&mut BertModel> {
        self.backbone.as_mut().ok_or_else(lost)
    }

    /// Runs `f` on the backbone with its head as a `TaskModel` (both put back afterwards).
    fn with_task<T>(&mut self, f: impl FnOnce(&TaskModel, &Map<String, Value>) -> deltatune::error::Result<T>) -> Outcome<T> {
        let Some((head, meta)) = self.head.take() else {
            return Err(Failure::Lib(Error::Delta(
                "this model has no task head: train it (model.train(...)) or load a trained directory (PeftModel.from_pretrained)".into(),
            )));
        };
        let backbone = self.backbone.take().ok_or_else(lost)?;
        let tm = TaskModel { backbone, head, specs: self.specs.clone() };
        let r = f(&tm, &meta);
        self.backbone = Some(tm.backbone);
        self.head = Some((tm.head, meta));
        Ok(r?)
    }

    /// Attaches a saved delta (ours or PEFT's); a saved task head comes with it.
    fn load_dir(&mut self, dir: &Path, name: Option<&str>) -> Outcome<Vec<String>> {
        let dir = api::trained_delta_dir(dir);
        let bb = self.backbone.as_mut().ok_or_else(lost)?;
        let loaded = if !delta_dir::is_delta_dir(&dir) && peft::is_peft_dir(&dir) {
            peft::load(&dir, bb, name)?
        } else {
            load_delta(&dir, bb, AttachOptions::default())?
        };
        let names: Vec<String> = loaded.specs.iter().map(|s| s.name.clone()).collect();
        if let Some(cfg) = loaded.meta.get("head").cloned() {
            let cfg: HeadConfig = serde_json::from_value(cfg)
                .map_err(|e| Error::Config { file: dir.join(delta_dir::CONFIG_FILE), msg: format!("head: {e}") })?;
            let head = Head::from_tensors(cfg, &loaded.extra_tensors, &dir.join(delta_dir::WEIGHTS_FILE).display().to_string())?;
            self.head = Some((head, loaded.meta.clone()));
            self.trained_dir = Some(dir.clone());
        }
        self.specs.extend(loaded.specs);
        Ok(names)
    }
}

fn lost() -> Failure {
    Failure::Lib(Error::Delta("the model was lost after an internal error; load it again".into()))
}

fn json_err(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::Lib(Error::arg(what, e.to_string()))
}

fn to_json<T: serde::Serialize>(v: &T) -> Outcome<String> {
    serde_json::to_string(v).map_err(|e| Failure::Lib(Error::Delta(format!("serializing a result: {e}"))))
}

/// A frozen encoder with named deltas (adapters) and an optional task head.
#[pyclass(module = "deltatune._native")]
pub struct Model {
    state: Mutex<State>,
}

impl Model {
    fn lock(&self) -> Outcome<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| lost())
    }
}

/// Loads the default model (`path=None`, fetched on first use) or a Hugging Face directory.
#[pyfunction]
#[pyo3(signature = (path=None, on_event=None))]
pub fn load(py: Python<'_>, path: Option<PathBuf>, on_event: Option<Py<PyAny>>) -> PyResult<Model> {
    let sink = PySink::new(on_event);
    let r = run(py, || {
        let ctl = Control::new(&sink, Some(&sink.cancel));
        let dir = api::encoder_dir(path.as_deref(), &ctl)?;
        if !dir.exists() {
            return Err(Failure::Lib(Error::NotFound { path: dir, what: "model directory".into() }));
        }
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let backbone = BertModel::load(&dir, &candle_core::Device::Cpu)?;
        Ok(Model { state: Mutex::new(State { dir, backbone: Some(backbone), specs: Vec::new(), head: None, trained_dir: None }) })
    });
    match sink.take_raised() {
        Some(e) => Err(e),
        None => r,
    }
}

#[pymethods]
impl Model {
    /// The module tree (folded repeats, parameter counts, deltas marked).
    fn tree(&self, py: Python<'_>) -> PyResult<String> {
        run(py, || Ok(self.lock()?.bb()?.tree().render()))
    }

    /// JSON: model type and directory, sizes, parameter counts, adapters, head.
    fn info(&self, py: Python<'_>) -> PyResult<String> {
        run(py, || {
            let st = self.lock()?;
            let bb = st.bb()?;
            let tree = bb.tree();
            let enabled: BTreeMap<String, bool> = tree
                .modules
                .iter()
                .flat_map(|m| m.deltas.iter())
                .map(|d| (d.name.clone(), d.enabled))
                .collect();
            let adapters: Vec<Value> = st
                .specs
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "name": s.name,
                        "method": s.config.method(),
                        "enabled": enabled.get(&s.name).copied().unwrap_or(false),
                        "config": s.to_json(),
                    })
                })
                .collect();
            let head_params = st.head.as_ref().map(|(h, _)| h.params().iter().map(|(_, v)| v.elem_count()).sum::<usize>()).unwrap_or(0);
            let labels = st.head.as_ref().and_then(|(_, m)| m.get("task").map(|t| t["labels"].clone()));
            let v = serde_json::json!({
                "model_type": bb.model_type(),
                "dir": st.dir,
                "hidden_size": bb.hidden_size(),
                "num_layers": bb.num_layers(),
                "base_params": tree.total_params,
                "trainable_params": tree.trainable_params,
                "all_params": tree.all_params,
                "head_params": head_params,
                "adapters": adapters,
                "has_head": st.head.is_some(),
                "labels": labels,
                "trained_dir": st.trained_dir,
            });
            to_json(&v)
        })
    }

    /// Attaches a new delta group from a flat JSON config (`{"method": "lora", "r": 8, …}`).
    fn add_adapter(&self, py: Python<'_>, name: String, config: String, seed: u64) -> PyResult<()> {
        run(py, || {
            let v: Value = serde_json::from_str(&config).map_err(|e| json_err("config", e))?;
            let (mut spec, warnings) = DeltaSpec::from_json(&v, &format!("adapter `{name}`"))?;
            if let Some(w) = warnings.first() {
                return Err(Failure::Lib(Error::arg("config", w.clone())));
            }
            spec.name = name.clone();
            let mut st = self.lock()?;
            if st.specs.iter().any(|s| s.name == name) {
                return Err(Failure::Lib(Error::arg("adapter_name", format!("an adapter named `{name}` is already attached; delete_adapter it first or choose another name"))));
            }
            let bb = st.bb_mut()?;
            attach::attach(bb, std::slice::from_ref(&spec), AttachOptions { seed, tokenizer: None })?;
            st.specs.push(spec);
            Ok(())
        })
    }

    /// Loads a saved delta (deltatune's directory or a PEFT adapter folder, or a training run's
    /// `best/`); returns the names of the groups attached.
    #[pyo3(signature = (dir, name=None))]
    fn load_adapter(&self, py: Python<'_>, dir: PathBuf, name: Option<String>) -> PyResult<Vec<String>> {
        run(py, || {
            let mut st = self.lock()?;
            if let Some(n) = &name {
                if st.specs.iter().any(|s| &s.name == n) {
                    return Err(Failure::Lib(Error::arg("adapter_name", format!("an adapter named `{n}` is already attached"))));
                }
            }
            st.load_dir(&dir, name.as_deref())
        })
    }

    /// Names of the attached groups, in attach order.
    fn adapter_names(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        run(py, || Ok(self.lock()?.specs.iter().map(|s| s.name.clone()).collect()))
    }

    /// Switches group `name` on or off.
    fn set_enabled(&self, py: Python<'_>, name: String, on: bool) -> PyResult<()> {
        run(py, || {
            let mut st = self.lock()?;
            attach::set_enabled(st.bb_mut()?, &name, on)?;
            Ok(())
        })
    }

    /// Removes group `name` from the model.
    fn delete_adapter(&self, py: Python<'_>, name: String) -> PyResult<()> {
        run(py, || {
            let mut st = self.lock()?;
            let Some(i) = st.specs.iter().position(|s| s.name == name) else {
                let names: Vec<String> = st.specs.iter().map(|s| s.name.clone()).collect();
                return Err(Failure::Lib(Error::arg("adapter_name", format!("no adapter named `{name}` (attached: {})", names.join(", ")))));
            };
            let spec = st.specs.remove(i);
            let bb = st.bb_mut()?;
            for s in bb.sites_mut() {
                if s.deltas.iter().any(|a| a.name == spec.name && a.merged) {
                    s.unmerge();
                }
            }
            attach::detach_named(bb, &[spec]);
            Ok(())
        })
    }

    /// Saves groups `names` (all when empty) — `format` "deltatune" (with the task head) or
    /// "peft" (adapter_config.json + adapter_model.safetensors; extra groups in subfolders).
    fn save(&self, py: Python<'_>, dir: PathBuf, names: Vec<String>, format: String) -> PyResult<()> {
        run(py, || {
            let st = self.lock()?;
            let bb = st.bb()?;
            let specs: Vec<DeltaSpec> = if names.is_empty() {
                st.specs.clone()
            } else {
                let mut out = Vec::new();
                for n in &names {
                    match st.specs.iter().find(|s| &s.name == n) {
                        Some(s) => out.push(s.clone()),
                        None => return Err(Failure::Lib(Error::arg("selected_adapters", format!("no adapter named `{n}`")))),
                    }
                }
                out
            };
            if specs.is_empty() {
                return Err(Failure::Lib(Error::arg("save_pretrained", "the model has no adapters to save")));
            }
            match format.as_str() {
                "deltatune" => {
                    let (tensors, meta) = match &st.head {
                        Some((h, meta)) => {
                            let mut meta = meta.clone();
                            meta.insert("head".into(), serde_json::to_value(&h.config).unwrap_or_default());
                            (h.tensors(), meta)
                        }
                        None => (BTreeMap::new(), Map::new()),
                    };
                    delta_dir::save(&dir, bb, &specs, &tensors, &meta)?;
                }
                "peft" => {
                    let base = st.dir.display().to_string();
                    let extra = match &st.head {
                        Some((h, _)) => h.tensors().into_iter().map(|(k, t)| (format!("classifier.{}", k.trim_start_matches("head.")), t)).collect(),
                        None => BTreeMap::new(),
                    };
                    for (i, s) in specs.iter().enumerate() {
                        let sub = if i == 0 && (s.name == "default" || specs.len() == 1) { dir.clone() } else { dir.join(&s.name) };
                        peft::export(&sub, bb, s, &base, &extra)?;
                    }
                }
                other => return Err(Failure::Lib(Error::arg("save_format", format!("`{other}` (expected `deltatune` or `peft`)")))),
            }
            Ok(())
        })
    }

    /// Sentence embeddings: (bytes of float32 rows, rows, columns).
    fn embed<'py>(&self, py: Python<'py>, texts: Vec<String>, pooling: String, normalize: bool, max_length: usize, batch_size: usize) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
        let (bytes, n, h) = run(py, || {
            let pooling: Pooling = pooling.parse()?;
            deltatune::error::check::at_least("max_length", max_length, 2)?;
            let st = self.lock()?;
            let bb = st.bb()?;
            let enc = TextEncoder::from_file(&bb.files.tokenizer, max_length)?;
            let h = bb.hidden_size();
            let mut bytes = Vec::with_capacity(texts.len() * h * 4);
            let mut rows = 0;
            api::embed_with(bb, &enc, &texts, pooling, normalize, batch_size, &mut |batch| {
                for r in batch {
                    rows += 1;
                    for x in r {
                        bytes.extend_from_slice(&x.to_le_bytes());
                    }
                }
                Ok(())
            })?;
            Ok((bytes, rows, h))
        })?;
        Ok((PyBytes::new(py, &bytes), n, h))
    }

    /// Predictions of the task head, as JSON (a list of objects).
    fn predict(&self, py: Python<'_>, texts: Vec<(String, Option<String>)>, batch_size: usize) -> PyResult<String> {
        run(py, || {
            let mut st = self.lock()?;
            let preds = st.with_task(|tm, meta| api::predict_with(tm, meta, &texts, batch_size))?;
            to_json(&preds)
        })
    }

    /// Trains the enabled adapters (fresh from their initialisation, or resumed) with a new task
    /// head on `data`, in `run_dir`; then loads the best checkpoint into this model.
    /// `data` is a `DataSource` as JSON, `options` the split options and `config` the training
    /// settings (both JSON objects over the defaults). Returns the run summary as JSON.
    #[pyo3(signature = (data, options, config, run_dir, mode, on_event=None))]
    fn train(&self, py: Python<'_>, data: String, options: String, config: String, run_dir: PathBuf, mode: String, on_event: Option<Py<PyAny>>) -> PyResult<String> {
        let sink = PySink::new(on_event);
        let r = run(py, || {
            let data: DataSource = serde_json::from_str(&data).map_err(|e| json_err("data", e))?;
            let options: TaskOptions = merged_json(&TaskOptions::default(), &options, "data options")?;
            let train_cfg: TrainConfig = merged_json(&TrainConfig::default(), &config, "training option")?;
            let mode = match mode.as_str() {
                "fresh" => RunMode::Fresh,
                "resume" => RunMode::Resume,
                "overwrite" => RunMode::Overwrite,
                other => return Err(Failure::Lib(Error::arg("mode", format!("`{other}`")))),
            };
            let mut st = self.lock()?;
            let tree = st.bb()?.tree();
            let enabled: Vec<String> = tree.modules.iter().flat_map(|m| m.deltas.iter()).filter(|d| d.enabled && !d.merged).map(|d| d.name.clone()).collect();
            let deltas: Vec<DeltaSpec> = st.specs.iter().filter(|s| enabled.contains(&s.name)).cloned().collect();
            if deltas.is_empty() {
                return Err(Failure::Lib(Error::arg("adapters", "no enabled adapter to train: add one with get_peft_model / add_adapter")));
            }
            let spec = TrainSpec { model: st.dir.clone(), data, data_options: options, deltas: deltas.clone(), train: train_cfg };
            let ctl = Control::new(&sink, Some(&sink.cancel));
            let run_dir = std::path::absolute(&run_dir).unwrap_or(run_dir);
            let result = api::train(&spec, &run_dir, mode, &ctl)?;
            // The trained groups replace their untrained copies.
            let bb = st.bb_mut()?;
            attach::detach_named(bb, &deltas);
            st.specs.retain(|s| !deltas.iter().any(|d| d.name == s.name));
            st.load_dir(&run_dir, None)?;
            to_json(&result)
        });
        match sink.take_raised() {
            Some(e) => Err(e),
            None => r,
        }
    }

    /// Folds the enabled mergeable deltas into the base weights (all must be mergeable); returns
    /// the number of sites merged. The merged groups are then removed from the model.
    fn merge_and_unload(&self, py: Python<'_>) -> PyResult<usize> {
        run(py, || {
            let mut st = self.lock()?;
            let bb = st.bb_mut()?;
            let n = attach::merge_all(bb, true).inspect_err(|_| attach::unmerge_all(bb))?;
            // Keep the merged weights, drop the delta records: the base is now the merged model.
            let merged: Vec<String> = bb.sites().iter().flat_map(|s| s.deltas.iter().filter(|a| a.merged).map(|a| a.name.clone())).collect();
            for s in bb.sites_mut() {
                s.deltas.retain(|a| !a.merged);
            }
            st.specs.retain(|s| !merged.contains(&s.name));
            Ok(n)
        })
    }

    /// Writes a plain Hugging Face model directory with the enabled deltas merged in.
    fn save_merged(&self, py: Python<'_>, out: PathBuf) -> PyResult<usize> {
        run(py, || {
            let mut st = self.lock()?;
            let source = ModelDir::open(&st.dir)?;
            let bb = st.bb_mut()?;
            Ok(write_merged(bb, &source, &out)?)
        })
    }

    /// Where the task head was loaded from or trained into (for `evaluate`).
    fn trained_dir(&self, py: Python<'_>) -> PyResult<Option<PathBuf>> {
        run(py, || Ok(self.lock()?.trained_dir.clone()))
    }

    fn model_dir(&self, py: Python<'_>) -> PyResult<PathBuf> {
        run(py, || Ok(self.lock()?.dir.clone()))
    }
}

/// `T` from `defaults` with the keys of the JSON object `given` replaced; an unknown key is an
/// error naming it (with a suggestion).
pub fn merged_json<T: serde::Serialize + serde::de::DeserializeOwned>(defaults: &T, given: &str, what: &str) -> Outcome<T> {
    let mut base = match serde_json::to_value(defaults) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let given: Value = serde_json::from_str(given).map_err(|e| json_err(what, e))?;
    let Value::Object(g) = given else {
        return Err(Failure::Lib(Error::arg(what, "expected a JSON object")));
    };
    for (k, v) in g {
        if !base.contains_key(&k) {
            let hint = deltatune::error::suggest(&k, base.keys().map(|s| s.as_str()));
            let known: Vec<&str> = base.keys().map(|s| s.as_str()).collect();
            return Err(Failure::Lib(Error::arg(what, format!("unknown {what} `{k}`{hint} (known: {})", known.join(", ")))));
        }
        base.insert(k, v);
    }
    serde_json::from_value(Value::Object(base)).map_err(|e| json_err(what, e))
}

