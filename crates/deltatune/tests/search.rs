//! S3Delta on a tiny random BERT: gradients reach α and the candidate deltas, the first- and
//! second-order searches run end to end, the selection respects the budget, and the written
//! structure attaches exactly the chosen candidates.

use crate::common::*;
use deltatune::attach;
use deltatune::data::tokenize::Encoding;
use deltatune::delta::spec::parse_config_file;
use deltatune::head::{Head, HeadConfig, HeadKind};
use deltatune::search::gates::{GateConfig, Gates};
use deltatune::search::{output, prepare, search, SearchConfig, Space};
use deltatune::api::Control;
use deltatune::train::{Prepared, Scores};
use deltatune::artifacts::TaskModel;
use deltatune::{BertModel, ForwardCtx, Pooling};

fn tiny_task(n: usize) -> Prepared {
    let mut p = Prepared::default();
    for i in 0..n {
        let label = i % 2;
        let w = if label == 1 { 5 + (i % 4) as u32 } else { 15 + (i % 4) as u32 };
        p.encodings.push(Encoding { input_ids: vec![2, w, w + 1, 3], token_type_ids: vec![0; 4] });
        p.targets.push(label as f32);
    }
    p
}

fn accuracy(p: &[f32], g: &[f32]) -> deltatune::Result<Scores> {
    let acc = p.iter().zip(g).filter(|(a, b)| a == b).count() as f64 / g.len().max(1) as f64;
    Ok(Scores { primary: "accuracy".into(), values: [("accuracy".to_string(), acc)].into() })
}

fn tiny_model(dir: &std::path::Path) -> TaskModel {
    let backbone = BertModel::load(&write_tiny_model(dir, |_| {}), &cpu()).unwrap();
    let head = Head::new(HeadConfig { kind: HeadKind::Classification { num_labels: 2 }, pooling: Pooling::Mean, hidden_size: 8 }, 1, &cpu()).unwrap();
    TaskModel { backbone, head, specs: vec![] }
}

#[test]
fn space_m_and_gradients_reach_alpha_and_deltas() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = tiny_model(tmp.path());
    let cands = Space::mixed().unwrap().candidates(&mut model.backbone).unwrap();
    // 2 layers: 12 LoRA + (12 linear + 5 layer-norm) bias + 5 LN-fit + 4 low-rank adapters.
    assert_eq!(cands.len(), 12 + 17 + 5 + 4);
    assert_eq!(attach::count_trainable(&model.backbone), 0, "counting candidates leaves nothing attached");
    let lora_q = cands.iter().find(|c| c.method == "lora" && c.position == "q").unwrap();
    assert_eq!(lora_q.params, 16);
    prepare(&mut model, &cands, 3).unwrap();
    // Make every LoRA B non-zero so that every delta tensor has a gradient path.
    for (n, v) in attach::trainable_vars(&model.backbone) {
        if n.ends_with("lora_B.weight") {
            v.set(&(v.as_tensor().ones_like().unwrap() * 0.1).unwrap()).unwrap();
        }
    }
    let n: Vec<usize> = cands.iter().map(|c| c.params).collect();
    let total: usize = n.iter().sum();
    let gates = Gates::new(n, total as f64 * 0.3, GateConfig::default(), &cpu()).unwrap();
    let z = gates.sample(deltatune::ops::DropoutKey(1)).unwrap();
    let data = tiny_task(4);
    let (batch, targets) = data.batch(&[0, 1, 2, 3], model.head.config.kind, 0, &cpu()).unwrap();
    let logits = model.logits(&batch, &ForwardCtx::eval().with_gates(&z)).unwrap();
    let grads = model.head.loss(&logits, &targets).unwrap().backward().unwrap();
    let ga = grads.get(&gates.alpha).expect("α has a gradient").abs().unwrap().to_vec1::<f32>().unwrap();
    assert!(ga.iter().filter(|x| **x > 0.0).count() >= cands.len() - 2, "α gradient is mostly zero: {ga:?}");
    for (name, v) in attach::trainable_vars(&model.backbone) {
        assert!(grads.get(&v).is_some(), "no gradient for {name}");
    }
}

