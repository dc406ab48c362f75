//! The structure-search job (S3Delta): candidates from a space, gates trained under a parameter
//! budget, and the chosen structure written as a delta config `train` retrains.

use super::common::encoder_dir;
use crate::artifacts::TaskModel;
use crate::backbone::bert::BertModel;
use crate::control::Control;
use crate::core::{Backbone, Pooling};
use crate::data::sources::DataSource;
use crate::data::task::TaskOptions;
use crate::data::tokenize::TextEncoder;
use crate::delta::DeltaSpec;
use crate::error::{Error, Result};
use crate::io::atomic::{check_output, StagedDir};
use crate::head::{Head, HeadConfig};
use crate::search::output;
use crate::search::run::{prepare, search as run_search, Budget, SearchConfig, SearchResult};
use crate::search::space::{Candidate, Space};
use crate::train::task::{head_kind, prepare_split, scorer};
use candle_core::Device;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;

/// `deltatune search`.
#[derive(Clone, Debug)]
pub struct SearchSpec {
    pub model: Option<PathBuf>,
    pub data: DataSource,
    pub data_options: TaskOptions,
    pub max_length: usize,
    pub budget: Budget,
    pub space: Space,
    pub pooling: Pooling,
    pub config: SearchConfig,
    /// Holds structure.json, the candidate tables, search.json and the heatmap.
    pub out: PathBuf,
    /// Replace a previous search in `out`.
    pub overwrite: bool,
    /// Only list the candidates (candidates.json) and their sizes.
    pub candidates_only: bool,
}

/// What the search found (also `search.json`).
#[derive(Clone, Debug, Serialize)]
pub struct SearchOutcome {
    pub task: String,
    pub space: String,
    pub candidates: usize,
    pub space_params: usize,
    /// The budget in parameters and as a share of the backbone.
    pub budget: f64,
    pub budget_percent: f64,
    pub backbone_params: usize,
    pub selected: usize,
    pub selected_params: usize,
    pub supernet_dev: Option<f64>,
    pub best_step: Option<usize>,
    pub steps: usize,
    pub seconds: f64,
    pub config: SearchConfig,
    pub second_order: bool,
    /// The chosen structure (empty with `candidates_only`).
    #[serde(skip)]
    pub structure: Vec<DeltaSpec>,
    #[serde(skip)]
    pub out: PathBuf,
}

pub fn search(spec: &SearchSpec, ctl: &Control) -> Result<SearchOutcome> {
    spec.config.validate()?;
    if let Some(m) = spec.model.as_deref().filter(|m| crate::backbone::llama::is_decoder_path(m)) {
        return search_decoder(spec, m, ctl);
    }
    let model_dir = encoder_dir(spec.model.as_deref(), ctl)?;
    let inputs: Vec<(&str, &std::path::Path)> = std::iter::once(("--model", model_dir.as_path())).chain(spec.data.paths().into_iter().map(|p| ("--data", p))).collect();
    check_output(&spec.out, "--out", spec.overwrite, &inputs)?;
    let task = spec.data.load(&spec.data_options, &mut ctl.messages())?;
    let mut backbone = BertModel::load(&model_dir, &Device::Cpu)?;
    let enc = TextEncoder::from_file(&backbone.files.tokenizer, spec.max_length)?;
    let train = prepare_split(&task.train, &enc)?;
    let dev = prepare_split(&task.dev, &enc)?;
    let cands = spec.space.candidates(&mut backbone)?;
    let total = backbone.num_params();
    let head = Head::new(HeadConfig { kind: head_kind(task.kind), pooling: spec.pooling, hidden_size: backbone.hidden_size() }, spec.config.seed, backbone.device())?;
    let mut model = TaskModel { backbone, head, specs: Vec::new() };
    let frame = Frame { spec, task: &task.name, space: &spec.space.name, cands: &cands, total, what: "the backbone's", note: "the head is outside the budget".into() };
    frame.run(ctl, |budget, dir| {
        prepare(&mut model, &cands, spec.config.seed)?;
        let sc = scorer(&task);
        run_search(&mut model, &cands, budget, &train, Some(&dev), &sc, &spec.config, dir, enc.pad_id(), ctl)
    })
}

/// What every search does around its loop: the summary, `candidates_only`, the budget checked
/// against the space, the whole space taken without a search when the budget holds it, and the
/// outputs written into a staging directory moved into place at the end.
struct Frame<'a> {
    spec: &'a SearchSpec,
    task: &'a str,
    space: &'a str,
    cands: &'a [Candidate],
    /// The backbone's parameters (the budget's base).
    total: usize,
    /// Whose parameters (for the message).
    what: &'a str,
    /// A last clause for the message.
    note: String,
}

