//! A snapshot of a backbone's module tree — paths, kinds, shapes, attached deltas — for display
//! (`deltatune inspect`), JSON output and name matching. Rendering folds repeated layers
//! (`encoder.layer.0-5`) and identical sibling leaves (`query,key,value`) the way OpenDelta's
//! visualisation does.

use super::site::{Site, SiteKind};
use serde::Serialize;
use std::collections::BTreeMap;

/// A delta as seen from the tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeltaInfo {
    pub name: String,
    pub method: String,
    pub params: usize,
    /// Trainable tensors relative to the site, with shapes.
    pub shapes: BTreeMap<String, Vec<usize>>,
    pub enabled: bool,
    pub merged: bool,
    /// Trainable copies of the site's own tensors (fine-tuning), not additional parameters.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub replaces_base: bool,
}

/// One module.
#[derive(Clone, Debug, Serialize)]
pub struct SiteInfo {
    pub path: String,
    pub kind: SiteKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    /// Base parameters in this module and all modules below it.
    pub params: usize,
    /// This module's own base tensors and their shapes.
    pub shapes: BTreeMap<String, Vec<usize>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<DeltaInfo>,
}

impl SiteInfo {
    /// The last dotted segment (`query`), or `root` for the model.
    pub fn name(&self) -> &str {
        if self.path.is_empty() {
            "root"
        } else {
            self.path.rsplit('.').next().unwrap_or(&self.path)
        }
    }

    pub fn own_params(&self) -> usize {
        self.shapes.values().map(|s| s.iter().product::<usize>()).sum()
    }

    pub fn trainable(&self) -> usize {
        self.deltas.iter().filter(|d| d.enabled && !d.merged).map(|d| d.params).sum()
    }
}

fn parent_of(path: &str) -> Option<&str> {
    if path.is_empty() {
        None
    } else {
        Some(path.rsplit_once('.').map(|(p, _)| p).unwrap_or(""))
    }
}

/// Every module of a backbone in forward order.
#[derive(Clone, Debug, Serialize)]
pub struct ModuleTree {
    pub model_type: String,
    /// Parameters of the backbone itself.
    pub total_params: usize,
    /// Trainable delta parameters (shared tensors counted once).
    pub trainable_params: usize,
    /// Backbone plus the parameters the deltas add (PEFT's "all params").
    pub all_params: usize,
    /// trainable / all, in percent.
    pub trainable_percent: f64,
    pub modules: Vec<SiteInfo>,
}

impl ModuleTree {
    pub fn from_sites(model_type: &str, sites: &[&Site]) -> Self {
        let mut modules: Vec<SiteInfo> = sites
            .iter()
            .map(|s| SiteInfo {
                path: s.path().to_string(),
                kind: s.kind(),
                layer: s.layer(),
                params: s.num_params(),
                shapes: s
                    .params()
                    .iter()
                    .map(|(n, t)| (n.clone(), t.dims().to_vec()))
                    .chain(s.quantized_params().iter().map(|(n, q)| (n.clone(), q.shape().dims().to_vec())))
                    .collect(),
                deltas: s
                    .deltas
                    .iter()
                    .map(|a| {
                        let params = a.delta.params();
                        DeltaInfo {
                            name: a.name.clone(),
                            method: a.delta.method().to_string(),
                            params: params.iter().map(|(_, v)| v.elem_count()).sum(),
                            shapes: params.iter().map(|(n, v)| (n.clone(), v.dims().to_vec())).collect(),
                            enabled: a.enabled,
                            merged: a.merged,
                            replaces_base: a.delta.replaces_base(),
                        }
                    })
                    .collect(),
            })
            .collect();
        // Subtree totals: add each module's own count to all its ancestors.
        let own: Vec<(String, usize)> = modules.iter().map(|m| (m.path.clone(), m.params)).collect();
        let index: BTreeMap<String, usize> = modules.iter().enumerate().map(|(i, m)| (m.path.clone(), i)).collect();
        for (path, n) in own {
            let mut p = parent_of(&path);
            while let Some(pp) = p {
                if let Some(&i) = index.get(pp) {
                    modules[i].params += n;
                }
                p = parent_of(pp);
            }
        }
        let total_params = sites.iter().map(|s| s.num_params()).sum();
        // Tensors shared by the sites of a group (Compacter's rules) count once.
        let mut shared: BTreeMap<String, usize> = BTreeMap::new();
        for s in sites {
            for a in s.deltas.iter().filter(|a| a.active()) {
                for (n, v) in a.delta.shared_params() {
                    shared.insert(format!("{}.{n}", a.name), v.elem_count());
                }
            }
        }
        let shared_total: usize = shared.values().sum();
        let trainable_params: usize = modules.iter().map(|m| m.trainable()).sum::<usize>() + shared_total;
        let replacing: usize = modules
            .iter()
            .flat_map(|m| m.deltas.iter())
            .filter(|d| d.enabled && !d.merged && d.replaces_base)
            .map(|d| d.params)
            .sum();
        let all_params = total_params + trainable_params - replacing;
        let trainable_percent = if all_params == 0 { 0.0 } else { 100.0 * trainable_params as f64 / all_params as f64 };
        ModuleTree { model_type: model_type.to_string(), total_params, trainable_params, all_params, trainable_percent, modules }
    }

