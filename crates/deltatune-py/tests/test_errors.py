"""Errors raise the documented exceptions with the library's messages; no panic reaches Python."""

import pytest

import deltatune as dt
from deltatune import _native


def test_missing_model_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        dt.load(tmp_path / "nope", verbose=False)
    assert isinstance(e.value, dt.DeltaTuneError)
    assert "nope" in str(e.value)


def test_missing_adapter_dir_is_file_not_found(base, tmp_path):
    with pytest.raises(dt.DeltaTuneFileNotFoundError, match="nope"):
        dt.PeftModel.from_pretrained(base, tmp_path / "nope")


def test_unknown_config_field_is_a_type_error_with_a_suggestion():
    with pytest.raises(TypeError, match="did you mean `lora_alpha`"):
        dt.LoraConfig(lora_alpa=16)


def test_bad_spec_string_is_a_value_error():
    with pytest.raises(ValueError, match="did you mean `lora`") as e:
        dt.get_peft_model(dt.load(verbose=False), "lorra:r=8")
    assert isinstance(e.value, dt.DeltaTuneError)


def test_pattern_matching_nothing_names_the_pattern(base):
    with pytest.raises(dt.ConfigError, match="querry"):
        dt.get_peft_model(base, dt.LoraConfig(target_modules=["querry"]))


def test_bad_training_value_names_the_option(base, labelled, tmp_path):
    texts, labels = labelled
    m = dt.get_peft_model(base, dt.LoraConfig())
    with pytest.raises(dt.InvalidArgumentError, match="lr"):
        m.train(texts, labels=labels, output_dir=tmp_path / "r", verbose=False, lr=-1.0)
    with pytest.raises(ValueError, match="did you mean `max_steps`"):
        m.train(texts, labels=labels, output_dir=tmp_path / "r", verbose=False, max_step=3)
    with pytest.raises(FileNotFoundError):
        m.train("no/such/file.csv", output_dir=tmp_path / "r", verbose=False)
    assert not (tmp_path / "r").exists()


def test_bad_data_file_names_file_and_line(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": broken\n')
    m = dt.get_peft_model(base, dt.LoraConfig())
    with pytest.raises(dt.DataError, match=r"bad.jsonl:2"):
        m.train(str(bad), output_dir=tmp_path / "r", verbose=False)


def test_predict_without_head(base):
    m = dt.get_peft_model(base, dt.LoraConfig())
    with pytest.raises(dt.ConfigError, match="no task head"):
        m.predict(["x"])


def test_a_rust_panic_becomes_internal_error():
    with pytest.raises(dt.InternalError, match="test panic"):
        _native.raise_test_panic()


def test_hierarchy():
    assert issubclass(dt.InvalidArgumentError, ValueError)
    assert issubclass(dt.DeltaTuneFileNotFoundError, FileNotFoundError)
    for cls in (dt.ConfigError, dt.DataError, dt.FormatError, dt.AssetError, dt.InternalError, dt.NonFiniteError, dt.CancelledError):
        assert issubclass(cls, dt.DeltaTuneError)