impl Frame<'_> {
    fn run(self, ctl: &Control, search: impl FnOnce(f64, &std::path::Path) -> Result<SearchResult>) -> Result<SearchOutcome> {
        let (spec, cands, total) = (self.spec, self.cands, self.total);
        let budget = spec.budget.params(total);
        let space_total: usize = cands.iter().map(|c| c.params).sum();
        let mut outcome = SearchOutcome {
            task: self.task.to_string(),
            space: self.space.to_string(),
            candidates: cands.len(),
            space_params: space_total,
            budget,
            budget_percent: 100.0 * budget / total as f64,
            backbone_params: total,
            selected: 0,
            selected_params: 0,
            supernet_dev: None,
            best_step: None,
            steps: 0,
            seconds: 0.0,
            config: spec.config.clone(),
            second_order: spec.config.second_order,
            structure: Vec::new(),
            out: spec.out.clone(),
        };
        if spec.candidates_only {
            let staging = StagedDir::new(&spec.out)?;
            let rows: Vec<_> = cands
                .iter()
                .map(|c| json!({"id": c.id, "method": c.method, "path": c.path, "layer": c.layer, "position": c.position, "params": c.params}))
                .collect();
            crate::io::atomic::write_json_atomic(&staging.path().join("candidates.json"), &rows)?;
            staging.commit(spec.overwrite)?;
            return Ok(outcome);
        }
        // The budget is checked here, once, against what the space can hold.
        let cheapest = cands.iter().map(|c| c.params).min().unwrap_or(0);
        if budget < cheapest as f64 {
            return Err(Error::arg(
                "--budget",
                format!(
                    "{budget:.0} parameters ({:.5}% of {total}) is smaller than the cheapest candidate of space {} ({cheapest} parameters)",
                    100.0 * budget / total as f64,
                    self.space
                ),
            ));
        }
        ctl.message(format!(
            "space {}: {} candidates, {} parameters in all; budget {budget:.0} ({:.5}% of {} {total}; {})",
            self.space,
            cands.len(),
            space_total,
            100.0 * budget / total as f64,
            self.what,
            self.note
        ));
        let staging = StagedDir::new(&spec.out)?;
        let result = if budget >= space_total as f64 {
            ctl.warn(format!(
                "the budget ({budget:.0}) is at least what the whole space can use ({space_total}); every candidate is selected and no search is run"
            ));
            SearchResult {
                budget,
                steps: 0,
                seconds: 0.0,
                alphas: vec![0.0; cands.len()],
                probs: vec![1.0; cands.len()],
                selected: (0..cands.len()).collect(),
                selected_params: space_total,
                best_dev: None,
                best_step: None,
            }
        } else {
            search(budget, staging.path())?
        };
        outcome.selected = result.selected.len();
        outcome.selected_params = result.selected_params;
        outcome.supernet_dev = result.best_dev;
        outcome.best_step = result.best_step;
        outcome.steps = result.steps;
        outcome.seconds = result.seconds;
        let summary = serde_json::to_value(&outcome).map_err(|e| Error::Delta(e.to_string()))?;
        outcome.structure = output::write(staging.path(), cands, &result, summary)?;
        staging.commit(spec.overwrite)?;
        Ok(outcome)
    }
}

/// The search on a decoder: a classification task as text-to-text (the task's default template
/// and label words, as `train-lm` uses them), the causal-LM loss on the label words as the
/// objective, and the supernet's verbalizer accuracy on the dev split as its score. The built-in
/// spaces `L` and `M` are the decoder's (every block linear, norms, block outputs); the budget is
/// a share of the decoder's parameters. The structure retrains with `train-lm --delta-config`.
fn search_decoder(spec: &SearchSpec, path: &std::path::Path, ctl: &Control) -> Result<SearchOutcome> {
    use crate::lm::causal::CausalLm;
    use crate::search::run::{prepare_backbone, search_objective, DecoderObjective};
    use crate::train::lm::{training_rows, LmTrainConfig, Verbalizer};
    let inputs: Vec<(&str, &std::path::Path)> = std::iter::once(("--model", path)).chain(spec.data.paths().into_iter().map(|p| ("--data", p))).collect();
    check_output(&spec.out, "--out", spec.overwrite, &inputs)?;
    let space = match spec.space.name.as_str() {
        "L" | "M" => Space::parse_decoder(&spec.space.name)?.0,
        _ => spec.space.clone(),
    };
    let task = spec.data.load(&spec.data_options, &mut ctl.messages())?;
    let verbalizer = Verbalizer::for_task(&task)?;
    let mut lm = CausalLm::load(path, &Device::Cpu)?;
    let cfg = LmTrainConfig { max_length: spec.max_length, seed: spec.config.seed, ..Default::default() };
    let rows = training_rows(&lm.tokenizer, &verbalizer.pairs(&task.train)?, &cfg)?;
    let cands = space.candidates(&mut lm.model)?;
    let total = lm.model.num_params();
    let frame = Frame {
        spec,
        task: &task.name,
        space: &space.name,
        cands: &cands,
        total,
        what: "the decoder's",
        note: format!("{} training rows as text-to-text", rows.len()),
    };
    frame.run(ctl, |budget, dir| {
        // Llama-family backbones have no dropout of their own; --no-dropout has nothing to turn off.
        prepare_backbone(&mut lm.model, &cands, spec.config.seed)?;
        let obj = DecoderObjective {
            model: &lm.model,
            tokenizer: &lm.tokenizer,
            rows: &rows,
            verbalizer: &verbalizer,
            dev: &task.dev,
            max_length: spec.max_length,
            eval_batch_size: spec.config.eval_batch_size,
        };
        search_objective(&obj, &cands, budget, &spec.config, dir, ctl)
    })
}