    /// Paths of all modules.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.modules.iter().map(|m| m.path.as_str())
    }

    pub fn get(&self, path: &str) -> Option<&SiteInfo> {
        self.modules.iter().find(|m| m.path == path)
    }

    /// Trainable share of all parameters (base + delta) in percent.
    pub fn trainable_percent(&self) -> f64 {
        self.trainable_percent
    }

    fn children(&self) -> BTreeMap<&str, Vec<usize>> {
        let mut ch: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, m) in self.modules.iter().enumerate() {
            if let Some(p) = parent_of(&m.path) {
                ch.entry(p).or_default().push(i);
            }
        }
        ch
    }

    /// A structural signature of the subtree at `i` (relative names, kinds, shapes, deltas), used
    /// to fold identical siblings.
    fn signature(&self, i: usize, ch: &BTreeMap<&str, Vec<usize>>) -> String {
        let m = &self.modules[i];
        let mut s = format!("{:?}{:?}{:?}", m.kind, m.shapes, m.deltas);
        for &c in ch.get(m.path.as_str()).map(|v| v.as_slice()).unwrap_or(&[]) {
            s.push('(');
            s.push_str(self.modules[c].name());
            s.push_str(&self.signature(c, ch));
            s.push(')');
        }
        s
    }

    /// The tree as text, OpenDelta style: folded repeats, counts per node, deltas marked `+`,
    /// trainable modules marked `*`, and a summary line.
    pub fn render(&self) -> String {
        let ch = self.children();
        let mut out = String::new();
        if let Some(root) = self.modules.iter().position(|m| m.path.is_empty()) {
            let m = &self.modules[root];
            out.push_str(&format!("root ({}) {}\n", self.model_type, fmt_count(m.params)));
            self.render_children(root, "", &ch, &mut out);
        }
        out.push_str(&format!("total parameters: {}\n", fmt_count(self.total_params)));
        if self.trainable_params > 0 {
            out.push_str(&format!(
                "trainable parameters: {} of {} ({:.4}%)\n",
                fmt_count(self.trainable_params),
                fmt_count(self.all_params),
                self.trainable_percent()
            ));
        }
        out
    }

    fn render_children(&self, i: usize, indent: &str, ch: &BTreeMap<&str, Vec<usize>>, out: &mut String) {
        let Some(kids) = ch.get(self.modules[i].path.as_str()) else { return };
        // Group consecutive siblings with identical subtrees.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for &k in kids {
            let sig = self.signature(k, ch);
            match groups.last_mut() {
                Some(g) if self.signature(g[0], ch) == sig => g.push(k),
                _ => groups.push(vec![k]),
            }
        }
        let n = groups.len();
        for (gi, g) in groups.iter().enumerate() {
            let last = gi + 1 == n;
            let (branch, next) = if last { ("└── ", "    ") } else { ("├── ", "│   ") };
            let first = &self.modules[g[0]];
            let name = group_name(g.iter().map(|&k| self.modules[k].name()).collect());
            let shapes = shape_list(&first.shapes);
            let mark = if first.deltas.iter().any(|d| d.enabled && !d.merged) { "*" } else { "" };
            let each = if g.len() > 1 { " each" } else { "" };
            out.push_str(&format!(
                "{indent}{branch}{name}{mark} ({}){}{} {}{each}\n",
                first.kind.as_str(),
                if shapes.is_empty() { "" } else { " " },
                shapes.join(" "),
                fmt_count(first.params)
            ));
            let child_indent = format!("{indent}{next}");
            let has_kids = ch.contains_key(first.path.as_str());
            for (di, d) in first.deltas.iter().enumerate() {
                let dlast = di + 1 == first.deltas.len() && !has_kids;
                let b = if dlast { "└── " } else { "├── " };
                let shapes = shape_list(&d.shapes);
                let state = if d.merged {
                    " merged"
                } else if !d.enabled {
                    " off"
                } else {
                    ""
                };
                out.push_str(&format!(
                    "{child_indent}{b}+ {} [{}] {} {} trainable{each}{state}\n",
                    d.name,
                    d.method,
                    shapes.join(" "),
                    fmt_count(d.params)
                ));
            }
            self.render_children(g[0], &child_indent, ch, out);
        }
    }
}

