"""llmctl.core.records: the one reader of record inputs, and how it fails."""

from __future__ import annotations

import pytest

from llmctl.core.records import iter_records, iter_texts, parse_hub_spec, read_labeled_records, record_format
from llmctl.errors import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.mark.parametrize("spec, kind", [
    ("a.parquet", "parquet"), ("a.PQ", "parquet"), ("a.csv", "csv"), ("a.csv.gz", "csv"), ("a.tsv", "tsv"),
    ("a.jsonl.gz", "jsonl"), ("a.ndjson", "jsonl"), ("a.txt", "txt"), ("README", "txt"), ("-", "txt"),
    ("hf:stanfordnlp/imdb@test", "hf"),
])
def test_the_format_goes_by_the_name(spec, kind):
    assert record_format(spec) == kind


def test_data_format_wins_over_the_name():
    assert record_format("rows.txt", "csv") == "csv"


def test_hub_specs():
    assert parse_hub_spec("hf:stanfordnlp/imdb") == parse_hub_spec("hf:stanfordnlp/imdb@train")
    spec = parse_hub_spec("hf:glue:sst2@validation")
    assert (spec.name, spec.config, spec.split) == ("glue", "sst2", "validation")
    with pytest.raises(DataError, match="expected hf:NAME"):
        parse_hub_spec("hf:a/b/c")


def test_a_value_that_is_not_a_string_names_its_row(tmp_path):
    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["fine", None, "fine"]}), path)
    with pytest.raises(DataError, match=r"n.parquet:row 2: 'text' must be a string, not null"):
        list(iter_texts(str(path), "text"))


def test_a_corrupt_row_group_is_a_data_error(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 50 for i in range(2000)]}), path, row_group_size=500)
    data = bytearray(path.read_bytes())
    data[2000:6000] = b"\xff" * 4000  # damage a column chunk, leaving the footer readable
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="c.parquet"):
        list(iter_texts(str(path), "text"))


def test_csv_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\nok,1\n\xff\xfe,0\n")
    with pytest.raises(DataError, match=r"bad.csv:3: not UTF-8"):
        list(iter_records(str(bad)))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="needs a header line"):
        list(iter_records(str(empty)))
    header = tmp_path / "h.csv"
    header.write_text("body,label\nx,1\n")
    with pytest.raises(DataError, match=r"h.csv: no column 'text'; it has: body, label"):
        list(iter_records(str(header), fields=["text"]))


def test_labeled_records_check_labels_like_jsonl(tmp_path):
    path = tmp_path / "l.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [1.5, 2.0]}), path)
    with pytest.raises(DataError, match=r"l.parquet:row 1: 'label' must be a string or an integer"):
        read_labeled_records(str(path), "text", "label")
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1], "id": ["x", "y"]}), path)
    assert read_labeled_records(str(path), "text", "label") == [("x", "a", "0", 1), ("y", "b", "1", 2)]


def test_a_saved_dataset_dict_needs_a_split_when_it_has_no_train(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    datasets.DatasetDict({"test": ds, "validation": ds}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match="pick a split with .*@SPLIT; it has: test, validation"):
        list(iter_texts(str(tmp_path / "dd"), "text"))
    assert [t for _, t in iter_texts(f"{tmp_path / 'dd'}@validation", "text")] == ["a", "b"]
