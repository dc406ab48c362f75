"""Loading, PEFT's adapter calls and their parameter counts, embeddings against PEFT's and the
CLI's, PEFT adapter folders, save/load round trips, merging."""

import os
import subprocess

import numpy as np
import pytest

import deltatune as dt
from conftest import read_safetensors


def test_load_tree_and_counts(base):
    text = str(base)
    assert "encoder" in text and "attention" in text
    # all-MiniLM-L6-v2 as transformers counts it (PEFT's "all params" minus the LoRA below).
    assert base.num_parameters() == 22_713_216
    assert base.config["hidden_size"] == 384 and base.config["num_layers"] == 6


def test_lora_counts_match_peft(base, capsys):
    # PEFT 0.21.2 on AutoModel: get_nb_trainable_parameters() == (73728, 22786944).
    m = dt.get_peft_model(base, dt.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="FEATURE_EXTRACTION"))
    assert m.get_nb_trainable_parameters() == (73_728, 22_786_944)
    m.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == "trainable params: 73,728 || all params: 22,786,944 || trainable%: 0.3236"
    assert m.num_parameters(only_trainable=True) == 73_728


def test_ia3_counts_match_peft(base):
    # PEFT 0.21.2: IA3Config(target_modules=["key","value","output.dense"], feedforward_modules=["output.dense"]) → (16128, 22729344).
    m = dt.get_peft_model(base, dt.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]))
    assert m.get_nb_trainable_parameters() == (16_128, 22_729_344)


@pytest.mark.parametrize(
    "config, trainable",
    [
        # PEFT's counts at these settings on all-MiniLM-L6-v2 (query and value of 6 layers).
        (lambda: dt.LoraConfig(use_dora=True, target_modules=["query", "value"]), 78_336),
        (lambda: dt.VeraConfig(target_modules=["query", "value"]), 7_680),
        (lambda: dt.LoHaConfig(target_modules=["query", "value"]), 147_456),
        (lambda: dt.LoKrConfig(target_modules=["query", "value"]), 7_680),
        (lambda: dt.OFTConfig(target_modules=["query", "value"]), 71_424),
        (lambda: dt.AdaLoraConfig(target_modules=["query", "value"], total_step=100), 110_736),
    ],
)
def test_more_peft_configs_count_as_peft(base, config, trainable):
    cfg = config()
    m = dt.get_peft_model(base, cfg)
    assert m.get_nb_trainable_parameters()[0] == trainable, cfg


def test_use_dora_switches_lora_to_dora():
    assert dt.LoraConfig(use_dora=True).method == "dora"
    assert dt.LoraConfig(use_dora=False).method == "lora"
    with pytest.raises(ValueError, match="use_dora"):
        dt.LoraConfig(use_dora="yes")


def test_spec_strings_and_dicts_are_configs(base):
    m = dt.get_peft_model(base, "lora:r=8,target=query+value")
    assert m.get_nb_trainable_parameters()[0] == 73_728
    m.add_adapter("bias", {"method": "bitfit"})
    assert m.active_adapters == ["default", "bias"]
    assert isinstance(m.peft_config["default"], dt.PeftConfig)
    assert m.peft_config["default"].r == 8


def test_adapter_switching(base):
    texts = ["switching adapters", "on and off"]
    plain = base.embed(texts)
    m = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    with_lora = m.embed(texts)
    assert np.abs(with_lora - plain).max() > 1e-4
    with m.disable_adapter():
        np.testing.assert_array_equal(m.embed(texts), plain)
    np.testing.assert_array_equal(m.embed(texts), with_lora)
    m.add_adapter("other", dt.IA3Config())
    m.set_adapter("default")
    assert m.active_adapters == ["default"] and m.active_adapter == "default"
    np.testing.assert_array_equal(m.embed(texts), with_lora)
    m.delete_adapter("default")
    assert m.peft_config.keys() == {"other"}
    assert m.get_nb_trainable_parameters()[0] == 0  # "other" is attached but off
    with pytest.raises(ValueError, match="no adapter named `gone`"):
        m.set_adapter("gone")


