//! Property tests (proptest) of the delta invariants over random model sizes, ranks, scales and
//! target patterns: zero-init identity, merged == unmerged, merge → unmerge restores the base
//! weights bit-exactly, save → load is bit-exact, planning is deterministic and only ever names
//! modules that exist and satisfy the pattern.

use crate::common::*;
use deltatune::attach::{self, AttachOptions};
use deltatune::artifacts::delta_dir as store;
use deltatune::core::init::Stream;
use deltatune::delta::DeltaSpec;
use deltatune::{Backbone, BertModel, ForwardCtx, Pooling};
use proptest::prelude::*;

const LEAVES: &[&str] = &["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense", "dense"];

fn sizes() -> impl Strategy<Value = Sizes> {
    (prop_oneof![Just((4usize, 1usize)), Just((8, 2)), Just((12, 3)), Just((12, 4))], 1usize..4, prop_oneof![Just(8usize), Just(16)], 0u64..1000)
        .prop_map(|((hidden, heads), layers, intermediate, seed)| Sizes { hidden, heads, layers, intermediate, seed })
}

fn targets() -> impl Strategy<Value = Vec<&'static str>> {
    proptest::sample::subsequence(LEAVES, 1..4)
}

fn model(sz: Sizes) -> (tempfile::TempDir, BertModel) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_model_sized(tmp.path(), sz, |_| {});
    let m = BertModel::load(&dir, &cpu()).unwrap();
    (tmp, m)
}

fn pooled(m: &dyn Backbone) -> candle_core::Tensor {
    m.forward(&tiny_batch(), &ForwardCtx::eval()).unwrap().pool(Pooling::Mean).unwrap()
}

fn randomize(m: &dyn Backbone, seed: u64) {
    for (name, v) in attach::trainable_vars(m) {
        v.set(&Stream::new(seed, &[&name]).normal(v.dims(), 0.0, 0.2, v.device()).unwrap()).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn zero_init_lora_is_identity(sz in sizes(), r in 1usize..5, alpha in 0.5f64..32.0, t in targets(), rs in any::<bool>()) {
        let (_d, mut m) = model(sz);
        let base = pooled(&m);
        let spec = DeltaSpec::parse_cli(&format!("lora:r={r},lora_alpha={alpha},use_rslora={rs},target={}", t.join("+"))).unwrap();
        attach::attach(&mut m, &[spec], AttachOptions { seed: sz.seed, tokenizer: None }).unwrap();
        prop_assert_eq!(max_diff(&pooled(&m), &base), 0.0);
    }

    #[test]
    fn merge_equals_unmerged_and_unmerge_restores(sz in sizes(), r in 1usize..5, alpha in 0.5f64..32.0, t in targets(),
                                                  method in prop_oneof![Just("lora"), Just("ia3"), Just("bitfit"), Just("ln_tuning")]) {
        let (_d, mut m) = model(sz);
        let spec = match method {
            "lora" => format!("lora:r={r},lora_alpha={alpha},target={}", t.join("+")),
            "ia3" => format!("ia3:target={}", t.join("+")),
            other => other.to_string(),
        };
        attach::attach(&mut m, &[DeltaSpec::parse_cli(&spec).unwrap()], AttachOptions::default()).unwrap();
        randomize(&m, sz.seed);
        let before: Vec<(String, Vec<f32>)> = m.sites().iter().flat_map(|s| s.params().iter()
            .map(|(n, t)| (format!("{}.{n}", s.path()), t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect::<Vec<_>>()).collect();
        let unmerged = pooled(&m);
        attach::merge_all(&mut m, true).unwrap();
        let merged = pooled(&m);
        let scale = unmerged.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
        prop_assert!(max_diff(&merged, &unmerged) <= 1e-5 * scale, "{spec}: {}", max_diff(&merged, &unmerged));
        attach::unmerge_all(&mut m);
        let after: Vec<(String, Vec<f32>)> = m.sites().iter().flat_map(|s| s.params().iter()
            .map(|(n, t)| (format!("{}.{n}", s.path()), t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect::<Vec<_>>()).collect();
        prop_assert_eq!(before, after);
    }

    #[test]
    fn save_load_is_bit_exact(sz in sizes(), t in targets(),
                              method in prop_oneof![Just("lora"), Just("ia3"), Just("adapter:bottleneck_size=2"), Just("prefix:num_virtual_tokens=2"), Just("bitfit")]) {
        let (d, mut m) = model(sz);
        let spec = if method == "lora" || method == "ia3" { format!("{method}:target={}", t.join("+")) } else { method.to_string() };
        let specs = vec![DeltaSpec::parse_cli(&spec).unwrap()];
        attach::attach(&mut m, &specs, AttachOptions::default()).unwrap();
        randomize(&m, sz.seed + 1);
        let out = d.path().join("saved");
        store::save(&out, &m, &specs, &Default::default(), &Default::default()).unwrap();
        let (_d2, mut fresh) = model(sz);
        store::load(&out, &mut fresh, AttachOptions::default()).unwrap();
        let (a, b) = (attach::trainable_vars(&m), attach::trainable_vars(&fresh));
        prop_assert_eq!(a.len(), b.len());
        for ((na, va), (nb, vb)) in a.iter().zip(&b) {
            prop_assert_eq!(na, nb);
            prop_assert_eq!(va.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vb.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        prop_assert_eq!(max_diff(&pooled(&m), &pooled(&fresh)), 0.0);
    }

    #[test]
    fn plans_are_deterministic_and_sound(sz in sizes(), t in targets(), layers in proptest::option::of(proptest::sample::subsequence(vec![0usize, 1, 2], 1..3))) {
        let (_d, m) = model(sz);
        let mut spec = DeltaSpec::parse_cli(&format!("lora:target={}", t.join("+"))).unwrap();
        spec.targets.layers_to_transform = layers.clone();
        let tree = m.tree();
        let p1 = attach::plan(&tree, std::slice::from_ref(&spec));
        let p2 = attach::plan(&tree, std::slice::from_ref(&spec));
        match (p1, p2) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(&a.entries, &b.entries);
                for e in &a.entries {
                    let info = tree.get(&e.path).expect("planned path exists");
                    prop_assert!(t.iter().any(|x| e.path == *x || e.path.ends_with(&format!(".{x}"))), "{} matches none of {:?}", e.path, t);
                    if let Some(ls) = &layers {
                        prop_assert!(info.layer.is_some_and(|l| ls.contains(&l)));
                    }
                }
                // Attaching twice yields identical names in identical order.
                let (_d1, mut m1) = model(sz);
                let (_d2, mut m2) = model(sz);
                attach::attach(&mut m1, std::slice::from_ref(&spec), AttachOptions::default()).unwrap();
                attach::attach(&mut m2, std::slice::from_ref(&spec), AttachOptions::default()).unwrap();
                let n1: Vec<String> = attach::trainable_vars(&m1).into_iter().map(|x| x.0).collect();
                let n2: Vec<String> = attach::trainable_vars(&m2).into_iter().map(|x| x.0).collect();
                prop_assert_eq!(n1, n2);
            }
            (Err(a), Err(b)) => {
                prop_assert_eq!(a.to_string(), b.to_string());
                // Only layer selections beyond the model may fail.
                prop_assert!(layers.is_some_and(|ls| ls.iter().all(|&l| l >= sz.layers)), "{a}");
            }
            _ => prop_assert!(false, "nondeterministic plan"),
        }
    }
}