#[test]
fn first_and_second_order_searches_run_and_respect_the_budget() {
    for second_order in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let mut model = tiny_model(tmp.path());
        let cands = Space::lora().unwrap().candidates(&mut model.backbone).unwrap();
        let budget = 50.0;
        prepare(&mut model, &cands, 5).unwrap();
        let (train, dev) = (tiny_task(32), tiny_task(8));
        let cfg = SearchConfig { max_steps: Some(6), batch_size: 4, second_order, eval_every: Some(3), ..Default::default() };
        let out = tmp.path().join("out");
        let r = search(&mut model, &cands, budget, &train, Some(&dev), &accuracy, &cfg, &out, 0, &Control::silent()).unwrap();
        assert_eq!(r.steps, 6);
        assert!(r.selected_params as f64 <= budget && !r.selected.is_empty(), "{:?}", r.selected);
        assert!(r.alphas.iter().any(|a| a.abs() > 1e-6), "α never moved");
        let p_sum: f64 = r.probs.iter().zip(&cands).map(|(p, c)| p * c.params as f64).sum();
        assert!((p_sum - budget).abs() < 1.0, "expected parameters {p_sum} vs budget {budget}");
        // Written structure attaches exactly the chosen candidates.
        let specs = output::write(&out, &cands, &r, serde_json::json!({})).unwrap();
        let text = std::fs::read_to_string(out.join("structure.json")).unwrap();
        let (parsed, warnings) = parse_config_file(&text, "structure.json").unwrap();
        assert!(warnings.is_empty());
        assert_eq!(parsed, specs);
        let mut fresh = tiny_model(&tmp.path().join("fresh"));
        attach::attach(&mut fresh.backbone, &parsed, Default::default()).unwrap();
        assert_eq!(attach::count_trainable(&fresh.backbone), r.selected_params);
        for f in ["candidates.tsv", "candidates.json", "search.json", "heatmap.png", "heatmap.svg", "search_metrics.jsonl"] {
            assert!(out.join(f).is_file(), "{f}");
        }
    }
}

