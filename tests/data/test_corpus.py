import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanosae import DataConfig, DataError
from nanosae.data import iter_documents


def docs(*specs, **kw):
    return list(iter_documents(DataConfig(specs=list(specs), **({"split": "all"} | kw))))


def test_pydocs_one_document_per_topic():
    from pydoc_data.topics import topics

    got = docs("builtin:pydocs")
    expected = [topics[k] for k in sorted(topics) if topics[k].strip()]
    assert got == expected and len(got) > 50


def test_stdlib_is_python_source():
    import itertools

    first = list(itertools.islice(iter_documents(DataConfig(specs=["builtin:stdlib"], split="all")), 5))
    assert len(first) == 5 and any("import" in d or "def " in d for d in first)


def test_file_formats_dirs_and_globs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first doc\n\nsecond block")
    (tmp_path / "a" / "two.jsonl").write_text(
        json.dumps({"text": "json doc", "other": 1}) + "\n\n" + json.dumps({"text": "json two"}) + "\n"
    )
    pq.write_table(pa.table({"text": ["pq one", None, "pq two"], "id": [1, 2, 3]}), tmp_path / "a" / "three.parquet")
    assert docs(str(tmp_path / "a" / "one.txt")) == ["first doc\n\nsecond block"]
    assert docs(str(tmp_path / "a" / "one.txt"), txt_paragraphs=True) == ["first doc", "second block"]
    assert docs(str(tmp_path / "a" / "two.jsonl")) == ["json doc", "json two"]
    assert docs(str(tmp_path / "a" / "three.parquet")) == ["pq one", "pq two"]
    # directories are read recursively in sorted path order; globs likewise
    assert docs(str(tmp_path / "a")) == ["first doc\n\nsecond block", "pq one", "pq two", "json doc", "json two"]
    assert docs(str(tmp_path / "a" / "*.jsonl"), str(tmp_path / "a" / "one.txt")) == [
        "json doc",
        "json two",
        "first doc\n\nsecond block",
    ]


def test_custom_text_field_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "hello"}) + "\n")
    assert docs(str(f), text_field="body") == ["hello"]
    with pytest.raises(DataError, match=r"d.jsonl:1: no 'text' field \(set --text-field\)"):
        docs(str(f))
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match="no column 'text' \\(columns: content\\)"):
        docs(str(tmp_path / "p.parquet"))
    with pytest.raises(DataError, match="no such file"):
        docs(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unknown built-in corpus"):
        docs("builtin:nope")


def test_non_utf8_names_file_and_offset(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good text \xff more")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 at byte offset 10 \(use --encoding-errors replace"):
        docs(str(f))
    assert docs(str(f), encoding_errors="replace") == ["good text \ufffd more"]


def test_hf_datasets_streaming_on_local_files(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    assert docs(f"hf:json:{f}") == [f"doc {i}" for i in range(5)]


def test_split_holds_out_every_20th():
    every = docs("builtin:pydocs")
    train = docs("builtin:pydocs", split="train")
    held = docs("builtin:pydocs", split="eval")
    assert held == [d for i, d in enumerate(every) if i % 20 == 19]
    assert train == [d for i, d in enumerate(every) if i % 20 != 19]


def test_shuffle_is_a_seeded_permutation():
    base = docs("builtin:pydocs")
    a = docs("builtin:pydocs", shuffle_buffer=16, shuffle_seed=1)
    b = docs("builtin:pydocs", shuffle_buffer=16, shuffle_seed=1)
    c = docs("builtin:pydocs", shuffle_buffer=16, shuffle_seed=2)
    assert a == b and a != base and a != c and sorted(a) == sorted(base)


def test_text_that_is_not_a_string_is_an_error_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'text' is null, expected a string"):
        list(iter_documents(DataConfig(specs=[str(bad)], split="all")))
    bad.write_text('{"text": {"nested": 0}}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'text' is a dict"):
        list(iter_documents(DataConfig(specs=[str(bad)], split="all")))
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints.parquet: column 'text' holds int64 values, expected strings"):
        list(iter_documents(DataConfig(specs=[str(tmp_path / "ints.parquet")], split="all")))
