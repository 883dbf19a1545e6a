"""`llmctl eval` on labeled data: a classification head, and zero-shot scoring by a causal LM."""

import json

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from llmctl import evaluate
from llmctl.config import load_config
from llmctl.errors import DataError, ModelError

LABELS = ["negative", "neutral", "positive"]
EXAMPLES = [
    ("What a lovely morning.", "positive"),
    ("The train was late again.", "negative"),
    ("The shop opens at nine.", "neutral"),
    ("I adore this little café.", "positive"),
    ("The soup was cold and bland.", "negative"),
    ("The meeting is on Tuesday.", "neutral"),
    ("Brilliant, I'd buy it twice.", "positive"),
]


def _run(*sets, **values):
    return evaluate.run(load_config(None, list(sets), {f"eval.{k}": v for k, v in values.items()}), quiet=True)


@pytest.fixture()
def labeled(tmp_path):
    path = tmp_path / "labeled.jsonl"
    path.write_text("".join(json.dumps({"id": f"e{i}", "text": t, "label": y}) + "\n"
                            for i, (t, y) in enumerate(EXAMPLES)))
    return path


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer_dir):
    """A 2-layer GPT-2 with a 3-way classification head and named labels, as a `train.task: classification` run
    saves it."""
    from transformers import AutoModelForSequenceClassification, GPT2Config

    from llmctl.core.model import load_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=256, eos_token_id=256,
        pad_token_id=256, num_labels=3, id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    model = AutoModelForSequenceClassification.from_config(config)
    path = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(path)
    load_tokenizer(tokenizer_dir).save_pretrained(path)
    return path


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# Classification head


