//! Shared helpers: locating the model, the shared golden set and the in-repo fixtures.

use candle_core::{DType, Device, Tensor};
use deltatune::EncodedBatch;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `../shared` beside the repository (or `$DELTATUNE_SHARED`), if present.
pub fn shared_dir() -> Option<PathBuf> {
    let p = std::env::var_os("DELTATUNE_SHARED").map(PathBuf::from).unwrap_or_else(|| repo_root().join("../shared"));
    p.is_dir().then_some(p)
}

/// A file of the shared golden set, or `None` (with a printed reason) when it is absent.
pub fn golden(name: &str) -> Option<PathBuf> {
    match shared_dir().map(|d| d.join("golden").join(name)).filter(|p| p.exists()) {
        Some(p) => Some(p),
        None => {
            eprintln!("note: ../shared/golden/{name} not found; using the in-repo fixture or skipping");
            None
        }
    }
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The default model directory, fetched through the asset command on first use. `None` (with a
/// printed reason) when it cannot be fetched here.
pub fn model_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    asset(&DIR, "the default model", deltatune::assets::default_model)
}

/// An asset fetched once per test binary through `fetch` (the asset cache), or `None` with a
/// printed reason when it cannot be fetched here.
fn asset(cell: &OnceLock<Option<PathBuf>>, what: &str, fetch: fn(&mut dyn FnMut(&str)) -> deltatune::Result<PathBuf>) -> Option<PathBuf> {
    cell.get_or_init(|| match fetch(&mut |m| eprintln!("{m}")) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("SKIP: {what} is not available ({e})");
            None
        }
    })
    .clone()
}

/// Skips the calling test (returns) when the model is unavailable.
#[macro_export]
macro_rules! require_model {
    () => {
        match $crate::common::model_dir() {
            Some(d) => d,
            None => {
                eprintln!("SKIP {}: model unavailable", module_path!());
                return;
            }
        }
    };
}

/// Builds a batch from golden I64 tensors.
pub fn batch_from(ids: &Tensor, types: Option<&Tensor>, mask: &Tensor) -> EncodedBatch {
    let ids = ids.to_dtype(DType::U32).unwrap();
    let types = match types {
        Some(t) => t.to_dtype(DType::U32).unwrap(),
        None => ids.zeros_like().unwrap(),
    };
    let mask = mask.to_dtype(DType::F32).unwrap();
    let lengths = mask.sum(1).unwrap().to_vec1::<f32>().unwrap().iter().map(|&x| x as usize).collect();
    EncodedBatch { input_ids: ids, token_type_ids: types, attention_mask: mask, lengths }
}

/// Max |a - b| over rows of (b, t, h) restricted to the first `lengths[i]` positions.
pub fn max_diff_valid(a: &Tensor, b: &Tensor, lengths: &[usize]) -> f32 {
    let mut worst = 0f32;
    for (i, &n) in lengths.iter().enumerate() {
        let x = a.get(i).unwrap().narrow(0, 0, n).unwrap();
        let y = b.get(i).unwrap().narrow(0, 0, n).unwrap();
        worst = worst.max(max_diff(&x, &y));
    }
    worst
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub fn cpu() -> Device {
    Device::Cpu
}

/// Writes a tiny random BERT (2 layers, hidden 8, 2 heads) into `dir` — for tests of loading and
/// of error paths that need no real weights. `edit` may change the tensor map before writing.
pub fn write_tiny_model(
    dir: &std::path::Path,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, Tensor>),
) -> PathBuf {
    write_model_sized(dir, Sizes { hidden: 8, heads: 2, layers: 2, intermediate: 16, seed: 1 }, edit)
}

/// Sizes of a random test model.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub seed: u64,
}