/// `weight:[384, 384] bias:[384]` — weights first, then the rest by name.
fn shape_list(shapes: &BTreeMap<String, Vec<usize>>) -> Vec<String> {
    let mut items: Vec<(&String, &Vec<usize>)> = shapes.iter().collect();
    items.sort_by_key(|(k, _)| (!k.ends_with("weight"), k.as_str()));
    items.into_iter().map(|(k, s)| format!("{k}:{s:?}")).collect()
}

/// `0-5` for consecutive integers, `query,key,value` otherwise.
fn group_name(names: Vec<&str>) -> String {
    if names.len() == 1 {
        return names[0].to_string();
    }
    let nums: Option<Vec<usize>> = names.iter().map(|n| n.parse().ok()).collect();
    if let Some(nums) = nums {
        if nums.windows(2).all(|w| w[1] == w[0] + 1) {
            return format!("{}-{}", nums[0], nums[nums.len() - 1]);
        }
    }
    names.join(",")
}

/// 22713216 -> "22,713,216".
pub fn fmt_count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_names() {
        assert_eq!(fmt_count(22713216), "22,713,216");
        assert_eq!(fmt_count(0), "0");
        assert_eq!(fmt_count(999), "999");
        assert_eq!(group_name(vec!["0", "1", "2"]), "0-2");
        assert_eq!(group_name(vec!["query", "key"]), "query,key");
        assert_eq!(group_name(vec!["0", "2"]), "0,2");
    }
}

/// Folds paths that differ only in their layer number: `encoder.layer.{0-5}.attention.self.query`.
/// Order of first appearance is kept.
pub fn fold_paths(paths: &[String]) -> Vec<String> {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for p in paths {
        let parts: Vec<&str> = p.split('.').collect();
        let pos = parts.windows(2).position(|w| w[0] == "layer" && w[1].parse::<usize>().is_ok());
        let (key, n) = match pos {
            Some(i) => {
                let mut k = parts.clone();
                k[i + 1] = "{}";
                (k.join("."), parts[i + 1].parse::<usize>().ok())
            }
            None => (p.clone(), None),
        };
        match (groups.iter_mut().find(|(k, _)| *k == key), n) {
            (Some((_, ns)), Some(n)) => ns.push(n),
            (None, Some(n)) => groups.push((key, vec![n])),
            (_, None) => groups.push((key, Vec::new())),
        }
    }
    groups
        .into_iter()
        .map(|(k, ns)| {
            if ns.is_empty() {
                return k;
            }
            let mut ranges: Vec<String> = Vec::new();
            let mut i = 0;
            while i < ns.len() {
                let mut j = i;
                while j + 1 < ns.len() && ns[j + 1] == ns[j] + 1 {
                    j += 1;
                }
                ranges.push(if i == j { ns[i].to_string() } else { format!("{}-{}", ns[i], ns[j]) });
                i = j + 1;
            }
            k.replace("{}", &format!("{{{}}}", ranges.join(",")))
        })
        .collect()
}

#[cfg(test)]
mod fold_tests {
    use super::fold_paths;

    #[test]
    fn folds_layers() {
        let p: Vec<String> = ["encoder.layer.0.a", "encoder.layer.1.a", "encoder.layer.3.a", "pooler.dense", "encoder.layer.0.b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(fold_paths(&p), vec!["encoder.layer.{0-1,3}.a", "pooler.dense", "encoder.layer.{0}.b"]);
    }
}
