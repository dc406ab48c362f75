//! Canonical short names for the common positions of BERT-family models, OpenDelta style
//! (`attn@.q@`, see OpenDelta's `utils/common_structures/bert.py`) and our own short forms
//! (`attn.q`, `ff.out`). Each compiles to full-match regexes over the module paths, so an alias never
//! catches more than it says (unlike the plain suffix `output.dense`, which in PEFT matches both
//! the attention and the feed-forward output projections).

const L: &str = r"encoder\.layer\.\d+";

/// The regexes an alias stands for, or `None` if `name` is not an alias.
pub fn expand(name: &str) -> Option<Vec<String>> {
    let one = |tail: &str| Some(vec![format!("{L}\\.{tail}")]);
    match name {
        "attn.q" | "q@" | "attn@.q@" => one(r"attention\.self\.query"),
        "attn.k" | "k@" | "attn@.k@" => one(r"attention\.self\.key"),
        "attn.v" | "v@" | "attn@.v@" => one(r"attention\.self\.value"),
        "attn.o" | "attn.proj" | "proj@" | "attn@.proj@" => one(r"attention\.output\.dense"),
        "ff.in" | "ff.w1" | "w1@" | "ff@.w1@" => one(r"intermediate\.dense"),
        "ff.out" | "ff.w2" | "w2@" | "ff@.w2@" => one(r"output\.dense"),
        "attn" | "attn@" => one("attention"),
        "attn.out" => one(r"attention\.output"),
        "ff" | "ff@" => Some(vec![format!(r"{L}\.intermediate"), format!(r"{L}\.output")]),
        "ln" | "layer_norm@" => Some(vec![format!(r"{L}\.attention\.output\.LayerNorm"), format!(r"{L}\.output\.LayerNorm")]),
        "ln.attn" => one(r"attention\.output\.LayerNorm"),
        "ln.ff" => one(r"output\.LayerNorm"),
        "layer" | "block@" => one(""),
        "embeddings@" => Some(vec![r"embeddings\.word_embeddings".to_string()]),
        _ => None,
    }
    .map(|v| v.into_iter().map(|r| r.trim_end_matches("\\.").to_string()).collect())
}

/// Every alias, for help texts.
pub const ALL: &[&str] = &[
    "attn.q", "attn.k", "attn.v", "attn.o", "ff.in", "ff.out", "attn", "attn.out", "ff", "ln", "ln.attn", "ln.ff", "layer",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_compile_to_regexes() {
        assert_eq!(expand("attn.q").unwrap(), vec![r"encoder\.layer\.\d+\.attention\.self\.query"]);
        assert_eq!(expand("layer").unwrap(), vec![r"encoder\.layer\.\d+"]);
        assert!(expand("query").is_none());
        for a in ALL {
            for r in expand(a).unwrap() {
                regex::Regex::new(&r).unwrap();
            }
        }
    }
}