/// Writes a random BERT of the given sizes (vocabulary 30, 32 positions) into `dir`.
pub fn write_model_sized(
    dir: &std::path::Path,
    sz: Sizes,
    edit: impl FnOnce(&mut std::collections::BTreeMap<String, Tensor>),
) -> PathBuf {
    use std::collections::BTreeMap;
    let (v, h, i, layers, pos) = (30usize, sz.hidden, sz.intermediate, sz.layers, 32usize);
    let dev = Device::Cpu;
    let mut seed = sz.seed * 1000;
    let mut t = |shape: &[usize]| {
        seed += 1;
        let key = deltatune::ops::DropoutKey(seed);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n as u64).map(|k| (key.uniform(k) - 0.5) * 0.4).collect();
        Tensor::from_vec(data, shape, &dev).unwrap()
    };
    let mut m: BTreeMap<String, Tensor> = BTreeMap::new();
    m.insert("embeddings.word_embeddings.weight".into(), t(&[v, h]));
    m.insert("embeddings.position_embeddings.weight".into(), t(&[pos, h]));
    m.insert("embeddings.token_type_embeddings.weight".into(), t(&[2, h]));
    let ln = |m: &mut BTreeMap<String, Tensor>, p: &str| {
        m.insert(format!("{p}.weight"), Tensor::ones(h, DType::F32, &dev).unwrap());
        m.insert(format!("{p}.bias"), Tensor::zeros(h, DType::F32, &dev).unwrap());
    };
    ln(&mut m, "embeddings.LayerNorm");
    for l in 0..layers {
        let p = format!("encoder.layer.{l}");
        for name in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"] {
            m.insert(format!("{p}.{name}.weight"), t(&[h, h]));
            m.insert(format!("{p}.{name}.bias"), t(&[h]));
        }
        m.insert(format!("{p}.intermediate.dense.weight"), t(&[i, h]));
        m.insert(format!("{p}.intermediate.dense.bias"), t(&[i]));
        m.insert(format!("{p}.output.dense.weight"), t(&[h, i]));
        m.insert(format!("{p}.output.dense.bias"), t(&[h]));
        ln(&mut m, &format!("{p}.attention.output.LayerNorm"));
        ln(&mut m, &format!("{p}.output.LayerNorm"));
    }
    m.insert("pooler.dense.weight".into(), t(&[h, h]));
    m.insert("pooler.dense.bias".into(), t(&[h]));
    edit(&mut m);
    std::fs::create_dir_all(dir).unwrap();
    deltatune::io::save_tensors(&dir.join("model.safetensors"), &m, None).unwrap();
    let config = serde_json::json!({
        "model_type": "bert", "vocab_size": v, "hidden_size": h, "num_hidden_layers": layers,
        "num_attention_heads": sz.heads, "intermediate_size": i, "hidden_act": "gelu",
        "max_position_embeddings": pos, "type_vocab_size": 2, "layer_norm_eps": 1e-12
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    dir.to_path_buf()
}

/// A batch of token ids for the tiny model.
pub fn tiny_batch() -> EncodedBatch {
    let ids = Tensor::new(&[[2u32, 5, 7, 9, 3, 0], [2, 11, 3, 0, 0, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1f32, 1., 1., 1., 1., 0.], [1., 1., 1., 0., 0., 0.]], &Device::Cpu).unwrap();
    EncodedBatch { token_type_ids: ids.zeros_like().unwrap(), input_ids: ids, attention_mask: mask, lengths: vec![5, 3] }
}

/// Gemma 3 270M (Q4_K_M GGUF), fetched like the other assets on first use (`setup --decoder
/// gemma3`); `None` with a printed reason when it cannot be fetched here.
pub fn gemma3_file() -> Option<PathBuf> {
    static F: OnceLock<Option<PathBuf>> = OnceLock::new();
    asset(&F, "Gemma 3", deltatune::assets::gemma3)
}

/// The default decoder's GGUF file, fetched through the asset command on first use.
pub fn decoder_file() -> Option<PathBuf> {
    static F: OnceLock<Option<PathBuf>> = OnceLock::new();
    asset(&F, "the default decoder", deltatune::assets::default_decoder)
}

/// Held by a test while it reads the kernels' profile (one table for the whole process), so that
/// tests running in parallel do not take each other's entries.
pub fn profile_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
