"""Decoder generation (whole and streamed) and S3Delta search feeding get_peft_model."""

import pytest

import deltatune as dt


def test_generate_and_stream_agree():
    prompt = "The capital of France is"
    text = dt.generate(prompt, max_new_tokens=8)
    assert isinstance(text, str) and text
    stream = dt.generate(prompt, max_new_tokens=8, stream=True)
    pieces = list(stream)
    assert len(pieces) >= 2
    assert "".join(pieces) == text


def test_generate_bad_option_is_a_value_error():
    with pytest.raises(ValueError, match="top-p"):
        dt.generate("x", top_p=0.0)
    with pytest.raises(FileNotFoundError):
        dt.generate("x", model="no/such/model.gguf")


def test_search_result_feeds_get_peft_model(labelled, tmp_path):
    texts, labels = labelled
    base = dt.load(verbose=False)
    result = dt.search(base, texts, labels=labels, budget="0.05%", space="L", output_dir=tmp_path / "search", verbose=False, max_steps=2, batch_size=8, max_length=32)
    assert result["selected"] > 0 and result.structure  # candidates, grouped into delta groups
    assert (tmp_path / "search" / "structure.json").is_file()
    m = dt.get_peft_model(base, result)
    assert m.get_nb_trainable_parameters()[0] == result["selected_params"]
