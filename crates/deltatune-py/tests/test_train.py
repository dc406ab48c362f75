"""Training from Python: progress, callback, silence, reload and predict identically, evaluate,
Ctrl-C leaving a resumable checkpoint."""

import os
import signal

import numpy as np
import pytest

import deltatune as dt

TINY = dict(max_steps=6, batch_size=8, max_length=32, lr=5e-3, eval_every=3, checkpoint_every=2, seed=3)


def tiny_model():
    m = dt.load(verbose=False)
    return dt.get_peft_model(m, dt.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), seed=3)


def test_train_reload_predict_identically(labelled, tmp_path, capsys):
    texts, labels = labelled
    m = tiny_model()
    steps = []
    result = m.train(texts, labels=labels, output_dir=tmp_path / "run", verbose=False, callback=steps.append, **TINY)
    assert capsys.readouterr().err == ""  # verbose=False prints nothing
    assert result["steps"] == 6 and result["metric"] == "accuracy"
    assert 0.0 <= result["score"] <= 1.0
    step_events = [e for e in steps if e["event"] == "step"]
    assert [e["step"] for e in step_events] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(e["loss"]) and e["total"] == 6 for e in step_events)
    assert any(e["event"] == "eval" for e in steps)

    queries = ["a superb and joyful film", "a tedious, awful disaster", ("pair text", "second segment")]
    preds = m.predict(queries)
    assert len(preds) == 3 and {p["label"] for p in preds} <= {"pos", "neg"}
    assert set(preds[0]["probabilities"]) == {"pos", "neg"}
    assert abs(sum(preds[0]["probabilities"].values()) - 1.0) < 1e-5

    # The trained run, reloaded on a fresh backbone, predicts the same.
    again = dt.PeftModel.from_pretrained(dt.load(verbose=False), tmp_path / "run")
    assert again.predict(queries) == preds
    # And through save_pretrained (deltatune format keeps the head).
    m.save_pretrained(tmp_path / "saved")
    third = dt.PeftModel.from_pretrained(dt.load(verbose=False), tmp_path / "saved")
    assert third.predict(queries) == preds

    ev = m.evaluate()
    assert ev["metric"] == "accuracy" and ev["examples"] > 0
    ev2 = again.evaluate(split="dev")
    assert ev2["score"] == ev["score"]


def test_progress_bar_by_default(labelled, tmp_path, capsys):
    texts, labels = labelled
    m = tiny_model()
    m.train(texts, labels=labels, output_dir=tmp_path / "run", **dict(TINY, max_steps=2, eval_every=None))
    err = capsys.readouterr().err
    assert "2/2" in err and "loss=" in err and "%|" in err


def test_data_forms_and_pandas(labelled, tmp_path):
    texts, labels = labelled
    m = tiny_model()
    pairs = list(zip(texts, labels))
    r1 = m.train(pairs, output_dir=tmp_path / "pairs", verbose=False, **dict(TINY, max_steps=1, eval_every=None))
    r2 = m.train({"text": texts, "label": labels}, output_dir=tmp_path / "cols", verbose=False, **dict(TINY, max_steps=1, eval_every=None))
    assert r1["train_examples"] == r2["train_examples"] > 0
    pd = pytest.importorskip("pandas")
    r3 = m.train(pd.DataFrame({"text": texts, "label": labels}), output_dir=tmp_path / "df", verbose=False, **dict(TINY, max_steps=1, eval_every=None))
    assert r3["train_examples"] == r1["train_examples"]


def test_ctrl_c_stops_with_a_resumable_checkpoint(labelled, tmp_path):
    texts, labels = labelled
    run = tmp_path / "run"
    m = tiny_model()
    sent = []

    def on_event(ev):
        # A real SIGINT to this test's own process, sent at step 2 from the callback (a thread
        # sending it raced the remaining steps on a loaded machine).
        if ev["event"] == "step" and ev["step"] >= 2 and not sent:
            sent.append(ev["step"])
            os.kill(os.getpid(), signal.SIGINT)

    opts = dict(TINY, max_steps=40, checkpoint_every=100, eval_every=None)
    # A process started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: install it for this test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            m.train(texts, labels=labels, output_dir=run, verbose=False, callback=on_event, **opts)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent == [2]
    state = run / "checkpoints" / "last" / "state.json"
    assert state.is_file(), "a cancelled run leaves its checkpoint"
    resumed = tiny_model().train(texts, labels=labels, output_dir=run, verbose=False, resume=True, **opts)
    assert resumed["steps"] == 40
    assert resumed["resumed_from"] is not None and 2 <= resumed["resumed_from"] < 40


def test_callback_error_stops_training(labelled, tmp_path):
    texts, labels = labelled

    def boom(ev):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        tiny_model().train(texts, labels=labels, output_dir=tmp_path / "run", verbose=False, callback=boom, **TINY)
