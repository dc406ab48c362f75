//! The library's layering, checked from its source: every `use` and inline `crate::`/`super::`
//! path of `src/` (tests excluded) is resolved to the file it names, then
//! 1. no file-level import cycle exists anywhere (a folder's `mod.rs` that re-exports a child
//!    counts as importing it, so children must import siblings directly, not through `super::X`);
//! 2. each top-level module imports only from modules of a lower layer (the table below, which
//!    ARCHITECTURE.md explains).
//!
//! Run alone: `cargo test -p deltatune --test main layers`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers, bottom first; a module may import modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["dist"],
    &["io", "ops", "control"],
    &["assets", "plot"],
    &["data"],
    &["core"],
    &["backbone", "delta"],
    &["attach"],
    &["head", "lm"],
    &["artifacts"],
    &["train"],
    &["search"],
    &["api"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Source with comments, string literals and the trailing `#[cfg(test)]` module removed.
fn code_of(src: &str) -> String {
    let src = match src.find("#[cfg(test)]") {
        Some(i) => &src[..i],
        None => src,
    };
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'r' if matches!(b.get(i + 1), Some(b'"') | Some(b'#')) && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) => {
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                j += 1;
                loop {
                    if j >= b.len() {
                        break;
                    }
                    if b[j] == b'"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&b'#')) {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                out.push_str("\"\"");
                i = j;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' if b.get(i + 2) == Some(&b'\'') || (b.get(i + 1) == Some(&b'\\') && b.get(i + 3) == Some(&b'\'')) => {
                // A char literal ('"' or '\n'); lifetimes ('a) are left alone.
                i += if b[i + 1] == b'\\' { 4 } else { 3 };
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    // Whitespace only matters in `x as y`; keep one space there, none elsewhere.
    let words: Vec<&str> = tree.split_whitespace().collect();
    let mut t = String::new();
    for (i, w) in words.iter().enumerate() {
        if i > 0 && (*w == "as" || words[i - 1] == "as") {
            t.push(' ');
        }
        t.push_str(w);
    }
    let Some(open) = t.find('{') else {
        return vec![t.split(" as ").next().unwrap_or(&t).to_string()];
    };
    let Some(close) = t.rfind('}') else { return Vec::new() };
    let prefix = &t[..open];
    let (mut parts, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for c in t[open + 1..close].chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if c == ',' && depth == 0 {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        parts.push(cur);
    }
    parts
        .into_iter()
        .flat_map(|p| if p == "self" { vec![prefix.trim_end_matches(':').to_string()] } else { expand(&format!("{prefix}{p}")) })
        .collect()
}

/// Every `crate::…`/`super::…` path a file refers to.
fn paths_of(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before_ok = i == 0 || !rest.as_bytes()[i - 1].is_ascii_alphanumeric() && rest.as_bytes()[i - 1] != b'_';
        let after = &rest[i + 4..];
        let end = after.find(';').unwrap_or(after.len());
        if before_ok {
            out.extend(expand(&after[..end]));
        }
        rest = &after[end.min(after.len())..];
    }
    // Inline paths (`crate::io::write_atomic(...)`).
    let b = code.as_bytes();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let i = from + i;
            from = i + start.len();
            if i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_' || b[i - 1] == b':') {
                continue;
            }
            let mut j = i;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b':') {
                j += 1;
            }
            out.push(code[i..j].trim_end_matches(':').to_string());
        }
    }
    out
}

struct Tree {
    /// Module path (segments) → file, relative to src/.
    files: BTreeMap<Vec<String>, String>,
}

impl Tree {
    fn module_of(rel: &str) -> Vec<String> {
        let mut parts: Vec<String> = rel.trim_end_matches(".rs").split('/').map(str::to_string).collect();
        if matches!(parts.last().map(String::as_str), Some("mod") | Some("lib")) {
            parts.pop();
        }
        parts
    }

    /// The file a path refers to: the longest module prefix that is a file.
    fn resolve(&self, segs: &[String]) -> Option<&String> {
        (0..=segs.len()).rev().find_map(|n| self.files.get(&segs[..n].to_vec()))
    }
}

fn rust_files(dir: &Path, root: &Path, out: &mut Vec<(String, PathBuf)>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, root, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push((p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/"), p));
        }
    }
}

/// File → files it imports.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut list = Vec::new();
    rust_files(&root, &root, &mut list);
    let tree = Tree { files: list.iter().map(|(rel, _)| (Tree::module_of(rel), rel.clone())).collect() };
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, path) in &list {
        let module = Tree::module_of(rel);
        let is_mod = rel.ends_with("mod.rs") || rel == "lib.rs";
        let code = code_of(&std::fs::read_to_string(path).unwrap());
        let edges = graph.entry(rel.clone()).or_default();
        for p in paths_of(&code) {
            let mut segs: Vec<String> = p.split("::").filter(|s| !s.is_empty()).map(str::to_string).collect();
            let abs = match segs.first().map(String::as_str) {
                Some("crate") => segs.split_off(1),
                Some("super") => {
                    // `super` of a file `a/b.rs` (module a::b) is `a`; of `a/mod.rs` (module a) is the root.
                    let mut base = module.clone();
                    let _ = is_mod;
                    while segs.first().map(String::as_str) == Some("super") {
                        base.pop();
                        segs.remove(0);
                    }
                    base.extend(segs);
                    base
                }
                _ => continue,
            };
            if let Some(target) = tree.resolve(&abs) {
                if target != rel && target != "lib.rs" {
                    edges.insert(target.clone());
                }
            }
        }
    }
    graph
}

/// Strongly connected components with more than one file (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct S<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut S<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        let g = s.g;
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = S { g: graph, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), next: 0, out: Vec::new() };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn top(file: &str) -> &str {
    file.split('/').next().unwrap_or(file).trim_end_matches(".rs")
}

#[test]
fn no_import_cycles_in_the_library() {
    let graph = import_graph();
    assert!(graph.len() > 50, "read only {} files", graph.len());
    let found = cycles(&graph);
    let mut report = String::new();
    for comp in &found {
        report.push_str(&format!("cycle: {}\n", comp.join(", ")));
        for a in comp {
            for b in &graph[a] {
                if comp.contains(b) {
                    report.push_str(&format!("  {a} -> {b}\n"));
                }
            }
        }
    }
    assert!(found.is_empty(), "{report}");
}

#[test]
fn modules_import_only_lower_layers() {
    let graph = import_graph();
    let mut bad = Vec::new();
    for (from, tos) in &graph {
        let m = top(from);
        if m == "lib" {
            continue;
        }
        let Some(lf) = layer_of(m) else {
            bad.push(format!("{from}: module `{m}` is missing from the layer table"));
            continue;
        };
        for to in tos {
            let t = top(to);
            if t == m {
                continue;
            }
            match layer_of(t) {
                Some(lt) if lt < lf => {}
                _ => bad.push(format!("{from} -> {to}: `{m}` (layer {lf}) may not import `{t}`")),
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_checker_sees_imports() {
    // Guards the parser itself: known edges must be found.
    let graph = import_graph();
    assert!(graph["artifacts/peft.rs"].contains("attach/mod.rs"), "{:?}", graph["artifacts/peft.rs"]);
    assert!(graph["delta/lora.rs"].contains("delta/method.rs"), "{:?}", graph["delta/lora.rs"]);
    assert!(graph["backbone/bert.rs"].iter().any(|f| f.starts_with("core/")), "{:?}", graph["backbone/bert.rs"]);
    assert_eq!(expand("a::{b, c::{d, e as f}, self}"), vec!["a::b", "a::c::d", "a::c::e", "a"]);
}