#[test]
fn bad_spaces_and_budgets() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = tiny_model(tmp.path());
    let space_file = tmp.path().join("space.json");
    std::fs::write(&space_file, r#"[{"method": "lora", "r": 1, "target_modules": ["query", "quary"]}]"#).unwrap();
    let (space, _) = Space::parse(space_file.to_str().unwrap()).unwrap();
    let e = space.candidates(&mut model.backbone).unwrap_err().to_string();
    assert!(e.contains("pattern `quary` matches no module"), "{e}");
    std::fs::write(&space_file, r#"[{"method": "prefix"}]"#).unwrap();
    let (space, _) = Space::parse(space_file.to_str().unwrap()).unwrap();
    let e = space.candidates(&mut model.backbone).unwrap_err().to_string();
    assert!(e.contains("prefix cannot be gated"), "{e}");
    let e = Space::parse("nonexistent.json").unwrap_err().to_string();
    assert!(e.contains("neither L, M nor an existing JSON file"), "{e}");
    let e = deltatune::search::Budget::parse("abc").unwrap_err().to_string();
    assert!(e.contains("invalid --budget"), "{e}");
    assert_eq!(deltatune::search::Budget::parse("0.0139%").unwrap().params(22_713_216).round(), 3157.0);
    let e = deltatune::search::gates::solve_shift(&[0.0; 3], &[10, 10, 10], 40.0, 1.0).unwrap_err().to_string();
    assert!(e.contains("budget 40 must be between 0 and the search space's 30 parameters"), "{e}");
}

/// The decoder search on the default decoder (SmolLM2, quantized base), SST-2 as text-to-text:
/// the decoder spaces cover every block linear (and, for M, the norms and block outputs), the
/// choice respects the budget, and the structure retrains with `train_lm`.
#[test]
fn decoder_search_finds_a_structure_that_retrains() {
    let (Some(model), Some(shared)) = (decoder_file(), shared_dir()) else { return };
    use deltatune::api::{self, LmData, SearchSpec, TrainLmSpec};
    use deltatune::data::sources::DataSource;
    use deltatune::data::task::TaskOptions;
    use deltatune::train::lm::LmTrainConfig;
    let tmp = tempfile::tempdir().unwrap();
    let root = shared.join("data");
    // Space M of the decoder: LoRA and BitFit on the 7 linears of 30 blocks, LN-fit on 61 norms,
    // adapters after 60 blocks.
    let mut spec = SearchSpec {
        model: Some(model.clone()),
        data: DataSource::Task { name: "sst2".into(), root: root.clone() },
        data_options: TaskOptions { max_train: Some(16), max_dev: Some(8), ..Default::default() },
        max_length: 48,
        budget: deltatune::search::Budget::parse("0.002%").unwrap(),
        space: Space::parse("M").unwrap().0,
        pooling: Pooling::Mean,
        config: SearchConfig { max_steps: Some(2), batch_size: 4, seed: 3, ..Default::default() },
        out: tmp.path().join("m"),
        overwrite: false,
        candidates_only: true,
    };
    let m = api::search(&spec, &Control::silent()).unwrap();
    assert_eq!(m.candidates, 210 + 210 + 61 + 60, "{m:?}");
    let cands: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("m/candidates.json")).unwrap()).unwrap();
    let labels: std::collections::BTreeSet<&str> = cands.as_array().unwrap().iter().map(|c| c["position"].as_str().unwrap()).collect();
    for l in ["q", "k", "v", "attn.o", "ffn.gate", "ffn.up", "ffn.down", "ln.attn", "ln.ffn", "ln.final", "attn.out", "ffn"] {
        assert!(labels.contains(l), "{l} missing from {labels:?}");
    }
    // A search of space L, two steps, and its retraining.
    spec.space = Space::parse("L").unwrap().0;
    spec.candidates_only = false;
    spec.out = tmp.path().join("l");
    let s = api::search(&spec, &Control::silent()).unwrap();
    assert_eq!(s.candidates, 210);
    assert!(s.selected >= 1 && (s.selected_params as f64) <= s.budget, "{s:?}");
    assert!(s.supernet_dev.is_some_and(|d| (0.0..=1.0).contains(&d)), "{s:?}");
    let text = std::fs::read_to_string(tmp.path().join("l/structure.json")).unwrap();
    let (specs, _) = parse_config_file(&text, "structure.json").unwrap();
    let targets: Vec<String> = specs.iter().flat_map(|s| s.to_json()["target_modules"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect::<Vec<_>>()).collect();
    assert_eq!(targets.len(), s.selected);
    assert!(targets.iter().all(|t| t.starts_with("model.layers.") && t.ends_with("_proj")), "{targets:?}");
    let r = api::train_lm(
        &TrainLmSpec {
            model: Some(model),
            deltas: specs,
            data: LmData::Task { name: "sst2".into(), root, template: None, verbalizer: None },
            max_train: Some(8),
            max_dev: Some(8),
            chat: false,
            config: LmTrainConfig { max_length: 48, batch_size: 4, ..Default::default() },
            baseline: false,
            out: None,
            overwrite: false,
        },
        &Control::silent(),
    )
    .unwrap();
    assert_eq!(r.trainable_params, s.selected_params);
    // Too small a budget is refused before any work, naming the flag.
    spec.budget = deltatune::search::Budget::parse("100").unwrap();
    spec.out = tmp.path().join("none");
    let e = api::search(&spec, &Control::silent()).unwrap_err().to_string();
    assert!(e.contains("--budget") && e.contains("cheapest candidate"), "{e}");
    assert!(!tmp.path().join("none").exists());
}
