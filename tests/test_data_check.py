"""`python -m minisft data check`, `scripts/explain_example.py`, and `train` with the new data
options — run in-process, their output compared with values the tests build themselves."""

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minisft.__main__ import main
from minisft.chat import ChatML
from minisft.datacheck import histogram
from minisft.tokenizer import Tokenizer

WORDS = "the cat sat on a mat and then it ran far away from home to see the sea".split()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    Tokenizer.train_bpe([" ".join(WORDS) + " 0123456789 user assistant"], vocab_size=300).save(folder)
    return folder


def messages(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def near_copy(record: dict, rng: random.Random, n: int) -> dict:
    """The same words, with other case, punctuation and spacing (n spaces: no two copies alike)."""
    turns = record["messages"]
    q = turns[0]["content"].upper().replace(" ", "  ,", 1) + " " * n + "?!"
    a = "\n" + turns[1]["content"].title() + "..."
    return messages(q, a) if rng.random() < 0.5 else {"prompt": q, "completion": a}


@pytest.mark.slow  # ~4 s on an idle 2-core box (2 of them the check itself), more under load
def test_data_check_on_100k_records_is_fast_and_counts_duplicates(tmp_path, capsys):
    rng = random.Random(0)
    lines, exact, near, bad = [], 0, 0, 0
    records = []
    for i in range(100_000):
        roll = rng.random()
        if records and roll < 0.03:
            lines.append(json.dumps(rng.choice(records)))
            exact += 1
        elif records and roll < 0.05:
            lines.append(json.dumps(near_copy(rng.choice(records), rng, i)))
            near += 1
        elif roll < 0.0502:
            lines.append(json.dumps(messages("q", " \n ")) if rng.random() < 0.5 else '{"messages": [')
            bad += 1
        else:
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) + f" #{i}"  # unique
            records.append(messages(q, " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))))
            lines.append(json.dumps(records[-1]))
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert exact > 2000 and near > 1000 and bad > 5

    start = time.perf_counter()
    code = main(["data", "check", str(path)])
    took = time.perf_counter() - start
    out = capsys.readouterr().out
    # Not a benchmark (~2 s on an idle machine, 10-14 s seen under a load of 6): a bound loose enough
    # for a busy CI machine that still catches a quadratic duplicate search (minutes at 100k records).
    assert took < 60, f"data check took {took:.1f} s on 100k records"
    assert code == 2  # the file holds bad records
    assert f"records: 100000 read, {100_000 - bad} valid, {bad} bad" in out
    assert f"duplicates: {exact} exact, {exact + near} near-exact" in out
    assert "lengths in characters (no tokenizer given)" in out


def test_data_check_report_with_a_tokenizer(tmp_path, tok_dir, capsys):
    tok = Tokenizer.from_file(tok_dir)
    records = [
        messages("the cat", "sat on a mat"),
        {"instruction": "see", "input": "the sea", "output": "it ran far away from home"},
        {"prompt": "then", "completion": " ".join(WORDS * 3)},
        messages("the cat", "sat on a mat"),  # an exact duplicate
        {"prompt": "THE  cat!", "completion": "Sat on a mat."},  # a near-exact one
        {"prompt": "home", "completion": "   "},  # an empty answer
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    code = main(["data", "check", str(path), "--tokenizer", str(tok_dir), "--max-seq-len", "40"])
    out = capsys.readouterr().out
    assert code == 2
    assert "records: 6 read, 5 valid, 1 bad" in out
    assert "layouts: alpaca 1, messages 2, prompt_completion 2" in out
    assert f"  {path}:6: completion: empty assistant turn (nothing to train on)" in out
    assert "empty or whitespace-only answers: 1" in out
    assert "duplicates: 1 exact, 2 near-exact" in out

    answers = ["sat on a mat", "it ran far away from home", " ".join(WORDS * 3), "sat on a mat", "Sat on a mat."]
    trained = sum(len(tok.encode(a)) + 1 for a in answers)  # each answer and its <|im_end|>
    valid = [records[i] for i in (0, 1, 2, 3, 4)]
    chat = ChatML(tok)
    lengths = [len(chat.render(m).input_ids) for m in (
        r.get("messages") or [{"role": "user", "content": r.get("prompt") or f"{r['instruction']}\n\n{r['input']}"},
                              {"role": "assistant", "content": r.get("completion") or r.get("output")}]
        for r in valid
    )]  # fmt: skip
    assert f"trained tokens: {trained} of {sum(lengths)} ({trained / sum(lengths):.1%})" in out
    assert f"longer than 40 tokens: {sum(n > 40 for n in lengths)} (0 of them would lose" in out
    assert sum(n > 40 for n in lengths) == 1


def test_histogram_buckets_by_hand():
    lines = histogram([0, 1, 2, 3, 5], [3, 3, 4, 7, 9], "chars", width=4)
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert list(rows) == ["0", "1-1", "2-3", "4-7", "8-15"]
    assert rows["0"] == ["1", "##", "0"]  # peak count 2 = 4 marks
    assert rows["1-1"] == ["1", "##", "0"]
    assert rows["2-3"] == ["2", "####", "2", "####"]
    assert rows["4-7"] == ["1", "##", "2", "####"]
    assert rows["8-15"] == ["0", "1", "##"]


def test_data_check_unknown_option_and_missing_file(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "absent.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------- explain_example.py


def load_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "explain_example.py"
    spec = importlib.util.spec_from_file_location("explain_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_explain_example_shows_tokens_labels_positions_and_documents(tmp_path, tok_dir, capsys):
    tok = Tokenizer.from_file(tok_dir)
    records = [messages("the cat", "sat on a mat"), messages("see", "the sea"), messages("home", "far away")]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_script().main([str(path), "--tokenizer", str(tok_dir), "--record", "2", "--max-seq-len", "64"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "document 0 of a packed row of 2 documents" in lines[0]  # record 2, packed with record 3

    example = ChatML(tok).render(records[1]["messages"])
    trained = [label for label in example.labels if label != -100]
    first = next(t for t, label in enumerate(example.labels) if label != -100)  # input t predicts trained token 0

    def text(ids):
        return "".join(tok.decode([i], skip_special_tokens=False) for i in ids)

    header, view, _ = out.split("\n\n")
    rest = example.input_ids[first + 1 + len(trained) :]  # this tokenizer's " \n" separator is two tokens
    assert view == text(example.input_ids[: first + 1]) + "[" + text(trained) + "]" + text(rest)
    assert text(trained).endswith("<|im_end|>") and "the sea" in text(trained)

    table = [line for line in lines if re.match(r"^\s+\d+\s+\d+\s+\d+\s", line)]
    docs = [int(line.split()[1]) for line in table]
    lengths = [len(ChatML(tok).render(r["messages"]).input_ids) for r in records[1:]]
    assert len(table) == sum(lengths)
    ours = [line for line in table if line.split()[1] == "0"]
    assert [int(line.split()[0]) for line in ours] == list(range(len(example.input_ids)))  # position ids
    assert [int(line.split()[2]) for line in ours] == example.input_ids
    assert sum("*" in line for line in ours) == example.num_trained_tokens
    assert sorted(set(docs)) == [0, 1]


def run_script(*args) -> subprocess.CompletedProcess:
    """explain_example.py as a user runs it: a subprocess, this checkout's minisft first on the path."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, str(root / "scripts" / "explain_example.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def run_in_process(capsys, *args) -> subprocess.CompletedProcess:
    """explain_example.py's main() in this process, its result as run_script's: torch is loaded already,
    so this takes milliseconds where a subprocess takes seconds (one of each kind of run is enough)."""
    capsys.readouterr()  # what came before is not this run's
    try:
        code = load_script().main([str(arg) for arg in args])
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_explain_example_shows_a_long_answer_whole_and_says_where_it_cuts(tmp_path, tok_dir, capsys):
    tok = Tokenizer.from_file(tok_dir)
    long_answer = " ".join(WORDS * 12)  # > 256 tokens: the old default row cut it
    records = [messages("the cat", long_answer), messages("see", "the sea")]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    example = ChatML(tok).render(records[0]["messages"])
    assert len(example.input_ids) > 256
    done = run_script(path, "--tokenizer", tok_dir)
    assert done.returncode == 0 and done.stderr == ""
    header = done.stdout.splitlines()[0]
    assert header.startswith(f"record 1 ({path}:1, chatml format") and "note:" not in done.stdout
    table = [line for line in done.stdout.splitlines() if re.match(r"^\s+\d+\s+0\s+\d+\s", line)]
    assert sum("*" in line for line in table) == example.num_trained_tokens  # the whole answer, trained

    done = run_in_process(capsys, path, "--tokenizer", tok_dir, "--max-seq-len", 100)
    trained = example.num_trained_tokens
    kept = sum(label != -100 for label in example.labels[:100])
    assert done.returncode == 0
    assert done.stdout.splitlines()[0] == (
        f"note: record 1 is {len(example.input_ids)} tokens; --max_seq_len 100 cuts it there, "
        f"inside its answers: {kept} of {trained} trained tokens kept"
    )


def test_explain_example_reads_record_n_past_a_bad_one_and_bad_input_is_one_line(tmp_path, tok_dir, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(messages("the cat", "sat")) + "\n{not json\n" + json.dumps(messages("see", "the sea")) + "\n"
    )
    done = run_in_process(capsys, path, "--tokenizer", tok_dir, "--record", 3)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"record 3 ({path}:3, chatml format")
    cases = [
        (["--record", 0], "error: --record counts from 1"),  # as a user runs it, then in-process (torch loads once)
        (["--record", 2], f"error: {path}:2: invalid JSON"),
        (["--record", 9], f"error: {path} has 3 records: there is no record 9"),
        (["--record", "two"], "error: argument --record: invalid int value: 'two'"),
        (["--max-seq-len", 1], "error: --record counts from 1, --neighbours from 0, and --max_seq_len is at least 2"),
        (["--chat-format", "llama3"], "error: token '<|eot_id|>' is not in the tokenizer's vocabulary"),
    ]
    done = run_script(path, "--tokenizer", tok_dir, *cases[0][0])
    assert (done.returncode, done.stdout) == (2, "") and done.stderr.startswith(cases[0][1]), done.stderr
    assert done.stderr.count("\n") == 1

    cases += [
        ([tmp_path / "absent.jsonl", "--tokenizer", tok_dir], f"error: {tmp_path / 'absent.jsonl'}: no such file"),
        ([path, "--tokenizer", tmp_path], f"error: no tokenizer.json at {tmp_path / 'tokenizer.json'}"),
        ([path, "--tokenizer", path], f"error: {path}: not a tokenizer.json"),
    ]
    for args, message in cases:
        args = args if isinstance(args[0], Path) else [path, "--tokenizer", tok_dir, *args]
        done = run_in_process(capsys, *args)
        assert (done.returncode, done.stdout) == (2, ""), (args, done.stdout)
        assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, (args, done.stderr)


# ---------------------------------------------------------------- train with the data options


def test_train_command_with_alpaca_json_packing_and_skips(tmp_path, tok_dir, capsys, one_thread):
    rng = random.Random(0)

    def words(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    records = [{"instruction": words(4), "output": words(6)} for _ in range(30)]
    records.insert(3, {"instruction": "x", "output": ""})
    (tmp_path / "train.json").write_text(json.dumps(records, indent=1))
    args = [
        "train",
        *("--out_dir", str(tmp_path / "run"), "--data.train_file", str(tmp_path / "train.json")),
        *("--data.tokenizer", str(tok_dir), "--data.on_error", "skip", "--data.packing", "true"),
        *("--data.max_seq_len", "48", "--model.max_seq_len", "48", "--model.vocab_size", "320"),
        *("--model.dim", "32", "--model.n_layers", "1", "--model.ffn_dim", "64"),
        *("--steps", "4", "--batch_size", "2", "--log_every", "2", "--eval_every", "0"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "30 examples from 30 records (30 alpaca); 1 bad records skipped (1 empty answer)" in out
    assert re.search(r"packed 30 examples into \d+ rows of 48 tokens, \d+\.\d% of them real", out)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [2, 4]
    meta = json.loads((tmp_path / "run" / "checkpoints" / "final" / "minisft.json").read_text())
    assert meta["chat_format"] == "chatml"


def test_train_command_refuses_a_chat_format_the_tokenizer_lacks(tmp_path, tok_dir, capsys):
    (tmp_path / "t.jsonl").write_text(json.dumps(messages("a", "b")) + "\n")
    args = ["train", "--data.train_file", str(tmp_path / "t.jsonl"), "--data.tokenizer", str(tok_dir)]
    assert main([*args, "--data.chat_format", "llama3"]) == 2
    assert "chat format 'llama3' does not fit this tokenizer" in capsys.readouterr().err
    assert main([*args, "--data.too_long", "cut"]) == 2
    assert "data.too_long: 'cut' is not one of drop, truncate" in capsys.readouterr().err


# ---------------------------------------------------------------- warnings: what would train oddly without an error


def test_data_check_warns_with_counts_and_lines_and_strict_makes_them_errors(tmp_path, capsys):
    call = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    records = [
        messages("the cat", "sat on a mat"),  # 1: clean
        messages("Who are you?", "I am {{name}}, made by {{author}}."),  # 2: template placeholders
        messages("<image>\nWhat is in the picture?", "a cat"),  # 3: media placeholder
        {"instruction": "see", "output": "the sea", "id": 7, "history": [["a", "b"]], "empty": ""},  # 4: ignored
        messages("Repeat: the cat sat on a mat and ran far away", "The cat sat on a mat and ran far away."),  # 5
        messages("the cat", "sat on a mat"),  # 6: exact duplicate of 1
        messages("THE  cat!", "Sat on a mat."),  # 7: near duplicate of 1
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]},  # 8: two user turns
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"},
                      {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
                      {"role": "assistant", "content": "d"}]},  # 9: starts with the assistant, two answers in a row
        {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "{}"},
                      {"role": "assistant", "content": "c"}]},  # 10: a result nobody asked for
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "content": "1", "tool_call_id": "c1"}, {"role": "assistant", "content": "1"}],
         "weight": 2},  # 11: calls without tool definitions (tool_call_id is no ignored field); weight ignored
    ]  # fmt: skip
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["data", "check", str(path)]) == 0  # warnings alone: exit 0
    out = capsys.readouterr().out
    expected = [
        "warnings: 12 (first 5 of each kind shown)",
        "  template placeholders ({{...}}), trained as literal text: 1",
        f"    {path}:2 ({{{{author}}}}, {{{{name}}}})",
        "  media placeholders (<image>, <video>, <audio>): the model has no media input; trained as text: 1",
        f"    {path}:3 (<image>)",
        "  fields training ignores (they hold something): 2",
        "    history in 1, id in 1, weight in 1",
        f"    {path}:4 (history, id)",
        f"    {path}:11 (weight)",
        "  answers that mostly copy the prompt (≥ 80% of their word trigrams): 1",
        f"    {path}:5 (turn 1)",
        "  exact duplicates (the same turns and tools as an earlier record): 1",
        f"    {path}:6 (repeats line 1)",
        "  near duplicates (the same words as an earlier record, not exact): 1",
        f"    {path}:7 (like line 1)",
        "  conversations that start with the assistant: 1",
        f"    {path}:9 (turn 1)",
        "  two user turns in a row: 1",
        f"    {path}:8 (turn 1)",
        "  two assistant turns in a row: 1",
        f"    {path}:9 (turn 4)",
        "  tool results with no tool call before them: 1",
        f"    {path}:10 (turn 1)",
        "  tool calls in conversations that define no tools (calls to what was never shown): 1",
        f"    {path}:11",
    ]
    assert out[out.index("warnings:") :].splitlines() == expected
    assert "duplicates: 1 exact, 2 near-exact" in out
    assert main(["data", "check", str(path), "--strict"]) == 2
    assert capsys.readouterr().err == f"error: 12 warnings in {path} (--strict)\n"

    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps(r) + "\n" for r in records[:1]))
    assert main(["data", "check", str(clean), "--strict"]) == 0
    assert "warnings: 0" in capsys.readouterr().out


def test_data_check_shows_the_first_five_duplicates_and_counts_them_all(tmp_path, capsys):
    lines = [messages("the cat", "sat on a mat")] + [messages("home", f"far away {i}") for i in range(3)]
    lines += [messages("the cat", "sat on a mat")] * 7  # lines 5..11 repeat line 1
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    at = out.index("  exact duplicates (the same turns and tools as an earlier record): 7")
    assert out[at + 1 :] == [f"    {path}:{n} (repeats line 1)" for n in range(5, 10)]  # the first five only


def test_data_check_with_a_format_without_tools_reports_tool_records_as_bad(tmp_path, tok_dir, capsys):
    call = {"name": "f", "arguments": '{"x": 1}'}
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]}],
              "tools": [{"name": "f", "parameters": {}}]}  # fmt: skip
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(messages("the cat", "sat")) + "\n")
    args = ["data", "check", str(path), "--tokenizer", str(tok_dir)]
    assert main([*args, "--chat-format", "instruction"]) == 2
    out = capsys.readouterr().out
    assert "bad records by kind: unrenderable 1" in out
    assert f"  {path}:1: tools: the instruction chat format has no tool calling; chatml, llama3.1, qwen3 have it" in out
    assert main([*args, "--chat-format", "chatml"]) == 0
    assert "records: 2 read, 2 valid, 0 bad" in capsys.readouterr().out
