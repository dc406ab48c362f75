//! Resolving delta specs against a module tree into an ordered list of (delta, site) pairs.

use super::aliases;
use crate::core::{ModuleTree, SiteKind};
use crate::delta::{DeltaSpec, TargetModules};
use crate::error::{nearest, Error, Result};
use regex::Regex;
use std::collections::BTreeSet;

/// One delta to build: spec index and site path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanEntry {
    pub spec: usize,
    pub path: String,
}

/// What one pattern of one spec matched (for dry runs).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PatternReport {
    pub delta: String,
    pub pattern: String,
    pub matched: Vec<String>,
    /// Why the pattern could not be used (dry runs only; a real plan fails instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The resolved attachment plan, in spec order then forward (tree) order.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub entries: Vec<PlanEntry>,
    pub report: Vec<PatternReport>,
}

impl Plan {
    pub fn paths_of(&self, spec: usize) -> Vec<&str> {
        self.entries.iter().filter(|e| e.spec == spec).map(|e| e.path.as_str()).collect()
    }
}

/// A compiled pattern.
enum Matcher {
    /// Exact path or `.`-suffix (PEFT list entry).
    Suffix(String),
    /// Full-match regex.
    Regex(Regex),
}

impl Matcher {
    fn is_match(&self, path: &str) -> bool {
        match self {
            Matcher::Suffix(s) => path == s || (path.len() > s.len() && path.ends_with(s.as_str()) && path.as_bytes()[path.len() - s.len() - 1] == b'.'),
            Matcher::Regex(r) => r.is_match(path),
        }
    }
}

fn full_regex(r: &str, origin: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{r})$")).map_err(|e| Error::Delta(format!("{origin}: invalid regex `{r}`: {e}")))
}

/// Compiles one list entry (alias, `re:` regex, or suffix name).
fn compile_entry(entry: &str, origin: &str) -> Result<Vec<Matcher>> {
    if let Some(r) = entry.strip_prefix("re:") {
        return Ok(vec![Matcher::Regex(full_regex(r, origin)?)]);
    }
    if let Some(rs) = aliases::expand(entry) {
        return rs.iter().map(|r| Ok(Matcher::Regex(full_regex(r, origin)?))).collect();
    }
    if entry.is_empty() {
        return Err(Error::Delta(format!("{origin}: empty module pattern")));
    }
    Ok(vec![Matcher::Suffix(entry.to_string())])
}

/// Patterns of a `TargetModules` as (display text, matchers).
fn compile(t: &TargetModules, origin: &str) -> Result<Vec<(String, Vec<Matcher>)>> {
    match t {
        TargetModules::Regex(r) => Ok(vec![(r.clone(), vec![Matcher::Regex(full_regex(r, origin)?)])]),
        TargetModules::List(l) => l.iter().map(|e| Ok((e.clone(), compile_entry(e, origin)?))).collect(),
    }
}

fn hint(tree: &ModuleTree, pattern: &str, kinds: &[SiteKind]) -> String {
    let valid: Vec<&str> = tree.modules.iter().filter(|m| kinds.contains(&m.kind)).map(|m| m.path.as_str()).collect();
    // Compare against paths trimmed to as many segments as the pattern has.
    let segs = pattern.split('.').count();
    let tails: Vec<(String, &str)> = valid
        .iter()
        .map(|p| {
            let parts: Vec<&str> = p.split('.').collect();
            (parts[parts.len().saturating_sub(segs)..].join("."), *p)
        })
        .collect();
    let ranked = nearest(pattern, tails.iter().map(|(t, _)| t.as_str()), tails.len());
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for r in ranked {
        if let Some((_, p)) = tails.iter().find(|(t, _)| t == r) {
            if seen.insert(*p) {
                out.push(*p);
            }
        }
        if out.len() == 5 {
            break;
        }
    }
    if out.is_empty() {
        String::new()
    } else {
        format!("; nearest valid paths: {}", out.join(", "))
    }
}

fn kind_names(kinds: &[SiteKind]) -> String {
    kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
}

/// Resolves `specs` against `tree`; any pattern that matches nothing is an error.
pub fn plan(tree: &ModuleTree, specs: &[DeltaSpec]) -> Result<Plan> {
    plan_with(tree, specs, true)
}

/// Like [`plan`], but a pattern that matches nothing (or the wrong kind of module) is recorded in
/// its [`PatternReport::error`] instead of failing — for dry runs.
pub fn dry_run(tree: &ModuleTree, specs: &[DeltaSpec]) -> Result<Plan> {
    plan_with(tree, specs, false)
}

fn plan_with(tree: &ModuleTree, specs: &[DeltaSpec], strict: bool) -> Result<Plan> {
    let mut out = Plan::default();
    let mut names = BTreeSet::new();
    for (si, spec) in specs.iter().enumerate() {
        if !names.insert(spec.name.as_str()) {
            return Err(Error::Delta(format!("two deltas are named `{}`; give each a unique name (name=...)", spec.name)));
        }
        let origin = format!("delta `{}`", spec.name);
        let defaults = spec.config.default_targets(&tree.model_type);
        let targets = spec.targets.target_modules.clone().or(defaults.target_modules).ok_or_else(|| {
            Error::Delta(format!("{origin}: {} has no default targets; give target_modules", spec.config.method()))
        })?;
        let layers = spec.targets.layers_to_transform.clone().or(defaults.layers_to_transform);
        let exclude = spec.targets.exclude_modules.as_ref().map(|e| compile(e, &origin)).transpose()?;
        let excluded = |p: &str| exclude.as_ref().is_some_and(|ex| ex.iter().any(|(_, ms)| ms.iter().any(|m| m.is_match(p))));
        let is_list = matches!(targets, TargetModules::List(_));
        let mut chosen: BTreeSet<usize> = BTreeSet::new();
        for (text, matchers) in compile(&targets, &origin)? {
            let resolved = resolve_pattern(tree, spec, &origin, &text, &matchers, is_list, layers.as_deref(), &excluded);
            match resolved {
                Ok(resolved) => {
                    out.report.push(PatternReport {
                        delta: spec.name.clone(),
                        pattern: text,
                        matched: resolved.iter().map(|&i| tree.modules[i].path.clone()).collect(),
                        error: None,
                    });
                    chosen.extend(resolved);
                }
                Err(e) if !strict => {
                    out.report.push(PatternReport { delta: spec.name.clone(), pattern: text, matched: Vec::new(), error: Some(e.to_string()) });
                }
                Err(e) => return Err(e),
            }
        }
        // BTreeSet of tree indices = forward order, each site once.
        out.entries.extend(chosen.into_iter().map(|i| PlanEntry { spec: si, path: tree.modules[i].path.clone() }));
    }
    Ok(out)
}

/// The tree indices one pattern of `spec` resolves to (after layer filter, exclusions, kind check
/// and expansion).
#[allow(clippy::too_many_arguments)]
fn resolve_pattern(
    tree: &ModuleTree,
    spec: &DeltaSpec,
    origin: &str,
    text: &str,
    matchers: &[Matcher],
    is_list: bool,
    layers: Option<&[usize]>,
    excluded: &dyn Fn(&str) -> bool,
) -> Result<Vec<usize>> {
    let kinds = spec.config.kinds();
    let mut raw = Vec::new();
    let mut matched = Vec::new();
    for (i, m) in tree.modules.iter().enumerate() {
        if !matchers.iter().any(|mm| mm.is_match(&m.path)) {
            continue;
        }
        raw.push(i);
        // PEFT: an exact list match skips the layer filter.
        let exact = is_list && m.path == text;
        if let (Some(ls), false) = (layers, exact) {
            if !m.layer.is_some_and(|l| ls.contains(&l)) {
                continue;
            }
        }
        if excluded(&m.path) {
            continue;
        }
        matched.push(i);
    }
    if raw.is_empty() {
        return Err(Error::NoMatch { pattern: text.to_string(), hint: format!(" (in {origin}){}", hint(tree, text, kinds)) });
    }
    if matched.is_empty() {
        let why = match layers {
            Some(ls) => format!(" inside layers {ls:?}"),
            None => String::new(),
        };
        return Err(Error::NoMatch { pattern: text.to_string(), hint: format!("{why} after exclusions (in {origin})") });
    }
    // Kind check, expanding blocks for specification methods.
    let mut resolved = Vec::new();
    for &i in &matched {
        let m = &tree.modules[i];
        if kinds.contains(&m.kind) {
            resolved.push(i);
        } else if spec.config.expands() {
            let prefix = if m.path.is_empty() { String::new() } else { format!("{}.", m.path) };
            let kids: Vec<usize> = tree
                .modules
                .iter()
                .enumerate()
                .filter(|(_, d)| d.path.starts_with(&prefix) && kinds.contains(&d.kind) && !excluded(&d.path))
                .map(|(j, _)| j)
                .collect();
            if kids.is_empty() {
                return Err(Error::Delta(format!(
                    "{origin}: {} cannot tune `{}` ({}): no {} modules inside it",
                    spec.config.method(),
                    m.path,
                    m.kind.as_str(),
                    kind_names(kinds)
                )));
            }
            resolved.extend(kids);
        } else {
            return Err(Error::Delta(format!(
                "{origin}: {} cannot attach to `{}` ({}); it attaches to {} modules{}",
                spec.config.method(),
                m.path,
                m.kind.as_str(),
                kind_names(kinds),
                hint(tree, text, kinds)
            )));
        }
    }
    Ok(resolved)
}
