"""Tokenized-data cache: each data file is rendered to tokens once; re-runs read the tokens back.

Rendering 100k conversations takes seconds to minutes; reading their tokens back takes a fraction
of a second. An entry is keyed by everything that decides the tokens:

    the file's content (sha256), the record layout and on_error, the chat format and train_on,
    max_seq_len and the too_long policy, the tokenizer (sha256 of its tokenizer.json text and
    its special tokens), and CACHE_VERSION (bumped when rendering changes)

so an edited file, another tokenizer or another policy is a miss, never a stale hit. Moving or
renaming the file is a hit: the content is the same.

An entry is two files named by the key:

    <key>.safetensors   input_ids, labels: int32, every example end to end;
                        offsets: int64 (examples + 1,), example i is [offsets[i], offsets[i+1])
    <key>.json          the load report (counts, skipped records, first errors) and the key's parts

Both are written to a temporary name and renamed into place (os.replace), the JSON last: a crash
mid-write leaves no entry, and a reader never sees half of one. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minisft.chat import ChatFormat, Example
from minisft.data import ReadStats
from minisft.integrity import write_atomically

# 2: tool calling, the llama3.1 format, records a format cannot render skipped; 3: a UTF-8 BOM read,
# a top-level system beside a system message refused
CACHE_VERSION = 3


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_sha256(chat: ChatFormat) -> str:
    """The tokenizer as its tokenizer.json text (vocabulary, merges, added tokens, normalizer...),
    plus the special tokens minisft picked (the instruction format ends answers with eos)."""
    tokenizer = chat.tokenizer
    text = tokenizer.backend.to_str() + json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token])
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(path: str | Path, chat: ChatFormat, max_seq_len: int, layout: str, on_error: str, too_long: str) -> dict:
    """What decides a file's tokens; `key_name` hashes it into the entry's file name."""
    return {
        "version": CACHE_VERSION,
        "file_sha256": file_sha256(path),
        "layout": layout,
        "on_error": on_error,
        "chat_format": chat.name,
        "train_on": chat.train_on,
        "max_seq_len": max_seq_len,
        "too_long": too_long,
        "tokenizer_sha256": tokenizer_sha256(chat),
    }


def key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def save(folder: str | Path, key: dict, examples: list[Example], report) -> Path:
    """Write one entry; -> the path of its JSON sidecar."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    name = key_name(key)
    lengths = torch.tensor([0] + [len(e.input_ids) for e in examples], dtype=torch.int64)
    tensors = {
        "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),
        "labels": torch.tensor([t for e in examples for t in e.labels], dtype=torch.int32),
        "offsets": lengths.cumsum(0),
    }
    write_atomically(folder / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp))
    read = report.read
    counts = {f.name: getattr(report, f.name) for f in fields(report) if f.name != "read"}
    stats = {"per_format": dict(read.per_format), "skipped": dict(read.skipped), "first_errors": read.first_errors}
    sidecar = {"key": key, "report": counts | {"read": stats}}
    write_atomically(folder / f"{name}.json", lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=1) + "\n"))
    return folder / f"{name}.json"


def load(folder: str | Path, key: dict, path: str | Path, report_type: type):
    """-> (examples, report) of the entry for `key`, or None if there is none (or it is unreadable).

    The report names `path` (this run's file), wherever the cached copy of its content was read."""
    folder = Path(folder).expanduser()
    name = key_name(key)
    try:
        sidecar = json.loads((folder / f"{name}.json").read_text())
        tensors = load_file(str(folder / f"{name}.safetensors"))
    except (OSError, ValueError, SafetensorError):  # no entry, or a damaged one: tokenize again
        return None
    if sidecar.get("key") != key:
        return None
    offsets = tensors["offsets"].tolist()
    input_ids, labels = tensors["input_ids"].tolist(), tensors["labels"].tolist()
    examples = [Example(input_ids[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    counts = sidecar["report"]
    old_path = counts["path"]
    read = counts.pop("read")
    errors = [e.replace(old_path, str(path), 1) if e.startswith(old_path) else e for e in read["first_errors"]]
    counts["read"] = ReadStats(Counter(read["per_format"]), Counter(read["skipped"]), errors)
    report = report_type(**{**counts, "path": str(path), "cached": str(folder / f"{name}.json")})
    if report.examples != len(examples):
        return None
    return examples, report
