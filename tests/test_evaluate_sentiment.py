"""configs/sentiment.yaml and its data: the shipped example trains a classifier that `eval` then scores."""

import json
from pathlib import Path

import pytest

from llmctl.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_sentiment_data_is_labeled_and_disjoint():
    from llmctl.core.inputs import read_labeled

    train = read_labeled(REPO / "data/sentiment.jsonl")
    test = read_labeled(REPO / "data/sentiment-test.jsonl")
    assert len(train) == 300 and len(test) == 60
    for examples in (train, test):
        labels = [e.label for e in examples]
        assert {labels.count(label) for label in ("negative", "neutral", "positive")} == {len(examples) // 3}
    texts = [e.text for e in train + test]
    assert len(set(texts)) == len(texts)  # no sentence twice, none shared between training and test


def test_sentiment_config_loads():
    cfg = load_config(REPO / "configs/sentiment.yaml")
    assert cfg.train.task == "classification" and cfg.eval.task == "classification"
    assert cfg.data.inputs == ["data/sentiment.jsonl"] and cfg.eval.input == "data/sentiment-test.jsonl"
    assert set(cfg.eval.verbalizers) == {"negative", "neutral", "positive"}


@pytest.mark.slow
def test_sentiment_config_trains_then_evaluates(llmctl, tmp_path):
    run = f"run.out_dir={tmp_path / 'run'}"
    res = llmctl("train", "-c", "configs/sentiment.yaml", "--set", run, "--set", "train.max_steps=3", "-q",
                 cwd=REPO)
    assert res.code == 0, res.stderr
    res = llmctl("eval", "-c", "configs/sentiment.yaml", "--set", run, "--fail-under", "examples=60", cwd=REPO)
    assert res.code == 0, res.stderr
    result = json.loads(res.stdout)
    assert (result["task"], result["method"]) == ("classification", "head")
    assert result["labels"] == ["negative", "neutral", "positive"] and result["metrics"]["examples"] == 60
