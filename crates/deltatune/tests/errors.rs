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

// ------------------------------------------------------------------------------------------------
// Delta methods: every bad input is a clear error.

mod deltas {
    use crate::common::*;
    use deltatune::attach::{self, AttachOptions};
    use deltatune::artifacts::delta_dir as store;
    use deltatune::delta::DeltaSpec;
    use deltatune::BertModel;

    fn tiny() -> (tempfile::TempDir, BertModel) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = write_tiny_model(&tmp.path().join("m"), |_| {});
        let m = BertModel::load(&dir, &cpu()).unwrap();
        (tmp, m)
    }

    fn attach_err(spec: &str) -> String {
        let (_t, mut m) = tiny();
        let s = match DeltaSpec::parse_cli(spec) {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        let e = attach::attach(&mut m, &[s], AttachOptions::default()).unwrap_err().to_string();
        assert_eq!(attach::count_trainable(&m), 0, "a failed attach must leave the model unchanged");
        e
    }

    #[test]
    fn bad_hyperparameters() {
        assert!(attach_err("lora:r=0").contains("lora: r must be at least 1"));
        assert!(attach_err("lora:lora_dropout=1.5").contains("lora_dropout 1.5 is not in [0, 1)"));
        let e = attach_err("compacter:phm_dim=3");
        assert!(e.contains("must both be multiples of phm_dim 3"), "{e}");
        let e = attach_err("adapter:non_linearity=sigmoidish");
        assert!(e.contains("invalid adapter config") && e.contains("sigmoidish"), "{e}");
        let e = attach_err("lora:r=4,r=5");
        assert!(e.contains("key `r` given twice"), "{e}");
    }

    #[test]
    fn unknown_method_and_key() {
        let e = attach_err("bitfitt");
        assert!(e.contains("unknown delta method `bitfitt` (did you mean `bitfit`?)"), "{e}");
        let e = attach_err("ia3:feedforward=output.dense");
        assert!(e.contains("unknown key `feedforward` for ia3"), "{e}");
    }

    #[test]
    fn pattern_matching_nothing_lists_nearest_paths() {
        let e = attach_err("lora:target=query+quer");
        assert!(e.starts_with("pattern `quer` matches no module (in delta `lora`); nearest valid paths: encoder.layer.0.attention.self.query"), "{e}");
        let e = attach_err("lora:target=query,layers=7");
        assert!(e.contains("pattern `query` matches no module inside layers [7]"), "{e}");
        let e = attach_err("lora:target=re:.*nonexistent.*");
        assert!(e.contains("pattern `re:.*nonexistent.*` matches no module"), "{e}");
    }

    #[test]
    fn method_on_wrong_kind_of_module() {
        let e = attach_err("lora:target=attention");
        assert!(e.contains("lora cannot attach to `encoder.layer.0.attention` (attention); it attaches to linear modules"), "{e}");
        assert!(e.contains("nearest valid paths:"), "{e}");
        let e = attach_err("prompt:target=query");
        assert!(e.contains("prompt cannot attach to `encoder.layer.0.attention.self.query` (linear)"), "{e}");
    }

    #[test]
    fn duplicate_names() {
        let (_t, mut m) = tiny();
        let specs = vec![DeltaSpec::parse_cli("lora").unwrap(), DeltaSpec::parse_cli("lora:target=key").unwrap()];
        let e = attach::attach(&mut m, &specs, AttachOptions::default()).unwrap_err().to_string();
        assert!(e.contains("two deltas are named `lora`"), "{e}");
    }

    #[test]
    fn delta_on_another_backbone_is_refused() {
        let (t, mut m) = tiny();
        let s = DeltaSpec::parse_cli("lora").unwrap();
        attach::attach(&mut m, std::slice::from_ref(&s), AttachOptions::default()).unwrap();
        let saved = t.path().join("delta");
        store::save(&saved, &m, &[s], &Default::default(), &Default::default()).unwrap();
        // A backbone with one weight changed.
        let other_dir = write_tiny_model(&t.path().join("other"), |map| {
            let w = map.get("encoder.layer.1.output.dense.weight").unwrap();
            let w2 = (w * 1.5).unwrap();
            map.insert("encoder.layer.1.output.dense.weight".into(), w2);
        });
        let mut other = BertModel::load(&other_dir, &cpu()).unwrap();
        let e = store::load(&saved, &mut other, AttachOptions::default()).unwrap_err().to_string();
        assert!(e.contains("this delta was trained on a different backbone"), "{e}");
        assert_eq!(attach::count_trainable(&other), 0);
    }

    #[test]
    fn truncated_or_inconsistent_delta_files() {
        let (t, mut m) = tiny();
        let s = DeltaSpec::parse_cli("lora:target=query+value").unwrap();
        attach::attach(&mut m, std::slice::from_ref(&s), AttachOptions::default()).unwrap();
        let saved = t.path().join("delta");
        store::save(&saved, &m, std::slice::from_ref(&s), &Default::default(), &Default::default()).unwrap();
        let weights = saved.join(store::WEIGHTS_FILE);
        let bytes = std::fs::read(&weights).unwrap();
        let mut fresh = BertModel::load(&write_tiny_model(&t.path().join("m2"), |_| {}), &cpu()).unwrap();
        std::fs::write(&weights, &bytes[..bytes.len() - 10]).unwrap();
        let e = store::load(&saved, &mut fresh, AttachOptions::default()).unwrap_err().to_string();
        assert!(e.contains("delta.safetensors: not a valid safetensors file"), "{e}");
        assert_eq!(attach::count_trainable(&fresh), 0);
        // The config names a module whose tensors are absent.
        std::fs::write(&weights, &bytes).unwrap();
        let cfg = saved.join(store::CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg).unwrap().replace("\"value\"", "\"key\"");
        std::fs::write(&cfg, text).unwrap();
        let e = store::load(&saved, &mut fresh, AttachOptions::default()).unwrap_err().to_string();
        assert!(e.contains("tensor `deltas.lora.encoder.layer.0.attention.self.key.lora_A.weight` is missing"), "{e}");
        assert_eq!(attach::count_trainable(&fresh), 0, "a failed load must leave the model unchanged");
        // Missing directory.
        let e = store::load(&t.path().join("nope"), &mut fresh, AttachOptions::default()).unwrap_err().to_string();
        assert!(e.ends_with("nope: delta directory not found"), "{e}");
    }
}
