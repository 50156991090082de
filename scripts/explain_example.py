"""Print one record as the model sees it: every token of its packed row, with its id, its
position id, its document, and the label it is trained to predict (or none).

    python scripts/explain_example.py data.jsonl --tokenizer tok/ [--record 3] [--chat_format qwen3]

The record is rendered and packed with the records after it (`--neighbours`), as training with
`data.packing = true` would. On a terminal the trained positions are green and other documents
grey; otherwise a `*` marks a trained position and `[...]` the trained text.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from minisft.chat import CHAT_FORMATS, TRAIN_ON, make_chat_format
from minisft.config import underscore_flags
from minisft.data import read_conversations
from minisft.dataset import fit
from minisft.labels import IGNORE_INDEX
from minisft.packing import pack, packed_batch
from minisft.tokenizer import Tokenizer

GREEN, GREY, RESET = "\033[32m", "\033[90m", "\033[0m"


def explain(args: argparse.Namespace, colour: bool) -> str:
    tokenizer = Tokenizer.from_file(args.tokenizer)
    chat = make_chat_format(args.chat_format, tokenizer, args.train_on)
    records = list(itertools.islice(read_conversations(args.file), args.record - 1, args.record + args.neighbours))
    if not records:
        raise SystemExit(f"{args.file} has fewer than {args.record} records")
    examples = [fit(e, args.max_seq_len, "truncate")[0] for e in chat.render_many(records)]  # None: answer cut off
    if examples[0] is None:
        raise SystemExit(f"record {args.record}: its answer starts past --max_seq_len {args.max_seq_len}")
    kept = [e for e in examples if e is not None]
    row = next(r for r in pack([len(e.input_ids) for e in kept], args.max_seq_len) if 0 in r)
    batch = packed_batch([[kept[i] for i in row]], tokenizer.pad_id)
    ours = row.index(0)  # record --record is this document of the row

    def show(token_id: int) -> str:
        return repr(tokenizer.decode([token_id], skip_special_tokens=False))

    def paint(text: str, doc: int, trained: bool) -> str:
        if not colour:
            return text
        return f"{GREEN}{text}{RESET}" if trained else (f"{GREY}{text}{RESET}" if doc != ours else text)

    lines = [
        f"record {args.record} of {args.file} ({chat.name} format, loss on {chat.train_on}): document {ours} of a "
        f"packed row of {len(row)} documents, {int((batch.document_ids < len(row)).sum())} tokens",
        "",
    ]
    # The text view: the record's tokens, those the model learns to produce marked. Token t is
    # trained when labels[t - 1] is; the last token is only in the labels, and only if trained.
    example = kept[0]
    tokens = example.input_ids + ([example.labels[-1]] if example.labels[-1] != IGNORE_INDEX else [])
    text, inside = "", False
    for t, token in enumerate(tokens):
        trained = t > 0 and example.labels[t - 1] != IGNORE_INDEX
        if not colour and trained != inside:
            text += "[" if trained else "]"
            inside = trained
        text += paint(tokenizer.decode([token], skip_special_tokens=False), ours, trained)
    lines += [text + ("]" if inside else ""), ""]
    # The table: one line per position of the row.
    lines.append(f"{'pos':>5} {'doc':>4} {'id':>7}  {'input token':<24} label (the next token, if trained)")
    for t in range(batch.input_ids.shape[1]):
        doc, label = int(batch.document_ids[0, t]), int(batch.labels[0, t])
        if doc == len(row):
            break  # the pad tail
        trained = label != IGNORE_INDEX
        target = f"* {label} {show(label)}" if trained else "  -"
        line = f"{int(batch.position_ids[0, t]):>5} {doc:>4} {int(batch.input_ids[0, t]):>7}  "
        lines.append(paint(line + f"{show(int(batch.input_ids[0, t])):<24} {target}", doc, trained))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="JSONL or JSON file of records")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json or its folder")
    parser.add_argument("--record", type=int, default=1, help="which record, counting valid records from 1")
    parser.add_argument("--chat_format", default="chatml", choices=sorted(CHAT_FORMATS))
    parser.add_argument("--train_on", default="assistant", choices=TRAIN_ON)
    parser.add_argument("--max_seq_len", type=int, default=256, help="tokens per packed row")
    parser.add_argument("--neighbours", type=int, default=3, help="records after it to pack it with")
    args = parser.parse_args(underscore_flags(sys.argv[1:] if argv is None else argv))  # one spelling, as config keys
    print(explain(args, colour=sys.stdout.isatty()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
