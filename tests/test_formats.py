"""Data formats through the real commands: Parquet, CSV/TSV, a `save_to_disk` directory and a cached `hf:`
dataset, read by llmctl.core.records in preprocess, classification training, eval and generate; and the bad inputs
(corrupt Parquet, a missing column, ragged CSV, an uncached dataset offline), each one `Error:` line, exit 1,
nothing written."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
from pathlib import Path

import pytest

from llmctl.core.records import iter_records, iter_texts, provenance, record_format
from llmctl.errors import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog, then rests." for i in range(120)]
LABELED = [("what a wonderful lovely film", "pos"), ("an awful boring dull film", "neg")] * 20


def _parquet(path: Path, columns: dict, row_group_size: int = 32) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def _csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _hub_cache(home: Path, name: str, rows: list[dict]) -> None:
    """What `datasets.load_dataset(name)` leaves in HF_HOME after one online load: a prepared Arrow cache, made
    here from a local JSON file (no network) and filed under the hub name."""
    src = home / "src.jsonl"
    home.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = datasets.load_dataset_builder("json", data_files={"train": str(src)}, cache_dir=str(home / "tmp"))
    builder.download_and_prepare()
    (built,) = [p for p in glob.glob(str(home / "tmp" / "json" / "*" / "*" / "*")) if os.path.isdir(p)]
    owner, short = name.split("/")
    dest = home / "datasets" / f"{owner}___{short}" / "default" / "0.0.0" / "cafe0123"
    shutil.copytree(built, dest)
    for arrow in dest.glob("json-*"):
        arrow.rename(dest / arrow.name.replace("json-", f"{short}-"))
    info = json.loads((dest / "dataset_info.json").read_text())
    info.update(config_name="default", dataset_name=short)
    (dest / "dataset_info.json").write_text(json.dumps(info))
    shutil.rmtree(home / "tmp")


def _one_error(result) -> str:
    assert result.code == 1, (result.code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# The reader


def test_each_format_yields_the_same_records_with_where_they_came_from(tmp_path):
    rows = [[t, str(i % 2)] for i, t in enumerate(TEXTS[:5])]
    specs = {
        "parquet": _parquet(tmp_path / "a.parquet", {"text": TEXTS[:5], "label": [r[1] for r in rows]}, 2),
        "csv": _csv(tmp_path / "a.csv", ["text", "label"], rows),
        "tsv": _csv(tmp_path / "a.tsv", ["text", "label"], rows, "\t"),
        "jsonl": tmp_path / "a.jsonl",
    }
    specs["jsonl"].write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    datasets.Dataset.from_dict({"text": TEXTS[:5], "label": [r[1] for r in rows]}).save_to_disk(tmp_path / "saved")
    specs["dataset"] = tmp_path / "saved"
    for kind, spec in specs.items():
        assert record_format(str(spec)) == kind
        got = list(iter_texts(str(spec), "text"))
        assert [t for _, t in got] == TEXTS[:5], kind
    assert [w for w, _ in iter_records(str(specs["parquet"]))][:3] == [f"{specs['parquet']}:row {i}" for i in (1, 2, 3)]
    assert [w for w, _ in iter_records(str(specs["csv"]))][0] == f"{specs['csv']}:2"  # line 1 is the header


def test_parquet_is_read_a_batch_at_a_time_and_hashed_like_any_input(tmp_path):
    path = _parquet(tmp_path / "big.parquet", {"text": TEXTS * 20, "n": list(range(len(TEXTS) * 20))}, 100)
    records = iter_records(str(path), fields=["text"])
    first = next(records)
    assert first == (f"{path}:row 1", {"text": TEXTS[0]})  # only the columns asked for
    assert sum(1 for _ in records) == len(TEXTS) * 20 - 1
    from llmctl.core.files import sha256_file

    assert provenance(str(path)) == {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}


def test_a_csv_cell_may_hold_a_whole_multi_line_document(tmp_path):
    doc = "line one\nline two, with a comma\n" + "x" * 200_000  # larger than csv's default field limit
    path = _csv(tmp_path / "long.csv", ["id", "text"], [["1", doc], ["2", "short"]])
    assert [t for _, t in iter_texts(str(path), "text")] == [doc, "short"]


def test_a_hub_dataset_reads_from_the_cache_offline_and_records_name_split_and_revision(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    _hub_cache(home, "someone/tiny", [{"text": t} for t in TEXTS[:4]])
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    assert [t for _, t in iter_texts("hf:someone/tiny@train", "text")] == TEXTS[:4]
    found = provenance("hf:someone/tiny")
    assert (found["dataset"], found["config"], found["split"], found["revision"]) == ("someone/tiny", None, "train",
                                                                                      "cafe0123")
    with pytest.raises(DataError, match="Bad split"):
        list(iter_texts("hf:someone/tiny@test", "text"))


# ---------------------------------------------------------------------------------------------------------------
# Through the commands


def test_preprocess_a_parquet_file_gives_the_shards_of_the_same_text_as_jsonl(tmp_path, llmctl):
    _parquet(tmp_path / "c.parquet", {"body": TEXTS, "id": list(range(len(TEXTS)))})
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    sets = ["--set", "tokenizer.vocab_size=256", "--set", "data.text_field=body", "--json"]
    a = llmctl("preprocess", str(tmp_path / "c.parquet"), "-o", str(tmp_path / "pq"), *sets)
    b = llmctl("preprocess", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "js"), *sets)
    assert a.code == b.code == 0, a.stderr + b.stderr
    for split in ("train.bin", "val.bin"):
        assert (tmp_path / "pq" / split).read_bytes() == (tmp_path / "js" / split).read_bytes()
    meta = json.loads((tmp_path / "pq" / "meta.json").read_text())
    from llmctl.core.files import sha256_file

    assert meta["inputs"][0]["sha256"] == sha256_file(tmp_path / "c.parquet")


def test_a_record_holding_blank_lines_stays_one_document(tmp_path, llmctl):
    # Records go to the workers as paragraphs when that splits back into the same documents, else as JSONL.
    texts = ["First part.\n\nSecond part of the same record.", "  ", "\nStarts with a break", "Plain."] * 30
    _parquet(tmp_path / "m.parquet", {"text": texts})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    sets = ["--set", "tokenizer.vocab_size=256", "--set", "data.val_fraction=0", "--json"]
    a = llmctl("preprocess", str(tmp_path / "m.parquet"), "-o", str(tmp_path / "pq"), *sets)
    b = llmctl("preprocess", str(tmp_path / "m.jsonl"), "-o", str(tmp_path / "js"), *sets)
    assert a.code == b.code == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["documents"] == json.loads(b.stdout)["documents"] == {"train": 90, "val": 0}
    assert (tmp_path / "pq" / "train.bin").read_bytes() == (tmp_path / "js" / "train.bin").read_bytes()


def test_preprocess_csv_saved_dataset_and_cached_hub_dataset(tmp_path, llmctl):
    _csv(tmp_path / "c.csv", ["text", "n"], [[t, i] for i, t in enumerate(TEXTS)])
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(tmp_path / "saved")
    home = tmp_path / "hf"
    _hub_cache(home, "someone/tiny", [{"text": t} for t in TEXTS])
    env = {"HF_HOME": str(home), "HF_DATASETS_CACHE": str(home / "datasets")}
    outputs = {}
    for name, spec in (("csv", tmp_path / "c.csv"), ("saved", tmp_path / "saved"), ("hub", "hf:someone/tiny")):
        r = llmctl("preprocess", str(spec), "-o", str(tmp_path / f"out-{name}"), "--set", "tokenizer.vocab_size=256",
                   env=env)
        assert r.code == 0, r.stderr
        outputs[name] = (tmp_path / f"out-{name}" / "train.bin").read_bytes()
    assert outputs["csv"] == outputs["saved"] == outputs["hub"]
    hub = json.loads((tmp_path / "out-hub" / "meta.json").read_text())["inputs"][0]
    assert (hub["dataset"], hub["split"], hub["revision"]) == ("someone/tiny", "train", "cafe0123")
    text = llmctl("preprocess", "hf:someone/tiny", "--to-text", env=env)
    assert text.code == 0 and text.stdout.splitlines() == TEXTS


@pytest.mark.slow
def test_classification_trains_on_parquet_and_evaluates_on_csv(tmp_path, llmctl, tiny_model_dir):
    texts, labels = zip(*LABELED)
    _parquet(tmp_path / "train.parquet", {"review": list(texts), "sentiment": list(labels)})
    _csv(tmp_path / "test.csv", ["review", "sentiment"], [list(r) for r in LABELED[:6]])
    fields = ["--set", "data.text_field=review", "--set", "data.label_field=sentiment"]
    out = tmp_path / "clf"
    r = llmctl("train", "--set", "train.task=classification", "--set", f"data.inputs=[{tmp_path / 'train.parquet'}]",
               "--set", f"model.pretrained={tiny_model_dir}", "--set", "train.max_steps=3", "--set",
               "train.batch_size=4", "--set", f"run.out_dir={out}", "--set", "run.threads=1", *fields, "-q")
    assert r.code == 0, r.stderr
    e = llmctl("eval", "-m", str(out), "-i", str(tmp_path / "test.csv"), *fields, "--json")
    assert e.code == 0, e.stderr
    result = json.loads(e.stdout)
    assert result["task"] == "classification" and result["metrics"]["examples"] == 6


def test_eval_scores_a_parquet_text_column_as_it_scores_the_same_jsonl(tmp_path, llmctl, tiny_model_dir):
    _parquet(tmp_path / "held.parquet", {"text": TEXTS[:10]})
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:10]))
    a = llmctl("eval", "-m", str(tiny_model_dir), "-i", str(tmp_path / "held.parquet"), "--json")
    b = llmctl("eval", "-m", str(tiny_model_dir), "-i", str(tmp_path / "held.jsonl"), "--json")
    assert a.code == b.code == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["metrics"] == json.loads(b.stdout)["metrics"]


def test_generate_reads_prompts_and_ids_from_a_parquet_column(tmp_path, llmctl, tiny_model_dir):
    _parquet(tmp_path / "p.parquet", {"prompt": ["Hello", "The fox"], "id": ["a", "b"], "source": ["x", "y"]})
    r = llmctl("generate", "-m", str(tiny_model_dir), "-i", str(tmp_path / "p.parquet"), "-n", "3", "--greedy",
               "-f", "jsonl")
    assert r.code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(row["id"], row["prompt"]) for row in rows] == [("a", "Hello"), ("b", "The fox")]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing written


def test_bad_inputs_fail_with_one_line_and_write_nothing(tmp_path, llmctl):
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1" + b"\x00" * 64)
    _parquet(tmp_path / "cols.parquet", {"body": TEXTS[:3], "id": [1, 2, 3]})
    (tmp_path / "ragged.csv").write_text("text,label\nfine,1\nshort\nfine,0\n")
    _parquet(tmp_path / "nulls.parquet", {"text": [f"row {i}" if i != 5 else None for i in range(10)]}, 4)
    _parquet(tmp_path / "ints.parquet", {"text": list(range(10))})
    cases = {
        "nulls.parquet": "nulls.parquet:row 6: 'text' must be a string, not null",  # in its second row group
        "ints.parquet": "ints.parquet: column 'text' holds int64, not text",
        "corrupt.parquet": "not a readable Parquet file",
        "cols.parquet": "no column 'text'; it has: body, id",
        "ragged.csv": "ragged.csv:3: 1 fields, but the header has 2 (text, label)",
        "hf:nobody/uncached": "dataset 'nobody/uncached' is not in the Hugging Face datasets cache",
    }
    env = {"HF_HOME": str(tmp_path / "empty-hf")}
    for spec, message in cases.items():
        arg = spec if spec.startswith("hf:") else str(tmp_path / spec)
        out = tmp_path / f"out-{spec.replace(':', '-').replace('/', '-')}"
        r = llmctl("preprocess", arg, "-o", str(out), "--set", "tokenizer.vocab_size=256", env=env)
        assert message in _one_error(r), spec
        assert not out.exists(), spec


def test_an_uncached_hub_dataset_fails_at_once_even_without_hf_hub_offline(tmp_path, llmctl):
    import time

    env = {"HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}
    started = time.perf_counter()
    r = llmctl("preprocess", "hf:nobody/uncached", "-o", str(tmp_path / "out"), env=env)
    assert "not in the Hugging Face datasets cache" in _one_error(r)
    assert time.perf_counter() - started < 20  # no half minute of retries
