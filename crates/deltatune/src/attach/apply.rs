//! Building planned deltas onto a backbone, and model-wide operations over attached deltas:
//! listing trainable variables, switching groups on and off, merging.

use super::plan::{plan, Plan};
use crate::core::{Attached, Backbone, GroupTensors, GroupTrainer};
use crate::data::tokenize::TextEncoder;
use crate::delta::{BuildCtx, DeltaSpec};
use crate::error::{Error, Result};
use candle_core::Var;
use std::collections::BTreeMap;

/// Options for [`attach`].
#[derive(Clone, Copy, Default)]
pub struct AttachOptions<'a> {
    /// Seed of every initialisation stream.
    pub seed: u64,
    /// Needed only for prompt tuning initialised from text.
    pub tokenizer: Option<&'a TextEncoder>,
}

/// Names of the delta groups attached to `model`, in forward order of first appearance.
pub fn delta_names(model: &dyn Backbone) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for s in model.sites() {
        for a in &s.deltas {
            if !names.contains(&a.name) {
                names.push(a.name.clone());
            }
        }
    }
    names
}

/// Plans and attaches `specs` to `model`. Nothing is attached if any spec fails.
pub fn attach(model: &mut dyn Backbone, specs: &[DeltaSpec], opts: AttachOptions) -> Result<Plan> {
    let existing = delta_names(model);
    for s in specs {
        if existing.contains(&s.name) {
            return Err(Error::Delta(format!("a delta named `{}` is already attached", s.name)));
        }
    }
    let info = model.info();
    for s in specs {
        s.config.validate(&info).map_err(|e| Error::Delta(format!("delta `{}`: {e}", s.name)))?;
    }
    let plan = plan(&model.tree(), specs)?;
    check_memory(model, specs, &plan)?;
    let word_embeddings = model.word_embeddings().ok();
    let mut built: Vec<(String, Attached)> = Vec::with_capacity(plan.entries.len());
    for (si, spec) in specs.iter().enumerate() {
        let group_dims = plan
            .paths_of(si)
            .iter()
            .filter_map(|p| model.site(p).and_then(|s| crate::delta::method::site_dims(s, &info).ok()))
            .collect();
        let mut ctx = BuildCtx {
            seed: opts.seed,
            model_type: model.model_type().to_string(),
            name: spec.name.clone(),
            device: model.device().clone(),
            info,
            word_embeddings: word_embeddings.clone(),
            tokenizer: opts.tokenizer,
            shared: BTreeMap::new(),
            group_dims,
        };
        for path in plan.paths_of(si) {
            let site = model.site(path).ok_or_else(|| Error::Delta(format!("no module `{path}`")))?;
            let delta = spec.config.build(site, &mut ctx).map_err(|e| Error::Delta(format!("delta `{}` at {path}: {e}", spec.name)))?;
            built.push((path.to_string(), Attached::new(spec.name.clone(), delta)));
        }
    }
    for (path, a) in built {
        match model.site_mut(&path) {
            Some(site) => site.deltas.push(a),
            None => return Err(Error::Delta(format!("no module `{path}`"))),
        }
    }
    Ok(plan)
}

/// Bytes of physical memory, if the system says.
fn machine_memory() -> Option<u128> {
    // SAFETY: sysconf only reads system configuration values.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages > 0 && size > 0).then(|| pages as u128 * size as u128)
}

/// Refuses a plan whose deltas could not fit in memory (weights, gradients and two optimizer
/// moments in f32), before anything is allocated: a size typo such as `r=100000000000` is an error
/// naming the delta, not an aborted process.
fn check_memory(model: &dyn Backbone, specs: &[DeltaSpec], plan: &Plan) -> Result<()> {
    let Some(limit) = machine_memory() else { return Ok(()) };
    let info = model.info();
    for (si, spec) in specs.iter().enumerate() {
        let paths = plan.paths_of(si);
        let mut params: u128 = 0;
        for path in &paths {
            let Some(site) = model.site(path) else { continue };
            let (inp, out) = crate::delta::method::site_dims(site, &info).unwrap_or((info.hidden_size, info.hidden_size));
            params = params.saturating_add(spec.config.param_estimate(inp, out, &info).unwrap_or(0));
        }
        let bytes = params.saturating_mul(16);
        if bytes > limit {
            let cfg = serde_json::to_string(&spec.config).unwrap_or_default();
            return Err(Error::Delta(format!(
                "delta `{}` would allocate about {:.1} GB ({} trainable values on {} modules, with gradients and optimizer state) but the machine has {:.1} GB; check its size settings: {cfg}",
                spec.name,
                bytes as f64 / 1e9,
                params,
                paths.len(),
                limit as f64 / 1e9
            )));
        }
    }
    Ok(())
}

/// Every trainable variable of the attached deltas, named `<delta>.<site path>.<param>` (shared
/// ones `<delta>.shared.<param>`, listed once), in forward order. Disabled and merged deltas are
/// left out.
pub fn trainable_vars(model: &dyn Backbone) -> Vec<(String, Var)> {
    delta_vars(model, false)
}

/// Like [`trainable_vars`]; with `include_inactive`, disabled and merged deltas are listed too.
pub fn delta_vars(model: &dyn Backbone, include_inactive: bool) -> Vec<(String, Var)> {
    collect_vars(model, include_inactive, false)
}

/// Every tensor saved with the deltas: trainable ones (active or not) and buffers (frozen
/// projections, masks), named like [`delta_vars`].
pub fn saved_vars(model: &dyn Backbone) -> Vec<(String, Var)> {
    collect_vars(model, true, true)
}

fn collect_vars(model: &dyn Backbone, include_inactive: bool, include_buffers: bool) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    let mut shared_seen = std::collections::BTreeSet::new();
    for s in model.sites() {
        for a in s.deltas.iter().filter(|a| include_inactive || a.active()) {
            let mut own = a.delta.params();
            let mut shared = a.delta.shared_params();
            if include_buffers {
                own.extend(a.delta.buffers());
                shared.extend(a.delta.shared_buffers());
            }
            for (n, v) in own {
                let full = if s.path().is_empty() { format!("{}.{n}", a.name) } else { format!("{}.{}.{n}", a.name, s.path()) };
                out.push((full, v));
            }
            for (n, v) in shared {
                let full = format!("{}.shared.{n}", a.name);
                if shared_seen.insert(full.clone()) {
                    out.push((full, v));
                }
            }
        }
    }
    out
}

/// Every tensor of delta group `name` (active or not, buffers included) as (site path, parameter
/// name, variable): site-local tensors in forward order, then the group's shared tensors once with
/// an empty site path. Formats that name tensors their own way (PEFT, llama.cpp) map these pairs.
pub fn group_vars(model: &dyn Backbone, name: &str) -> Vec<(String, String, Var)> {
    let t = group_tensors(model, name);
    t.trainable.into_iter().chain(t.buffers).collect()
}

/// The tensors of delta group `name`, trainable and buffers apart (shared ones last, with an
/// empty site path).
pub fn group_tensors(model: &dyn Backbone, name: &str) -> GroupTensors {
    let mut g = GroupTensors { name: name.to_string(), ..Default::default() };
    let (mut shared, mut shared_buf): (BTreeMap<String, Var>, BTreeMap<String, Var>) = Default::default();
    for s in model.sites() {
        for a in s.deltas.iter().filter(|a| a.name == name) {
            g.trainable.extend(a.delta.params().into_iter().map(|(n, v)| (s.path().to_string(), n, v)));
            g.buffers.extend(a.delta.buffers().into_iter().map(|(n, v)| (s.path().to_string(), n, v)));
            for (n, v) in a.delta.shared_params() {
                shared.entry(n).or_insert(v);
            }
            for (n, v) in a.delta.shared_buffers() {
                shared_buf.entry(n).or_insert(v);
            }
        }
    }
    g.trainable.extend(shared.into_iter().map(|(n, v)| (String::new(), n, v)));
    g.buffers.extend(shared_buf.into_iter().map(|(n, v)| (String::new(), n, v)));
    g
}

/// The group trainers of the attached deltas of `specs` (methods with training-time behaviour of
/// their own, such as AdaLoRA's rank allocation), in spec order.
pub fn group_trainers(model: &dyn Backbone, specs: &[DeltaSpec]) -> Result<Vec<Box<dyn GroupTrainer>>> {
    let mut out = Vec::new();
    for s in specs {
        if let Some(t) = s.config.group_trainer(group_tensors(model, &s.name))? {
            out.push(t);
        }
    }
    Ok(out)
}

/// Number of trainable scalars in the active deltas.
pub fn count_trainable(model: &dyn Backbone) -> usize {
    trainable_vars(model).iter().map(|(_, v)| v.elem_count()).sum()
}

/// Switches every delta of group `name` on or off.
pub fn set_enabled(model: &mut dyn Backbone, name: &str, on: bool) -> Result<()> {
    let mut found = false;
    for s in model.sites_mut() {
        for a in s.deltas.iter_mut().filter(|a| a.name == name) {
            a.enabled = on;
            found = true;
        }
    }
    if found {
        Ok(())
    } else {
        Err(Error::Delta(format!("no delta named `{name}` is attached (attached: {})", delta_names(model).join(", "))))
    }
}

/// Merges every active, mergeable delta into the base weights. Returns the number merged; errors
/// if `require_all` and some active delta cannot be merged (naming it).
pub fn merge_all(model: &mut dyn Backbone, require_all: bool) -> Result<usize> {
    let mut n = 0;
    for s in model.sites_mut() {
        n += s.merge()?;
        if require_all {
            if let Some(a) = s.deltas.iter().find(|a| a.active()) {
                return Err(Error::Delta(format!(
                    "delta `{}` ({}) at {} cannot be merged into the base weights",
                    a.name,
                    a.delta.method(),
                    s.path()
                )));
            }
        }
    }
    Ok(n)
}

/// Restores every site's unmerged base weights.
pub fn unmerge_all(model: &mut dyn Backbone) {
    for s in model.sites_mut() {
        s.unmerge();
    }
}

/// Detaches every delta.
pub fn remove_all(model: &mut dyn Backbone) {
    for s in model.sites_mut() {
        s.unmerge();
        s.deltas.clear();
    }
}

/// How many bottom transformer layers no active delta touches: their outputs depend only on the
/// input, so they can be computed once and cached. 0 when a delta sits below the layers (on the
/// embeddings, soft prompts, prefixes for every layer). Deltas above the layers (pooler) do not
/// count.
pub fn frozen_prefix_layers(model: &dyn Backbone) -> usize {
    let mut k = model.num_layers();
    for s in model.sites() {
        if !s.deltas.iter().any(|a| a.active()) {
            continue;
        }
        match s.layer() {
            Some(l) => k = k.min(l),
            None if s.path().starts_with("pooler") => {}
            None => return 0,
        }
    }
    k
}

/// Removes the deltas of `specs` from the model (used to roll back a failed load).
pub fn detach_named(model: &mut dyn Backbone, specs: &[DeltaSpec]) {
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    for s in model.sites_mut() {
        s.deltas.retain(|a| !names.contains(&a.name.as_str()));
    }
}