def test_embed_shape_dtype_and_normalisation(base):
    e = base.embed(["one", "two", "three"])
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    raw = base.embed("one", normalize=False)
    assert raw.shape == (1, 384)
    np.testing.assert_allclose(raw[0] / np.linalg.norm(raw[0]), e[0], atol=1e-6)


def test_base_embeddings_match_sentence_transformers(base, golden, manifest):
    ref = read_safetensors(golden / "minilm_forward.safetensors")
    e = base.embed(manifest["batch_sentences"], max_length=manifest["batch_max_len"])
    assert np.abs(e - ref["sentence_embedding"]).max() < 1e-5


def test_peft_lora_folder_matches_peft(base, golden, manifest):
    m = dt.PeftModel.from_pretrained(base, golden / "peft_lora_minilm")
    assert m.get_nb_trainable_parameters()[0] == 73_728
    ref = read_safetensors(golden / "lora_outputs.safetensors")
    e = m.embed(manifest["batch_sentences"], max_length=manifest["batch_max_len"], normalize=False)
    assert np.abs(e - ref["mean_pooled"]).max() < 2e-5
    merged = m.merge_and_unload()
    assert not isinstance(merged, dt.PeftModel) or merged.get_nb_trainable_parameters()[0] == 0
    e2 = merged.embed(manifest["batch_sentences"], max_length=manifest["batch_max_len"], normalize=False)
    assert np.abs(e2 - ref["merged.mean_pooled"]).max() < 2e-5


def test_peft_ia3_folder_matches_peft(base, golden, manifest):
    m = dt.PeftModel.from_pretrained(base, golden / "peft_ia3_minilm")
    ref = read_safetensors(golden / "ia3_outputs.safetensors")
    e = m.embed(manifest["batch_sentences"], max_length=manifest["batch_max_len"], normalize=False)
    assert np.abs(e - ref["mean_pooled"]).max() < 2e-5


@pytest.mark.skipif(not os.environ.get("DELTATUNE_CLI"), reason="DELTATUNE_CLI (the deltatune binary) not set; scripts/test.sh sets it")
def test_embeddings_equal_the_cli(base, golden):
    texts = ["The same inputs give the same vectors.", "Café au lait, naïve résumé!", "short"]
    adapter = golden / "peft_lora_minilm"
    out = subprocess.run(
        [os.environ["DELTATUNE_CLI"], "embed", "--delta", str(adapter), "--normalize", "--max-length", "128"],
        input="\n".join(texts) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    cli = np.array([[float(x) for x in line.strip("[]").split(",")] for line in out.stdout.splitlines()], dtype=np.float32)
    m = dt.PeftModel.from_pretrained(base, adapter)
    np.testing.assert_array_equal(m.embed(texts, max_length=128), cli)


def test_save_pretrained_round_trips_both_formats(base, tmp_path):
    texts = ["round trip", "through files"]
    m = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False), seed=7)
    want = m.embed(texts)
    for fmt, marker in (("deltatune", "delta_config.json"), ("peft", "adapter_config.json")):
        out = tmp_path / fmt
        m.save_pretrained(out, save_format=fmt)
        assert (out / marker).is_file()
        again = dt.PeftModel.from_pretrained(dt.load(verbose=False), out)
        np.testing.assert_allclose(again.embed(texts), want, atol=1e-6)


def test_save_merged_writes_a_plain_model(base, tmp_path):
    texts = ["merged weights", "equal the adapter"]
    m = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False))
    want = m.embed(texts)
    m.save_merged(tmp_path / "merged")
    plain = dt.load(tmp_path / "merged", verbose=False)
    np.testing.assert_allclose(plain.embed(texts), want, atol=2e-5)
    np.testing.assert_array_equal(m.embed(texts), want)  # the model in memory is unchanged


def test_methods_listing():
    names = {m["name"] for m in dt.methods()}
    assert {"lora", "ia3", "prefix", "prompt", "adapter", "compacter", "bitfit", "ln_tuning"} <= names
