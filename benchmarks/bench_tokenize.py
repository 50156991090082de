"""Tokenizing a dataset: the first load (render every conversation) and a re-run (tokenized-data cache).

    python benchmarks/bench_tokenize.py [--copies 100]      (CPU; needs ../shared/data)

The data is ../shared/data/sft/alpaca_en_demo.json repeated `--copies` times (999 records each,
so ≈100k records and ≈86 MB at the default) in a temporary folder, rendered with the Qwen3
tokenizer and chat format. Three loads of the same file, each timed end to end (read JSON,
validate, render, over-long policy):

    no cache    load_examples(cache_dir="")           what every load cost before the cache
    cold        the first load with a cache folder     render + hash the file + write the entry
    warm        the same load again                     hash the file + read the entry back

Unlike the other benchmarks this one is about the CPU: tokenization never touches the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.common import RESULTS, cpu_facts, markdown_table, save_results  # noqa: E402
from minisft.chat import make_chat_format  # noqa: E402
from minisft.dataset import load_examples  # noqa: E402
from minisft.tokenizer import Tokenizer  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_SEQ_LEN = 2048


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=100, help="how many times the demo file is repeated")
    parser.add_argument("--results", default=str(RESULTS), help="folder for tokenize.json and tokenize.md")
    args = parser.parse_args()
    source, tokenizer_dir = SHARED / "sft" / "alpaca_en_demo.json", SHARED / "tokenizers" / "qwen3"
    if not source.is_file() or not tokenizer_dir.is_dir():
        print(f"bench_tokenize: {SHARED} not found (only in the development checkout); nothing to measure.")
        return
    chat = make_chat_format("qwen3", Tokenizer.from_file(tokenizer_dir))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "alpaca_x.json"
        records = json.loads(source.read_text()) * args.copies
        data.write_text(json.dumps(records, ensure_ascii=False))
        rows = []
        for run, cache_dir in (("no cache", ""), ("cold", Path(tmp) / "cache"), ("warm", Path(tmp) / "cache")):
            start = time.perf_counter()
            examples, report = load_examples(data, chat, MAX_SEQ_LEN, too_long="truncate", cache_dir=cache_dir)
            seconds = time.perf_counter() - start
            tokens = sum(len(e.input_ids) for e in examples)
            assert (run == "warm") == bool(report.cached), report.summary()
            rows.append(
                {
                    "load": run,
                    "records": report.read.records,
                    "examples": report.examples,
                    "tokens": tokens,
                    "seconds": round(seconds, 2),
                    "records/s": f"{report.read.records / seconds:,.0f}",
                    "tokens/s": f"{tokens / seconds / 1e6:.2f}M",
                }
            )
            print(rows[-1])
        megabytes = data.stat().st_size / 1e6
    facts = cpu_facts() | {"tokenizers": tokenizers.__version__, "file_mb": round(megabytes, 1)}
    facts |= {"chat_format": "qwen3", "max_seq_len": MAX_SEQ_LEN}
    save_results("tokenize", facts, rows, markdown_table(rows), Path(args.results))


if __name__ == "__main__":
    main()
