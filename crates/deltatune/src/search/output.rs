//! Writing a search's results: the structure as a delta config that `deltatune train
//! --delta-config` accepts, a table of every candidate (α, p, parameters, chosen), and a heatmap
//! (layers × positions, colour = p, chosen ones outlined) in PNG and SVG.

use super::run::SearchResult;
use super::space::Candidate;
use crate::delta::{DeltaSpec, TargetModules};
use crate::error::Result;
use crate::plot::{heatmap, Cell};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// Groups the chosen candidates into one spec per distinct method configuration, each targeting
/// the exact module paths.
pub fn structure(cands: &[Candidate], chosen: &[usize]) -> Vec<DeltaSpec> {
    let mut groups: Vec<(serde_json::Value, DeltaSpec)> = Vec::new();
    for &i in chosen {
        let c = &cands[i];
        let key = serde_json::to_value(&c.spec.config).unwrap_or_default();
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, s)) => {
                if let Some(TargetModules::List(l)) = &mut s.targets.target_modules {
                    l.push(c.path.clone());
                }
            }
            None => {
                let mut s = c.spec.clone();
                s.targets.target_modules = Some(TargetModules::List(vec![c.path.clone()]));
                groups.push((key, s));
            }
        }
    }
    // Unique, readable names: the method, numbered when a method appears twice.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    groups
        .into_iter()
        .map(|(_, mut s)| {
            let m = s.config.method().to_string();
            let k = counts.entry(m.clone()).or_insert(0);
            s.name = if *k == 0 { m.clone() } else { format!("{m}_{k}") };
            *k += 1;
            s
        })
        .collect()
}

/// Writes structure.json, candidates.tsv, candidates.json, search.json and heatmap.{png,svg}.
pub fn write(dir: &Path, cands: &[Candidate], r: &SearchResult, summary: serde_json::Value) -> Result<Vec<DeltaSpec>> {
    let specs = structure(cands, &r.selected);
    let doc = json!({ "deltas": specs.iter().map(|s| s.to_json()).collect::<Vec<_>>() });
    crate::io::write_json_atomic(&dir.join("structure.json"), &doc)?;
    let mut tsv = String::from("id\tmethod\tpath\tlayer\tposition\tparams\talpha\tp\tselected\n");
    let mut rows = Vec::new();
    for c in cands {
        let sel = r.selected.contains(&c.id);
        tsv.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{:.6}\t{:.6}\t{}\n",
            c.id,
            c.method,
            c.path,
            c.layer.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
            c.position,
            c.params,
            r.alphas[c.id],
            r.probs[c.id],
            sel
        ));
        rows.push(json!({"id": c.id, "method": c.method, "path": c.path, "layer": c.layer, "position": c.position,
                         "params": c.params, "alpha": r.alphas[c.id], "p": r.probs[c.id], "selected": sel}));
    }
    crate::io::write_atomic(&dir.join("candidates.tsv"), tsv.as_bytes())?;
    crate::io::write_json_atomic(&dir.join("candidates.json"), &rows)?;
    crate::io::write_json_atomic(&dir.join("search.json"), &summary)?;
    // Heatmap: rows = layers (then `emb` for modules outside the layers), columns = method@position.
    let mut cols: Vec<String> = Vec::new();
    for c in cands {
        let col = format!("{} {}", c.method.replace("low_rank_adapter", "lra").replace("ln_tuning", "lnfit"), c.position);
        if !cols.contains(&col) {
            cols.push(col);
        }
    }
    let layers = cands.iter().filter_map(|c| c.layer).max().map(|m| m + 1).unwrap_or(0);
    let mut rows_lbl: Vec<String> = (0..layers).map(|l| format!("layer {l}")).collect();
    let has_other = cands.iter().any(|c| c.layer.is_none());
    if has_other {
        rows_lbl.push("embeddings".into());
    }
    let cells: Vec<Cell> = cands
        .iter()
        .map(|c| {
            let col = format!("{} {}", c.method.replace("low_rank_adapter", "lra").replace("ln_tuning", "lnfit"), c.position);
            Cell {
                row: c.layer.unwrap_or(layers),
                col: cols.iter().position(|x| *x == col).unwrap_or(0),
                value: r.probs[c.id],
                marked: r.selected.contains(&c.id),
            }
        })
        .collect();
    let title = format!("S3Delta: p per candidate (outlined: chosen, {} params of budget {:.0})", r.selected_params, r.budget);
    for ext in ["png", "svg"] {
        heatmap(&dir.join(format!("heatmap.{ext}")), &title, &rows_lbl, &cols, &cells)?;
    }
    Ok(specs)
}
