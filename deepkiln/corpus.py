"""Raw-text readers (txt / jsonl / Parquet, local or any pyarrow.fs URI), deterministic sharding,
atomic writes, and the built-in corpus.

Document ids are int64: `file_index << 32 | record`, where the file index comes from the run's
file registry (files in sorted order, new files numbered after the ones already prepared) and the
record is the jsonl line (1-based), Parquet row, or 0 for a txt file. Lower ids are older data.
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

BUILTIN = "builtin"
FORMATS = {".txt": "txt", ".md": "txt", ".rst": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
BINARY_SNIFF_BYTES = 8192


def doc_id(file_idx: int, record: int) -> int:
    return (file_idx << 32) | record


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path or a URI (s3://, gs://, file://, ...)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


def load_registry(prepare_dir: str) -> dict:
    """The prepare stage's file registry (files.json): every input file's index, and the shards of
    each generation (one per prepare run that found new files)."""
    raw = read_bytes(f"{prepare_dir}/files.json")
    return json.loads(raw) if raw is not None else {"files": {}, "generations": []}


def write_atomic(uri: str, data: bytes | pa.Table) -> None:
    """Write bytes or a Parquet table under a temporary name, then move it into place. On a local
    disk the file is fsynced before the rename and the folder after it, so that after a crash the
    path holds the old file or the whole new one."""
    fs, path = resolve(uri)
    folder = path.rsplit("/", 1)[0]
    fs.create_dir(folder, recursive=True)
    tmp = path + ".tmp"
    if isinstance(data, pa.Table):
        pq.write_table(data, tmp, filesystem=fs)
    else:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
    local = isinstance(fs, pafs.LocalFileSystem)
    if local:
        _fsync(tmp)
    fs.move(tmp, path)
    if local:
        _fsync(folder)


def replace_folder(tmp: Path, path: Path) -> None:
    """Put the complete folder `tmp` at `path` (replacing what is there) and sync the parent: a
    reader sees the old folder or the new one, never a mix (one rename each way)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bytes(uri: str) -> bytes | None:
    """The file's bytes, or None if it does not exist."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def read_table(uri: str) -> pa.Table | None:
    """A Parquet file as a table, or None if it does not exist."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return pq.read_table(path, filesystem=fs)


def read_records(uri: str, key: str, required: dict[str, str]) -> dict[str, list]:
    """Every column of a jsonl or Parquet file of records, as lists (None where a row lacks the
    field). `key` is the config key that named the file and `required` maps each column that must
    exist to the key that named it: a ValueError names them when the file or a column is missing."""
    data = read_bytes(uri)
    if data is None:
        raise ValueError(f"{key}={uri!r}: no such file")
    try:
        if uri.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        else:
            import pyarrow.json as pajson

            table = pajson.read_json(io.BytesIO(data))
    except pa.ArrowInvalid as e:
        raise ValueError(f"{key}={uri!r} is not readable as jsonl or Parquet: {e}") from None
    for column, column_key in required.items():
        if column not in table.column_names:
            raise ValueError(f"{column_key}={column!r}: {uri} has no such column (it has {table.column_names})")
    return table.to_pydict()


@dataclass(frozen=True)
class Split:
    """Part of one input file: the records whose number is `part` modulo `parts`."""
    file_idx: int
    uri: str
    relpath: str
    fmt: str
    size: int
    part: int = 0
    parts: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def list_inputs(uri: str, field: str = "data.input") -> tuple[list[tuple[str, str, int]], list[dict]]:
    """(uri, relpath, size) of every supported file under `uri`, sorted, and the skipped files;
    errors name `field`, the setting that gave the uri."""
    if uri == BUILTIN:
        return _builtin_files(), []
    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"{field}={uri!r}: no such file or directory")
    if info.type == pafs.FileType.File:
        infos, base = [info], root.rsplit("/", 1)[0]
    else:
        infos, base = fs.get_file_info(pafs.FileSelector(root, recursive=True)), root
    prefix = uri.split("://")[0] + "://" if "://" in uri else ""
    files, skipped = [], []
    for i in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        rel = i.path[len(base):].lstrip("/")
        if Path(i.path).suffix.lower() in FORMATS:
            files.append((prefix + i.path, rel, i.size))
        else:
            skipped.append({"file": rel, "error": f"unsupported file type (supported: {', '.join(FORMATS)})"})
    if not files:
        raise ValueError(f"{field}={uri!r}: no {'/'.join(FORMATS)} files found")
    return files, skipped


