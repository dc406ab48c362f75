//! SentencePiece-style vocabularies as GGUF stores them (`tokenizer.ggml.model` = `llama`: pieces
//! with `▁` for spaces, scores, byte-fallback pieces `<0x41>`, control tokens), rebuilt as a
//! `tokenizers` BPE model the way transformers builds one from the same file, so token ids match:
//!
//! * merges are every split `(left, right)` of a piece whose halves are both pieces, ranked by the
//!   merged piece's score (Gemma: its position in the file, which is its merge order), longer left
//!   halves first on ties;
//! * text is normalized by replacing spaces with `▁` (no prefix space unless the file asks);
//!   characters no piece covers fall back to their UTF-8 bytes;
//! * control tokens (type 3) are special added tokens, user-defined ones (type 4) plain added
//!   tokens, both matched whole before the BPE;
//! * Gemma files store pieces of two or more spaces as real spaces; they are spelled with `▁`.

use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// Token types in GGUF (`tokenizer.ggml.token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The inputs: the file's pieces, scores and types, and the options it declares.
pub struct SpmVocab<'a> {
    pub tokens: &'a [&'a str],
    pub scores: &'a [f32],
    pub types: &'a [i64],
    /// Rank merges by position in the file instead of by score (Gemma).
    pub rank_by_position: bool,
    /// Spell all-space pieces with `▁` (Gemma).
    pub respell_spaces: bool,
    /// `tokenizer.ggml.add_space_prefix`: a `▁` before the text.
    pub add_space_prefix: bool,
    pub unk: Option<&'a str>,
}

/// The `tokenizer.json` document for `v`.
pub fn tokenizer_json(v: &SpmVocab) -> Value {
    let pieces: Vec<String> = v
        .tokens
        .iter()
        .map(|t| if v.respell_spaces && t.contains(' ') && t.trim().is_empty() { "\u{2581}".repeat(t.chars().count()) } else { (*t).to_string() })
        .collect();
    // Later duplicates win, as in a Python dict built in file order.
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(pieces.len());
    for (i, p) in pieces.iter().enumerate() {
        index.insert(p.as_str(), i);
    }
    // Each distinct piece once (at its first position, carrying its last index), in file order.
    let mut seen = std::collections::HashSet::with_capacity(pieces.len());
    let mut order: Vec<(&str, usize)> = Vec::with_capacity(index.len());
    for p in &pieces {
        if seen.insert(p.as_str()) {
            order.push((p.as_str(), index[p.as_str()]));
        }
    }
    let score_of = |i: usize| -> f64 {
        if v.rank_by_position {
            -(i as f64)
        } else {
            v.scores.get(i).copied().unwrap_or(0.0) as f64
        }
    };
    // (score, len(left), len(right), left, right): sorted best first, stable over file order.
    let mut merges: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for &(piece, i) in &order {
        let mut local: Vec<(&str, &str)> = Vec::new();
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if index.contains_key(l) && index.contains_key(r) {
                local.push((l, r));
            }
        }
        local.sort_by_key(|(l, r)| (index[l], index[r]));
        let s = score_of(i);
        merges.extend(local.into_iter().map(|(l, r)| (s, l.chars().count(), r.chars().count(), l, r)));
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    let merges: Vec<Value> = merges.into_iter().map(|(_, _, _, l, r)| json!([l, r])).collect();
    let mut vocab = Map::new();
    for &(p, i) in &order {
        vocab.insert(p.to_string(), json!(i));
    }
    let mut added = Vec::new();
    for (i, t) in v.tokens.iter().enumerate() {
        let ty = v.types.get(i).copied().unwrap_or(1);
        // A user-defined piece respelled away (all spaces) is no longer in the vocabulary.
        if ty == CONTROL || (ty == USER_DEFINED && index.get(t) == Some(&i)) {
            added.push(json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == CONTROL,
            }));
        }
    }
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if v.add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": v.unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": Value::Object(vocab), "merges": merges,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(tokens: &[&str], by_position: bool) -> tokenizers::Tokenizer {
        let scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
        let mut types = vec![1i64; tokens.len()];
        types[0] = CONTROL;
        let v = SpmVocab {
            tokens,
            scores: &scores,
            types: &types,
            rank_by_position: by_position,
            respell_spaces: true,
            add_space_prefix: false,
            unk: Some("<unk>"),
        };
        tokenizer_json(&v).to_string().parse().unwrap()
    }

    #[test]
    fn merges_follow_rank_and_bytes_fall_back() {
        let mut toks = vec!["<unk>", "a", "b", "c", "\u{2581}", "ab", "bc", "abc", "  "];
        let bytes: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
        toks.extend(bytes.iter().map(String::as_str));
        let t = build(&toks, true);
        // "ab" outranks "bc", then "abc" joins them; the space is `▁`; `é` falls back to two bytes.
        let ids = t.encode("abc  é", false).unwrap().get_ids().to_vec();
        let abc = 7;
        let spaces = 8; // "  " respelled as "▁▁"
        assert_eq!(&ids[..2], &[abc, spaces]);
        let e_bytes: Vec<u32> = "é".bytes().map(|b| 9 + b as u32).collect();
        assert_eq!(&ids[2..], e_bytes.as_slice());
        assert_eq!(t.decode(&ids, false).unwrap(), "abc  é");
        // Control tokens are matched whole.
        assert_eq!(t.encode("a<unk>b", false).unwrap().get_ids(), &[1, 0, 2]);
    }
}
