//! Bad input gives a clear error naming the file, field or tensor — never a panic.

use crate::common::*;
use deltatune::{BertModel, Error};

fn load_err(dir: &std::path::Path) -> String {
    match BertModel::load(dir, &cpu()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tiny_model_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |_| {});
    let m = BertModel::load(&dir, &cpu()).unwrap();
    use deltatune::Backbone;
    // 30*8 + 32*8 + 2*8 + 16 + 2 * (4*72 + 16 + 16*8+16 + 8*16+8 + 16) + 72
    assert_eq!(m.num_params(), 240 + 256 + 16 + 16 + 2 * (288 + 16 + 144 + 136 + 16) + 72);
}

#[test]
fn missing_directory() {
    let err = load_err(std::path::Path::new("/nonexistent/deltatune-model"));
    assert!(err.contains("deltatune-model") && err.contains("model directory not found"), "{err}");
}

#[test]
fn missing_config_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |_| {});
    let cfg = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("num_attention_heads");
    std::fs::write(&cfg, v.to_string()).unwrap();
    let err = load_err(&dir);
    assert!(err.ends_with("config.json: missing field `num_attention_heads`"), "{err}");
}

#[test]
fn corrupt_and_truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |_| {});
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    // Truncated: the header promises more data than the file holds.
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("model.safetensors: not a valid safetensors file"), "{err}");
    // Garbage.
    std::fs::write(&weights, b"this is not a safetensors file at all").unwrap();
    let err = load_err(&dir);
    assert!(err.contains("model.safetensors: not a valid safetensors file"), "{err}");
    // Empty.
    std::fs::write(&weights, b"").unwrap();
    let err = load_err(&dir);
    assert!(err.contains("model.safetensors: not a valid safetensors file"), "{err}");
}

#[test]
fn missing_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |m| {
        m.remove("encoder.layer.1.attention.self.value.bias");
    });
    let err = load_err(&dir);
    assert!(err.ends_with("model.safetensors: tensor `encoder.layer.1.attention.self.value.bias` is missing"), "{err}");
}

#[test]
fn wrong_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |m| {
        let t = candle_core::Tensor::zeros((16, 9), candle_core::DType::F32, &cpu()).unwrap();
        m.insert("encoder.layer.0.intermediate.dense.weight".into(), t);
    });
    let err = load_err(&dir);
    assert!(
        err.ends_with("model.safetensors: tensor `encoder.layer.0.intermediate.dense.weight` has shape [16, 9], expected [16, 8]"),
        "{err}"
    );
}

#[test]
fn prefixed_names_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_model(tmp.path(), |m| {
        let old = std::mem::take(m);
        for (k, v) in old {
            m.insert(format!("bert.{k}"), v);
        }
    });
    BertModel::load(&dir, &cpu()).unwrap();
}

#[test]
fn non_utf8_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("texts.txt");
    std::fs::write(&p, b"fine\nalso fine\nbroken \xc3\x28 here\n").unwrap();
    let err = deltatune::data::lines::read_lines(Some(&p)).unwrap_err();
    assert!(matches!(err, Error::Text { line: 3, .. }), "{err:?}");
    assert!(err.to_string().ends_with("texts.txt:3: not valid UTF-8 (byte 8 of the line)"), "{err}");
}