def plan_shards(files: list[tuple[str, str, int]], first_idx: int, num_shards: int) -> list[list[Split]]:
    """Spread files over shards by size (largest first onto the lightest shard). A file bigger than
    a shard's fair share is cut into parts by record number, so one big file still fans out."""
    if num_shards < 1:
        raise ValueError(f"data.num_shards={num_shards} must be >= 1")
    fair = max(1, sum(size for *_, size in files) // num_shards)
    splits = []
    for i, (uri, rel, size) in enumerate(files):
        fmt = "builtin" if uri.startswith(BUILTIN) else FORMATS[Path(rel).suffix.lower()]
        parts = 1 if fmt == "txt" else min(num_shards, -(-size // fair))
        splits += [Split(first_idx + i, uri, rel, fmt, size // parts, p, parts) for p in range(parts)]
    shards, loads = [[] for _ in range(num_shards)], [0] * num_shards
    for s in sorted(splits, key=lambda s: (-s.size, s.file_idx, s.part)):
        k = loads.index(min(loads))
        shards[k].append(s)
        loads[k] += s.size
    return [sorted(shard, key=lambda s: (s.file_idx, s.part)) for shard in shards]


def read_split(split: Split, text_field: str = "text") -> Iterator[dict]:
    """Documents {"id", "source", "text"} of one split, and problems {"file", "line"?, "error"}
    for records that cannot be read; a bad record never stops the rest."""
    if split.fmt == "builtin":
        records = _builtin_records(split.uri)
    else:
        fs, path = resolve(split.uri)
        with fs.open_input_stream(path) as f:
            data = f.read()
        if split.fmt == "parquet":
            records = _parquet_records(data, text_field, split.relpath)
        elif b"\x00" in data[:BINARY_SNIFF_BYTES]:
            records = [(0, {"file": split.relpath, "error": "binary file, skipped"})]
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                records = [(0, {"file": split.relpath, "error": f"not UTF-8 (byte {e.start}), skipped"})]
            else:
                records = [(0, text)] if split.fmt == "txt" else _jsonl_records(text, text_field, split.relpath)
    for record, text in records:
        if record % split.parts != split.part:
            continue
        if isinstance(text, dict):  # a problem, reported by the split that owns its record
            yield text
        else:
            yield {"id": doc_id(split.file_idx, record), "source": f"{split.relpath}:{record}", "text": text}


def _jsonl_records(text: str, field: str, rel: str) -> Iterator[tuple[int, str | dict]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield line_no, {"file": rel, "line": line_no, "error": f"malformed JSON: {e.msg}"}
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            yield line_no, {"file": rel, "line": line_no, "error": f"no string field {field!r}"}
            continue
        yield line_no, obj[field]


def _parquet_records(data: bytes, field: str, rel: str) -> Iterator[tuple[int, str | dict]]:
    try:
        table = pq.read_table(io.BytesIO(data), columns=[field])
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        yield 0, {"file": rel, "error": f"unreadable Parquet or no column {field!r}: {e}"}
        return
    for row, text in enumerate(table.column(field).to_pylist()):
        if isinstance(text, str):
            yield row, text
        else:
            yield row, {"file": rel, "line": row, "error": f"column {field!r} is not a string"}


# ------------------------------------------------------------------------------------ built-in corpus

def _stdlib_modules() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


ZH_TEXTS = Path(__file__).with_name("builtin_zh")
"""The built-in corpus's Chinese, about 300 KB: the Analects, the Classic of Poetry, the Songs of Chu
and Tang poems (public domain; each file names its source), one file each, documents separated by
blank lines (lines starting with # are comments)."""


def _builtin_files() -> list[tuple[str, str, int]]:
    """Python's language reference topics and the standard library's docstrings, on every machine,
    and classical Chinese shipped with deepkiln: the built-in corpus is bilingual."""
    from pydoc_data import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [(f"{BUILTIN}:pydoc_data", "pydoc_data/topics", Path(topics.__file__).stat().st_size)]
    files += [(f"{BUILTIN}:stdlib/{p.relative_to(root)}", f"stdlib/{p.relative_to(root)}", p.stat().st_size)
              for p in _stdlib_modules()]
    files += [(f"{BUILTIN}:zh/{p.stem}", f"zh/{p.stem}", p.stat().st_size) for p in sorted(ZH_TEXTS.glob("*.txt"))]
    return files


def _builtin_records(uri: str) -> Iterator[tuple[int, str]]:
    name = uri.split(":", 1)[1]
    if name.startswith("zh/"):
        lines = (ZH_TEXTS / f"{name.removeprefix('zh/')}.txt").read_text(encoding="utf-8").splitlines()
        text = "\n".join(line for line in lines if not line.startswith("#"))
        yield from enumerate((d.strip() for d in text.split("\n\n") if d.strip()), start=1)
        return
    if name == "pydoc_data":
        from pydoc_data.topics import topics

        yield from enumerate((topics[k] for k in sorted(topics)), start=1)
        return
    path = Path(sysconfig.get_paths()["stdlib"]) / name.removeprefix("stdlib/")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = (ast.get_docstring(n) for n in nodes)
    yield from enumerate((d for d in docs if d), start=1)
