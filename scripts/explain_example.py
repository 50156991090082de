"""Print one record as the model sees it: every token of its packed row, with its id, its
position id, its document, and the label it is trained to predict (or none).

    python scripts/explain_example.py data.jsonl --tokenizer tok/ [--record 3] [--chat_format qwen3]

`--record N` is the file's Nth record, bad ones counted, so N is what you count in the file; a bad
record before it does not matter. It is rendered and packed with the good records after it
(`--neighbours`), as training with `data.packing = true` would, into a row as long as the record
(at least 256 tokens), or `--max_seq_len` tokens: then a longer record is cut, and a note says
where (in its answer, or after it). On a terminal the trained positions are green and other
documents grey; otherwise a `*` marks a trained position and `[...]` the trained text. Bad input
(a missing file, a bad record N, an unknown option) ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from minisft.chat import CHAT_FORMATS, TRAIN_ON, ChatFormat, Example, make_chat_format
from minisft.config import underscore_flags
from minisft.data import Conversation, DataError, read_records, to_messages
from minisft.dataset import fit
from minisft.labels import IGNORE_INDEX
from minisft.packing import pack, packed_batch
from minisft.tokenizer import Tokenizer

MIN_ROW = 256  # tokens per row when --max_seq_len is not given (or the record's length, if longer)

GREEN, GREY, RESET = "\033[32m", "\033[90m", "\033[0m"


def pick(args: argparse.Namespace, chat: ChatFormat) -> list[Conversation]:
    """Record --record (a bad one is the error) and up to --neighbours good records after it."""
    picked, n = [], 0
    for n, (where, record) in enumerate(read_records(args.file), 1):
        if n < args.record:
            continue  # earlier records are not even validated
        try:
            if isinstance(record, DataError):
                raise record
            picked.append(to_messages(record, where, check=chat.check)[0])
        except DataError:
            if n == args.record:
                raise
            continue  # a bad neighbour is left out of the row
        if len(picked) > args.neighbours:
            break
    if not picked:
        raise DataError(f"{args.file} has {n} records: there is no record {args.record}")
    return picked


def cut_note(example: Example, record: int, row: int) -> str:
    """Where cutting the record to `row` tokens falls, for the user to read before the tokens."""
    trained = [t for t, label in enumerate(example.labels) if label != IGNORE_INDEX]
    where = f"after its answer ({len(trained)} trained tokens kept)"
    if trained[-1] >= row:
        kept = sum(t < row for t in trained)
        where = f"inside its answers: {kept} of {len(trained)} trained tokens kept"
    return f"note: record {record} is {len(example.input_ids)} tokens; --max_seq_len {row} cuts it there, {where}"


def explain(args: argparse.Namespace, colour: bool) -> str:
    try:
        tokenizer = Tokenizer.from_file(args.tokenizer)
    except (OSError, ValueError):
        raise
    except Exception as err:  # the tokenizers library's own parse errors
        raise ValueError(f"{args.tokenizer}: not a tokenizer.json ({str(err).splitlines()[0]})") from None
    chat = make_chat_format(args.chat_format, tokenizer, args.train_on)
    records = pick(args, chat)
    rendered = chat.render_many(records)
    row_len = args.max_seq_len or max(MIN_ROW, len(rendered[0].input_ids))
    examples = [fit(e, row_len, "truncate")[0] for e in rendered]  # None: answer cut off
    if examples[0] is None:
        raise DataError(f"record {args.record} ({records[0].where}): its answer starts past --max_seq_len {row_len}")
    notes = [cut_note(rendered[0], args.record, row_len)] if len(rendered[0].input_ids) > row_len else []
    cut = sum(len(e.input_ids) > row_len for e in rendered[1:])
    notes += [f"note: {cut} of the neighbours cut to {row_len} tokens"] if cut else []
    kept = [e for e in examples if e is not None]
    row = next(r for r in pack([len(e.input_ids) for e in kept], row_len) if 0 in r)
    batch = packed_batch([[kept[i] for i in row]], tokenizer.pad_id)
    ours = row.index(0)  # record --record is this document of the row

    def show(token_id: int) -> str:
        return repr(tokenizer.decode([token_id], skip_special_tokens=False))

    def paint(text: str, doc: int, trained: bool) -> str:
        if not colour:
            return text
        return f"{GREEN}{text}{RESET}" if trained else (f"{GREY}{text}{RESET}" if doc != ours else text)

    lines = [
        *notes,
        f"record {args.record} ({records[0].where}, {chat.name} format, loss on {chat.train_on}): document {ours} "
        f"of a packed row of {len(row)} documents, {int((batch.document_ids < len(row)).sum())} tokens",
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

    def one_line_error(message: str) -> None:  # argparse's usage block would bury the one line that matters
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    parser.add_argument("file", help="JSONL or JSON file of records")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json or its folder")
    parser.add_argument("--record", type=int, default=1, help="which record of the file, counting from 1, bad ones too")
    parser.add_argument("--chat_format", default="chatml", choices=sorted(CHAT_FORMATS))
    parser.add_argument("--train_on", default="assistant", choices=TRAIN_ON)
    parser.add_argument(
        "--max_seq_len", type=int, default=0, help=f"tokens per packed row (default: the record's, at least {MIN_ROW})"
    )
    parser.add_argument("--neighbours", type=int, default=3, help="records after it to pack it with")
    args = parser.parse_args(underscore_flags(sys.argv[1:] if argv is None else argv))  # one spelling, as config keys
    if args.record < 1 or args.neighbours < 0 or args.max_seq_len and args.max_seq_len < 2:
        one_line_error("--record counts from 1, --neighbours from 0, and --max_seq_len is at least 2")
    try:
        print(explain(args, colour=sys.stdout.isatty()))
    except (DataError, OSError, ValueError, KeyError) as err:
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