def test_head_metrics_agree_with_its_predictions_and_sklearn(classifier_dir, labeled, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "preds.jsonl"
    result = _run(model=str(classifier_dir), input=str(labeled), predictions_out=str(out), batch_size=3)
    assert (result["task"], result["method"]) == ("classification", "head")  # auto: the model has a head
    rows = _read_jsonl(out)
    assert [r["id"] for r in rows] == [f"e{i}" for i in range(len(EXAMPLES))]
    assert [r["gold"] for r in rows] == [y for _, y in EXAMPLES]
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    for row, (text, _) in zip(rows, EXAMPLES):
        assert set(row["scores"]) == set(LABELS)
        assert row["predicted"] == max(row["scores"], key=row["scores"].get)
        with torch.no_grad():  # one example alone, no padding: same log-probabilities
            alone = torch.log_softmax(model(torch.tensor([list(text.encode())])).logits[0], -1)
        assert [row["scores"][label] for label in LABELS] == pytest.approx(alone.tolist(), abs=1e-5)
    gold, pred = [r["gold"] for r in rows], [r["predicted"] for r in rows]
    assert result["metrics"]["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert result["metrics"]["f1_macro"] == pytest.approx(
        f1_score(gold, pred, labels=result["labels"], average="macro", zero_division=0))
    assert sum(map(sum, result["confusion_matrix"])) == len(EXAMPLES)


def test_head_rejects_labels_the_model_does_not_know(classifier_dir, tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("text\tlabel\nnice day\tpositive\ngrim day\tnegatve\n")
    with pytest.raises(DataError, match=r"bad\.tsv:3: label 'negatve' is not one of .*did you mean 'negative'"):
        _run(model=str(classifier_dir), input=str(path))


def test_head_needs_a_labeled_file_and_a_causal_lm_gets_a_zero_shot_hint(classifier_dir, tiny_model_dir, labeled):
    from llmctl.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.input: classification needs a labeled file"):
        _run(model=str(classifier_dir))
    with pytest.raises(ModelError, match="without a classification head.*--task zero-shot"):
        _run(model=str(tiny_model_dir), input=str(labeled), task="classification")
    with pytest.raises(ModelError, match="has a classification head"):
        _run(model=str(classifier_dir), input=str(labeled), task="lm")


def test_malformed_labeled_line_names_file_and_line(classifier_dir, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine", "label": "positive"}\n{"text": "oops", "label": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: invalid JSON"):
        _run(model=str(classifier_dir), input=str(path))


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot


def test_zero_shot_scores_each_verbalizer_after_the_prompt(tiny_model_dir, labeled, tmp_path):
    from llmctl.core.model import load_model

    out = tmp_path / "zs.jsonl"
    verbalizers = {"positive": " good", "negative": " bad", "neutral": " so-so"}
    sets = [f"eval.verbalizers.{label}={text}" for label, text in verbalizers.items()]
    result = _run(*sets, model=str(tiny_model_dir), input=str(labeled), task="zero_shot", predictions_out=str(out))
    assert (result["task"], result["method"]) == ("classification", "zero_shot")
    assert result["settings"]["verbalizers"] == verbalizers
    rows = _read_jsonl(out)
    model = load_model(tiny_model_dir).eval()
    text, _ = EXAMPLES[0]
    prompt = [256, *f"{text}\nSentiment:".encode()]  # <|endoftext|>, then the default template
    for label, verbalizer in verbalizers.items():
        ids = torch.tensor([prompt + list(verbalizer.encode())])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
        expected = sum(logprobs[len(prompt) - 1 + k, t].item() for k, t in enumerate(verbalizer.encode()))
        assert rows[0]["scores"][label] == pytest.approx(expected, abs=1e-4)
    for row in rows:
        assert row["predicted"] == max(row["scores"], key=row["scores"].get)
    assert result["metrics"]["accuracy"] == pytest.approx(accuracy_score([r["gold"] for r in rows],
                                                                         [r["predicted"] for r in rows]))

    # Length normalisation divides each score by its verbalizer's token count.
    normed = tmp_path / "normed.jsonl"
    _run(*sets, "eval.length_norm=true", model=str(tiny_model_dir), input=str(labeled), task="zero_shot",
         predictions_out=str(normed))
    first = _read_jsonl(normed)[0]["scores"]
    assert first["neutral"] == pytest.approx(rows[0]["scores"]["neutral"] / len(" so-so"))


def test_zero_shot_without_verbalizers_uses_the_labels_of_the_data(tiny_model_dir, labeled):
    template = "Review: {text}\nIt was"
    result = _run(model=str(tiny_model_dir), input=str(labeled), task="zero_shot", prompt_template=template)
    assert result["settings"]["verbalizers"] == {label: f" {label}" for label in LABELS}
    assert result["settings"]["prompt_template"] == "Review: {text}\nIt was"
    assert result["metrics"]["examples"] == len(EXAMPLES)


def test_zero_shot_label_missing_from_the_verbalizer_map(tiny_model_dir, labeled):
    with pytest.raises(DataError, match=r"labeled\.jsonl:3: label 'neutral' has no verbalizer in eval\.verbalizers"):
        _run("eval.verbalizers.positive= good", "eval.verbalizers.negative= bad", model=str(tiny_model_dir),
             input=str(labeled), task="zero_shot")


def test_cli_zero_shot_with_a_per_class_gate(llmctl, tiny_model_dir, labeled):
    res = llmctl("eval", "-m", str(tiny_model_dir), "-i", str(labeled), "--task", "zero-shot",
                 "--verbalizer", "positive= good", "--verbalizer", "negative= bad", "--verbalizer", "neutral= ok",
                 "--fail-under", "recall:positive=1.01", "--fail-over", "examples=100")
    assert res.code == 3, res.stderr
    result = json.loads(res.stdout)
    assert [g["metric"] for g in result["gates"]["failed"]] == ["recall:positive"]
    assert result["gates"]["checked"][1]["passed"]
    assert "confusion matrix" in res.stderr


def test_class_gate_on_a_causal_lm_suggests_zero_shot(tiny_model_dir, labeled):
    with pytest.raises(ModelError, match="f1:positive is a classification metric.*--task zero-shot"):
        _run("eval.fail_under.f1:positive=0.5", model=str(tiny_model_dir), input=str(labeled))
