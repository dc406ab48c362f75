//! Chat templates rendered with minijinja against transformers' `apply_chat_template` (Jinja2)
//! on the same conversations (fixture from `tools/chat_template_reference.py`): SmolLM2's
//! template as its GGUF carries it, and our Gemma turn template.

use crate::common::{decoder_file, fixture};
use candle_core::Device;
use deltatune::lm::chat::{render, GEMMA_TEMPLATE};
use deltatune::lm::CausalLm;

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("chat_templates.json")).unwrap()).unwrap()
}

fn messages(case: &serde_json::Value) -> Vec<(String, String)> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap().to_string(), m["content"].as_str().unwrap().to_string()))
        .collect()
}

fn check(template: &str, cases: &serde_json::Value, bos: Option<&str>, eos: Option<&str>) -> usize {
    let mut n = 0;
    for case in cases.as_array().unwrap() {
        let owned = messages(case);
        let msgs: Vec<(&str, &str)> = owned.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = render(template, &msgs, gen, bos, eos).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "{msgs:?} (generation prompt {gen})");
        n += 1;
    }
    n
}

#[test]
fn gemma_template_renders_as_jinja2_does() {
    assert_eq!(check(GEMMA_TEMPLATE, &reference()["gemma3"], Some("<bos>"), Some("<eos>")), 6);
}

#[test]
fn smollm2_template_from_its_gguf_renders_as_jinja2_does() {
    let Some(f) = decoder_file() else { return };
    let lm = CausalLm::load(&f, &Device::Cpu).unwrap();
    let tpl = lm.tokenizer.chat_template().expect("SmolLM2's GGUF carries a chat template").to_string();
    assert!(tpl.contains("{%"), "a Jinja template");
    assert_eq!(check(&tpl, &reference()["smollm2"], Some("<|im_start|>"), Some("<|im_end|>")), 6);
    // chat_prompt is the template with the generation prompt.
    let first = &reference()["smollm2"][0];
    assert_eq!(lm.tokenizer.chat_prompt(&[("user", "What is the capital of France?")]).unwrap(), first["text"].as_str().unwrap());
}

/// The Gemma prompt starts with `<bos>`; encoding it adds no second one, and the ids equal
/// transformers' `apply_chat_template(tokenize=True)`.
#[test]
fn gemma_chat_prompt_ids_match_transformers() {
    let Some(f) = crate::common::gemma3_file() else {
        return;
    };
    let lm = CausalLm::load(&f, &Device::Cpu).unwrap();
    for case in reference()["gemma3"].as_array().unwrap() {
        let owned = messages(case);
        let msgs: Vec<(&str, &str)> = owned.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
        let text = if case["add_generation_prompt"].as_bool().unwrap() {
            lm.tokenizer.chat_prompt(&msgs).unwrap()
        } else {
            continue;
        };
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(lm.tokenizer.encode_start(&text).unwrap(), want, "{msgs:?}");
    }
}
