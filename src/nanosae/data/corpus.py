"""Text corpora as a deterministic stream of documents.

A spec is one of:
  builtin:pydocs    Python's bundled documentation (pydoc_data.topics), one document per topic
  builtin:stdlib    the standard library's .py files, one document per file (files that are not UTF-8 are skipped)
  a .txt / .jsonl / .parquet file, a directory of them (recursively, sorted), or a glob
  hf:NAME[:CONFIG] or org/name: a Hugging Face dataset, read in streaming mode (split "train");
  hf:json:FILES, hf:parquet:FILES, hf:text:FILES read local files through the same datasets code
Several specs are read one after the other. Documents are numbered in that order; every 20th one
(index % 20 == 19) is held out: split="train" skips them, split="eval" yields only them.
"""

from __future__ import annotations

import glob as globlib
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from nanosae.config import DataConfig
from nanosae.errors import DataError, FormatError
from nanosae.io import parse_json

HOLDOUT_EVERY = 20
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
LOCAL_BUILDERS = ("json", "parquet", "text", "csv")


def _pydocs() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _stdlib() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def _decode(data: bytes, path: Path, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 at byte offset {e.start} (use --encoding-errors replace to go on)"
        ) from None


def _txt(path: Path, opts: DataConfig) -> Iterator[str]:
    text = _decode(path.read_bytes(), path, opts.encoding_errors)
    if opts.txt_paragraphs:
        yield from (block.strip() for block in text.split("\n\n") if block.strip())
    else:
        yield text


def _jsonl(path: Path, opts: DataConfig) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            line = _decode(raw, path, opts.encoding_errors).strip()
            if not line:
                continue
            try:
                record = parse_json(line, f"{path}:{line_no}")
            except FormatError as e:
                raise DataError(str(e)) from None
            if not isinstance(record, dict) or opts.text_field not in record:
                raise DataError(f"{path}:{line_no}: no {opts.text_field!r} field (set --text-field)")
            text = record[opts.text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_no}: field {opts.text_field!r} is {_kind(text)}, expected a string")
            yield text


def _parquet(path: Path, opts: DataConfig) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if opts.text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {opts.text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    column_type = pf.schema_arrow.field(opts.text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(
            f"{path}: column {opts.text_field!r} holds {column_type} values, expected strings (set --text-field)"
        )
    for batch in pf.iter_batches(columns=[opts.text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _file(path: Path, opts: DataConfig) -> Iterator[str]:
    if path.suffix == ".jsonl":
        return _jsonl(path, opts)
    if path.suffix == ".parquet":
        return _parquet(path, opts)
    return _txt(path, opts)


def _hf_dataset(name: str, opts: DataConfig) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the Hugging Face dataset {name!r} needs the `datasets` package") from None
    path, _, config = name.removeprefix("hf:").partition(":")
    # hf:json:FILES / hf:parquet:FILES / hf:text:FILES read local files through a datasets builder
    kwargs = {"data_files": config} if path in LOCAL_BUILDERS else {"name": config or None}
    try:
        ds = datasets.load_dataset(path, split="train", streaming=True, **kwargs)
    except Exception as e:
        raise DataError(f"cannot open Hugging Face dataset {name!r}: {str(e).splitlines()[0]}") from None
    for record in ds:
        if opts.text_field not in record:
            raise DataError(f"dataset {name!r} has no {opts.text_field!r} field (set --text-field)")
        if not isinstance(record[opts.text_field], str):
            raise DataError(
                f"dataset {name!r}: field {opts.text_field!r} is {_kind(record[opts.text_field])}, expected a string"
            )
        yield record[opts.text_field]


def _kind(value: object) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def resolve(spec: str) -> list[Path] | None:
    """The files a local spec names (None when it is not local: a builtin or a HF dataset)."""
    if spec.startswith("builtin:") or spec.startswith("hf:"):
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no .txt, .md, .jsonl or .parquet files in this directory")
        return files
    if path.is_file():
        return [path]
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{spec}: the pattern matches no files")
        return files
    if "/" in spec and not spec.startswith(("/", ".", "~")) and not path.suffix:
        return None  # looks like a hub dataset name (org/name)
    raise DataError(f"{spec}: no such file or directory (and not builtin:pydocs, builtin:stdlib or hf:NAME)")


def _source(spec: str, opts: DataConfig) -> Iterator[str]:
    if spec == "builtin:pydocs":
        return _pydocs()
    if spec == "builtin:stdlib":
        return _stdlib()
    if spec.startswith("builtin:"):
        raise DataError(f"unknown built-in corpus {spec!r}; expected builtin:pydocs or builtin:stdlib")
    files = resolve(spec)
    if files is None:
        return _hf_dataset(spec, opts)
    return (doc for f in files for doc in _file(f, opts))


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Documents of all specs in order; split 'train'/'eval' drops/keeps every 20th; optional seeded shuffle buffer."""
    specs, split, shuffle_buffer, opts = cfg.specs, cfg.split, cfg.shuffle_buffer, cfg
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise DataError("no data given (expected at least one --data spec)")
    if split not in ("all", "train", "eval"):
        raise DataError(f"unknown split {split!r}; expected all, train or eval")

    def ordered() -> Iterator[str]:
        index = 0
        for spec in specs:
            for doc in _source(spec, opts):
                if not doc.strip():
                    continue
                held_out = index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
                index += 1
                if split == "all" or (split == "eval") == held_out:
                    yield doc

    if shuffle_buffer <= 1:
        yield from ordered()
        return
    rng = random.Random(cfg.shuffle_seed)
    buffer: list[str] = []
    for doc in ordered():
        buffer.append(doc)
        if len(buffer) >= shuffle_buffer:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer
