"""One test per row of PITFALLS.md: the SFT bugs users of the popular tools hit, and minisft's guard.

Each test sets up the situation that bit users — a pad token configured as eos, an answer cut off
by max_seq_len, a tokenizer that adds BOS itself, a 3-document packed row, k-way accumulation with
uneven token counts, ... — and asserts the guard holds. Each also shows the situation is real
(the naive way really goes wrong here), so the test would fail if the guard were taken out.
Rows 12 (resume) and 15 (held-out eval, best checkpoint, early stopping) are tested with the
training loop's checkpoints.
"""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors, trainers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import minisft.loss as loss_module
import minisft.train
import triton_kernels.cross_entropy as cross_entropy_module
from minisft.chat import ChatFormat, ChatML, Example, Instruction, Llama3
from minisft.checkpoint import load_model, save_model
from minisft.config import ConfigError, DataConfig, RunConfig
from minisft.data import DataError
from minisft.dataset import load_examples
from minisft.distributed import Replica
from minisft.hf import export_hf, load_hf
from minisft.labels import count_trained_tokens
from minisft.loss import masked_lm_loss
from minisft.model import Backends, ModelConfig, Transformer
from minisft.packing import Batch, pack_examples, packed_batch, pad_batch
from minisft.pretrained import load_pretrained, start_from
from minisft.tokenizer import Tokenizer
from minisft.train import TrainConfig, optimizer_step, train_loop
from triton_kernels.attention import attention, attention_reference
from triton_kernels.cross_entropy import cross_entropy, linear_cross_entropy, linear_cross_entropy_reference

from helpers import ON_GPU, assert_packed_equals_alone, interpreter_only

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy."},
]
CORPUS = [m["content"] for m in CONVERSATION] * 3 + ["system user assistant", "### Instruction: Response: a b c"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """The demo's kind of tokenizer: byte-level BPE with <|pad|>, <|endoftext|> and ChatML markers."""
    return Tokenizer.train_bpe(CORPUS, vocab_size=300)


def tiny_model(vocab_size: int, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
    model = Transformer(ModelConfig(**sizes | overrides))
    with torch.no_grad():  # weights of scale 1/sqrt(fan_in): per-token losses differ a lot
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1 / math.sqrt(p.shape[1]))
    return model


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def trained_spans(example: Example) -> list[list[int]]:
    """The runs of trained labels, in order: what the model is taught to say."""
    spans, current = [], []
    for label in example.labels + [-100]:
        if label == -100:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans


# ---------------------------------------------------------------- 1. the model never stops


def test_pitfall_01_model_learns_to_stop(tok, tmp_path):
    # A pad token configured equal to eos is refused: a collator that masks pads would mask every eos.
    with pytest.raises(ValueError, match="pad token '<\\|endoftext\\|>' equals the eos token"):
        Tokenizer(tok.backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    # ... and a Hugging Face tokenizer_config.json that says so gets a distinct pad token instead.
    tok.save(tmp_path / "tok")
    config = tmp_path / "tok" / "tokenizer_config.json"
    config.write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    loaded = Tokenizer.from_file(tmp_path / "tok")
    assert loaded.pad_id != loaded.eos_id

    # The end-of-turn token closes every trained answer, and padding never masks it.
    chat = ChatML(tok)
    short = chat.render(CONVERSATION[1:3])
    long = chat.render(CONVERSATION)
    _, labels = pad_batch([short, long], tok.pad_id)
    for row, messages in zip(labels, (CONVERSATION[1:3], CONVERSATION), strict=True):
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        spans = trained_spans(Example([0] * len(row), row.tolist()))
        assert spans == [tok.encode(answer) + [chat.end_id] for answer in answers]
    # Without chat markers (the instruction format) the answer ends with eos, trained the same way.
    plain = Instruction(tok).render(CONVERSATION[1:3])
    assert trained_spans(plain) == [tok.encode(CONVERSATION[2]["content"]) + [tok.eos_id]]

    # The export names the chat format's stop token as eos, not the base model's eos alone.
    export_hf(tmp_path / "hf", tiny_model(tok.vocab_size), tok, "chatml")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == chat.end_id != tok.eos_id
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"][0] == chat.end_id


# ---------------------------------------------------------------- 2. the assistant mask


def test_pitfall_02_assistant_mask_is_never_all_zeros_or_all_ones(tok, tmp_path, capsys):
    # The mask comes from the renderer: exactly the answers (and their end-of-turn token) are trained.
    example = ChatML(tok).render(CONVERSATION)
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert trained_spans(example) == [tok.encode(a) + [tok.token_id("<|im_end|>")] for a in answers]
    assert 0 < example.num_trained_tokens < len(example.labels) // 2
    assert trained_spans(ChatML(tok, "last").render(CONVERSATION)) == trained_spans(example)[-1:]

    # A file in which truncation cut off every answer trains on nothing: an error naming the file.
    long_prompt = "What is the capital of France? " * 20
    path = write_jsonl(tmp_path / "cut.jsonl", [{"prompt": long_prompt, "completion": "Paris."}] * 3)
    examples, report = load_examples(path, ChatML(tok), 32, too_long="truncate")
    assert examples == [] and report.answer_cut_off == 3
    from minisft.recipe import load_data

    with pytest.raises(DataError, match=f"no example with a trained token left in {path}.*3 left out: trunc"):
        load_data(path, ChatML(tok), DataConfig(too_long="truncate", cache_dir=""), 32)

    # A step whose batches hold no trained token is skipped, counted and logged: never trained on.
    model = tiny_model(tok.vocab_size)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    masked = [Example(e.input_ids, [-100] * len(e.labels)) for e in (example, ChatML(tok).render(CONVERSATION[1:3]))]
    cfg = TrainConfig(steps=2, batch_size=2, warmup_steps=0, eval_every=0, log_every=1)
    result = train_loop(model, masked, {}, cfg, tok.pad_id, tmp_path / "run")
    assert result["skipped_steps"] == 2
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # AdamW's weight decay alone would have moved them
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if "skipped" in r] == ["no trained tokens in this step's batches"] * 2
    assert "step 1 skipped: its batches hold no trained token" in capsys.readouterr().err


# ---------------------------------------------------------------- 3. "response template not found"


def test_pitfall_03_answers_are_found_without_searching_for_a_template(tok, tmp_path):
    # The template string tokenizes differently alone and in context (here: the byte-level
    # pre-tokenizer's prefix space), so searching the ids for it — TRL's completion-only
    # collator — finds nothing and the example is dropped.
    chat = Instruction(tok)
    response = tok.encode("### Response:\n")
    in_context = tok.encode("### Instruction:\nWhat is the capital of France?\n\n### Response:\nParis.")
    assert not any(in_context[i : i + len(response)] == response for i in range(len(in_context)))

    # minisft builds ids turn by turn and knows each span: every record is kept, every answer found.
    records = [{"instruction": f"What is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(20)]
    examples, report = load_examples(write_jsonl(tmp_path / "data.jsonl", records), chat, 64)
    assert report.examples == report.read.records == 20 and report.read.num_skipped == 0
    for example, record in zip(examples, records, strict=True):
        assert trained_spans(example) == [tok.encode(record["output"]) + [tok.eos_id]]


# ---------------------------------------------------------------- 4. gradient accumulation


def uneven_examples(vocab: int) -> list[Example]:
    """Six examples of different lengths and very different trained-token counts."""
    gen = torch.Generator().manual_seed(5)
    examples = []
    for length, trained in [(6, 1), (14, 12), (9, 2), (4, 4), (16, 15), (11, 3)]:
        ids = torch.randint(0, vocab, (length + 1,), generator=gen).tolist()
        examples.append(Example(ids[:-1], [-100] * (length - trained) + ids[1 + length - trained :]))
    return examples


def test_pitfall_04_gradient_accumulation_equals_the_full_batch():
    vocab = 50
    examples = uneven_examples(vocab)
    full = [pad_batch(examples, pad_id=0)]
    micro = [pad_batch(examples[i : i + 2], pad_id=0) for i in range(0, 6, 2)]  # k = 3, 2 to 15 tokens each

    def one_step(batches):
        """One optimizer step of the training loop: the count is over all of the step's batches."""
        model = tiny_model(vocab)
        num_trained = sum(count_trained_tokens(labels) for _, labels in batches)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient itself
        loss, _, _ = optimizer_step(Replica(model), optimizer, [Batch(*b) for b in batches], num_trained, grad_clip=0.0)
        return float(loss), dict(model.named_parameters())

    loss_full, after_full = one_step(full)
    loss_micro, after_micro = one_step(micro)
    assert loss_micro == pytest.approx(loss_full, abs=1e-6)
    for name, p in after_micro.items():
        torch.testing.assert_close(p, after_full[name], atol=1e-6, rtol=1e-5, msg=name)

    # The classic bug — mean per micro-batch, averaged over k — really gives another loss here.
    model = tiny_model(vocab)
    per_batch_mean = sum(model.loss(ids, labels, count_trained_tokens(labels)).item() for ids, labels in micro) / 3
    assert abs(per_batch_mean - loss_full) > 1e-2


# ---------------------------------------------------------------- 5. packing contamination


def test_pitfall_05_packed_documents_never_see_each_other(tok):
    chat = ChatML(tok)
    documents = [chat.render(CONVERSATION), chat.render(CONVERSATION[1:3]), chat.render(CONVERSATION[3:5])]
    lengths = [len(d.input_ids) for d in documents]
    rows = pack_examples(documents, max_len=sum(lengths))
    assert len(rows) == 1 and len(rows[0]) == 3  # one row holding all three documents
    batch = packed_batch(rows, tok.pad_id)
    starts = [0, *torch.tensor([len(d.input_ids) for d in rows[0]]).cumsum(0).tolist()]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        assert batch.position_ids[0, a:b].tolist() == list(range(b - a))  # positions restart per document

    assert_packed_equals_alone(tiny_model(tok.vocab_size, max_seq_len=256), documents, batch)


# ---------------------------------------------------------------- 6. doubled BOS


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def bos_adding_tokenizer() -> Tokenizer:
    """A Llama-3-like tokenizer whose post-processor puts <|begin_of_text|> before every encode."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[*LLAMA3_SPECIALS, "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return Tokenizer(backend, eos_token="<|end_of_text|>", pad_token="<|pad|>", bos_token="<|begin_of_text|>")


def test_pitfall_06_no_doubled_bos(tmp_path):
    tok = bos_adding_tokenizer()
    chat = Llama3(tok)
    assert tok.backend.encode("hello").ids[0] == tok.bos_id  # the post-processor is live
    example = chat.render(CONVERSATION)
    # The old way: render the template to text, then tokenize it with special tokens: <s><s>.
    text = tok.decode(example.input_ids, skip_special_tokens=False)
    tok.backend.encode_special_tokens = False  # as a plain Hugging Face tokenizer reads text
    assert tok.backend.encode(text).ids[:2] == [tok.bos_id, tok.bos_id]
    tok.backend.encode_special_tokens = True

    # minisft renders straight to ids: one BOS, first, in training data and generation prompts.
    assert example.input_ids[0] == tok.bos_id and example.input_ids.count(tok.bos_id) == 1
    prompt = chat.render_prompt(CONVERSATION[:-1])
    assert prompt[0] == tok.bos_id and prompt.count(tok.bos_id) == 1
    examples, _ = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION}] * 3), chat, 256)
    assert all(e.input_ids.count(tok.bos_id) == 1 for e in examples)


# ---------------------------------------------------------------- 7. chat format at inference


def test_pitfall_07_chat_format_travels_with_the_model(tok, tmp_path, monkeypatch, capsys):
    from minisft.__main__ import main

    # Trained with the instruction format (not the default ChatML): chat must render that, unasked.
    model = tiny_model(tok.vocab_size)
    save_model(tmp_path / "model", model, tok, "instruction")
    export_hf(tmp_path / "hf", model, tok, "instruction")
    assert load_pretrained(tmp_path / "model")[2] == load_pretrained(tmp_path / "hf")[2] == "instruction"
    exported = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert "### Response:" in exported["chat_template"]  # other tools render it too

    prompts = []
    monkeypatch.setattr("minisft.chat_cli.generate", lambda model, batch, *args: prompts.append(batch[0]) or [[]])
    for folder in (tmp_path / "model", tmp_path / "hf"):
        assert main(["chat", str(folder), "--prompt", "What is the capital of France?"]) == 0
    expected = Instruction(tok).render_prompt([{"role": "user", "content": "What is the capital of France?"}])
    assert prompts == [expected, expected]
    assert prompts[0] != ChatML(tok).render_prompt([{"role": "user", "content": "What is the capital of France?"}])


# ---------------------------------------------------------------- 8. loss 0 or NaN


def test_pitfall_08_cut_off_answers_are_reported_and_masked_batches_give_zero_loss(tok, tmp_path):
    # A conversation whose answer is cut off by max_seq_len: the over-long policy sees the rendered
    # tokens and their mask, so an example cut before its answer is left out and counted.
    chat = ChatML(tok)
    long_prompt = "What is the capital of France? " * 6
    records = [
        {"prompt": long_prompt, "completion": "Paris."},  # the answer starts past the limit
        {"prompt": "And of Italy?", "completion": "Rome is the capital of Italy. " * 6},  # cut mid-answer
        {"prompt": "And of Italy?", "completion": "Rome."},  # fits
    ]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    first = chat.render([{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "Paris."}])
    limit = next(t for t, label in enumerate(first.labels) if label != -100)  # just before its answer
    examples, report = load_examples(path, chat, limit, too_long="truncate")
    assert (report.answer_cut_off, report.truncated, report.examples) == (1, 1, 2)
    assert "1 left out: truncation cut off their whole answer" in report.summary()
    assert all(e.num_trained_tokens > 0 and len(e.input_ids) <= limit for e in examples)
    whole = chat.render(
        [{"role": "user", "content": records[1]["prompt"]}, {"role": "assistant", "content": records[1]["completion"]}]
    )
    assert examples[0] == Example(whole.input_ids[:limit], whole.labels[:limit])  # cut, mask kept as rendered
    _, dropped = load_examples(path, chat, limit, too_long="drop")
    assert dropped.dropped_too_long == 2 and "2 dropped as longer than" in dropped.summary()

    # A batch in which every label is masked gives loss 0 and zero gradients, never NaN — with
    # PyTorch's loss and with the fused Triton one (F.cross_entropy's mean gives NaN here).
    assert math.isnan(F.cross_entropy(torch.randn(3, 7), torch.full((3,), -100)).item())
    for backend in ("torch",) if ON_GPU else ("torch", "triton"):  # on CPU tensors: the interpreter's kernels
        hidden = torch.randn(2, 3, 16, requires_grad=True)
        weight = torch.randn(40, 16, requires_grad=True)
        labels = torch.full((2, 3), -100)
        loss = masked_lm_loss(hidden, weight, labels, count_trained_tokens(labels), backend)
        loss.backward()
        assert loss.item() == 0.0, backend
        assert (hidden.grad == 0).all() and (weight.grad == 0).all(), backend


# ---------------------------------------------------------------- 9. logits memory at large vocab


class LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any operation creates (the Triton interpreter's
    copies of a kernel's arguments included)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


@interpreter_only
def test_pitfall_09_fused_loss_never_holds_the_full_logits(monkeypatch):
    rows, dim, vocab, chunk = 96, 16, 1024, 8
    monkeypatch.setattr(cross_entropy_module, "CHUNK_BYTES", chunk * vocab * 4)  # 8 rows of fp32 logits
    monkeypatch.setattr(loss_module, "CHUNK_LOGITS", chunk * vocab)
    hidden = torch.randn(4, rows // 4, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) / dim**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (4, rows // 4))
    labels[:, :5] = -100
    n = count_trained_tokens(labels)

    def naive(hidden, weight, labels):  # what most SFT code writes: the full logits, then the loss
        return linear_cross_entropy_reference(hidden.reshape(-1, dim), weight, labels.reshape(-1), "sum")

    losses, grads, largest = {}, {}, {}
    for backend, total in (("naive", naive), ("torch", None), ("triton", None)):
        hidden.grad = weight.grad = None
        with LargestTensor() as spy:
            loss = total(hidden, weight, labels) / n if total else masked_lm_loss(hidden, weight, labels, n, backend)
            loss.backward()
        losses[backend], grads[backend], largest[backend] = loss.detach(), (hidden.grad, weight.grad), spy.largest
    logits_bytes = rows * vocab * 4
    assert largest["naive"] >= logits_bytes  # the (N, V) logits: the spy sees them
    for backend in ("torch", "triton"):  # one chunk's logits, or ∂W
        assert largest[backend] <= max(chunk * vocab, vocab * dim) * 4 < logits_bytes, backend
        torch.testing.assert_close(losses[backend], losses["naive"], atol=1e-5, rtol=1e-5)
        for ours, ref in zip(grads[backend], grads["naive"], strict=True):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- 10. fused CE edge cases


@interpreter_only
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pitfall_10_fused_cross_entropy_handles_ignored_rows(reduction):
    rows, vocab = 7, 300
    upstream = torch.randn(rows) if reduction == "none" else torch.tensor(1.7)
    for ignored in ([1, 4], list(range(rows))):  # some rows ignored, then every row
        logits = torch.randn(rows, vocab) * 3
        labels = torch.randint(0, vocab, (rows,))
        labels[ignored] = -100
        ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ours = cross_entropy(ours_in, labels, reduction, keep_logits=True)
        ref = F.cross_entropy(ref_in, labels, reduction=reduction)
        (ours * upstream).sum().backward()
        (ref * upstream).sum().backward()
        if len(ignored) == rows:  # PyTorch's mean is 0/0 = NaN here; ours is 0 with a zero gradient
            assert torch.isfinite(ours).all() and (ours == 0).all() and (ours_in.grad == 0).all()
            continue
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_in.grad, ref_in.grad, atol=1e-6, rtol=1e-5)
        assert (ours_in.grad[ignored] == 0).all()

    # The fused linear + cross-entropy with ignored rows, chunked, against PyTorch.
    hidden, weight = torch.randn(rows, 16), torch.randn(vocab, 16) / 4
    labels = torch.randint(0, vocab, (rows,))
    labels[[0, 5]] = -100
    if reduction != "none":
        ours_h, ours_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        linear_cross_entropy(ours_h, ours_w, labels, reduction).backward()
        F.cross_entropy(ref_h @ ref_w.T, labels, reduction=reduction).backward()
        torch.testing.assert_close(ours_h.grad, ref_h.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_w.grad, ref_w.grad, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 11. attention numerics


def sdpa_with_mask(q, k, v, docs):
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))
    T = q.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool).tril() & (docs[:, :, None] == docs[:, None, :])
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], enable_gqa=True).transpose(1, 2)


@interpreter_only
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_pitfall_11_attention_kernel_equals_sdpa_and_unpacked(dtype, tol):
    lengths = [11, 1, 17]  # three documents in one packed row, one of a single token
    T, H, Hkv, D = sum(lengths), 4, 2, 16
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    q, k, v = (torch.randn(1, T, h, D).to(dtype).requires_grad_() for h in (H, Hkv, Hkv))
    upstream = torch.randn(1, T, H, D).to(dtype)

    def run(fn, *inputs):
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out.backward(upstream[:, : out.shape[1]].to(out.dtype))
        return [out.detach().float()] + [t.grad.float() for t in inputs[:3]]

    ours = run(attention, q, k, v, docs)  # the Triton kernel (interpreted on a CPU)
    explicit = run(attention_reference, q, k, v, docs)  # the explicit-mask reference, fp32
    sdpa = run(sdpa_with_mask, q, k, v, docs)  # PyTorch's SDPA with the document mask, fp32
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, explicit, sdpa, strict=True):
        scale = max(1.0, float(c.abs().max()))
        torch.testing.assert_close(a, c, atol=tol * scale, rtol=tol, msg=f"{name} vs SDPA")
        torch.testing.assert_close(b, c, atol=tol * scale, rtol=tol, msg=f"{name}: reference vs SDPA")

    # Packed vs unpacked: each document run on its own gives the same rows of output.
    start = 0
    for n in lengths:
        part = [t.detach()[:, start : start + n].clone().requires_grad_() for t in (q, k, v)]
        alone = attention(*part)
        torch.testing.assert_close(alone.float(), ours[0][:, start : start + n], atol=tol, rtol=tol)
        start += n


# ---------------------------------------------------------------- 13. preprocessing time


def test_pitfall_12_resume_mid_epoch_replays_the_same_data_and_loss_curve(tmp_path, monkeypatch):
    """Killed at step 7 — mid-epoch, with 2-way accumulation — and resumed from the step-4
    checkpoint: the same batches, the same logged losses, bitwise the same weights. A resume that
    restarts the data stream (what users saw: a different curve) ends elsewhere."""
    from test_resume import Crash, assert_same_weights, crash_at_step, records, run

    straight = run(tmp_path / "straight", pack_to=0)
    with monkeypatch.context() as patch:
        crash_at_step(patch, 7)
        with pytest.raises(Crash):
            run(tmp_path / "resumed", pack_to=0)
    shutil.copytree(tmp_path / "resumed", tmp_path / "naive")
    resumed = run(tmp_path / "resumed", pack_to=0, resume=True, seed=1)  # other init: everything comes from disk
    assert_same_weights(resumed, straight)
    assert records(tmp_path / "resumed") == records(tmp_path / "straight")

    with monkeypatch.context() as patch:  # the naive resume: weights and optimizer restored, data from the start
        real_stream = minisft.train.example_stream
        patch.setattr(minisft.train, "example_stream", lambda items, size, seed, skip=0: real_stream(items, size, seed))
        naive = run(tmp_path / "naive", pack_to=0, resume=True, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(naive.parameters(), straight.parameters(), strict=True))


def test_pitfall_13_tokenized_data_is_cached(tok, tmp_path, monkeypatch):
    records = [{"messages": CONVERSATION}, {"instruction": "What is 2 plus 2?", "output": "4."}] * 50
    path = write_jsonl(tmp_path / "train.jsonl", records)
    calls = []
    real_render_many = ChatFormat.render_many
    monkeypatch.setattr(
        ChatFormat, "render_many", lambda self, batch: calls.append(len(batch)) or real_render_many(self, batch)
    )

    cache = tmp_path / "cache"
    first, report = load_examples(path, ChatML(tok), 256, cache_dir=cache)
    assert sum(calls) == 100 and report.cached == ""
    calls.clear()
    again, cached = load_examples(path, ChatML(tok), 256, cache_dir=cache)  # a re-run: a new ChatML, same tokenizer
    assert calls == []  # not one conversation tokenized
    assert again == first and cached.summary().startswith(report.summary())
    assert "tokens read from the cache" in cached.summary()
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".safetensors"]  # never a pickle

    # Anything that changes the tokens is a miss: the file, the tokenizer, the settings.
    for change in (
        lambda: load_examples(path, ChatML(tok, "last"), 256, cache_dir=cache),
        lambda: load_examples(path, ChatML(tok), 32, too_long="truncate", cache_dir=cache),
        lambda: load_examples(path, ChatML(Tokenizer.train_bpe(CORPUS, vocab_size=290)), 256, cache_dir=cache),
    ):
        calls.clear()
        change()
        assert sum(calls) == 100
    with open(path, "a") as f:
        f.write(json.dumps({"prompt": "One more?", "completion": "Yes."}) + "\n")
    calls.clear()
    edited, _ = load_examples(path, ChatML(tok), 256, cache_dir=cache)
    assert sum(calls) == 101 and len(edited) == 101


# ---------------------------------------------------------------- 14. new special tokens


def test_pitfall_14_added_special_tokens_are_trained_saved_and_exported(tmp_path, capsys):
    # A base model whose tokenizer has no chat markers, saved as minisft saves models.
    base_tok = Tokenizer.train_bpe(CORPUS, 280, special_tokens=("<|pad|>", "<|eos|>"))
    assert base_tok.backend.token_to_id("<|im_start|>") is None
    base = tiny_model(base_tok.vocab_size, tie_embeddings=False, max_seq_len=256)
    save_model(tmp_path / "base", base, base_tok, "instruction")

    # `train --init base` with ChatML adds <|im_start|> and <|im_end|>: the embedding and head grow.
    config = RunConfig(init=str(tmp_path / "base"), data=DataConfig(chat_format="chatml", cache_dir=""))
    model, tokenizer, chat, config = start_from(config, Backends())
    assert "added <|im_end|>, <|im_start|> to the tokenizer" in capsys.readouterr().out
    new = [tokenizer.token_id("<|im_start|>"), tokenizer.token_id("<|im_end|>")]
    assert min(new) >= base_tok.vocab_size and model.config.vocab_size > max(new)
    assert model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0] == model.config.vocab_size
    start_rows = [w[new].detach().clone() for w in (model.embed_tokens.weight, model.lm_head.weight)]
    torch.testing.assert_close(start_rows[0][0], base.embed_tokens.weight.mean(0))  # started at the mean

    # A few training steps move the new rows, in the embedding and in the head.
    examples = [chat.render(CONVERSATION), chat.render(CONVERSATION[1:3])] * 4
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=0, log_every=1)
    train_loop(model, examples, {}, cfg, tokenizer.pad_id, tmp_path / "run")
    for weight, start in zip((model.embed_tokens.weight, model.lm_head.weight), start_rows, strict=True):
        assert (weight[new] - start).abs().amin(dim=1).gt(0).all() and (weight[new] - start).abs().max() > 1e-4

    # Saved and exported with the model, and read back with their tokens.
    save_model(tmp_path / "tuned", model, tokenizer, chat.name)
    export_hf(tmp_path / "hf", model, tokenizer, chat.name)
    for loaded, loaded_tok, _ in (load_model(tmp_path / "tuned"), load_hf(tmp_path / "hf")):
        assert [loaded_tok.token_id("<|im_start|>"), loaded_tok.token_id("<|im_end|>")] == new
        torch.testing.assert_close(loaded.embed_tokens.weight[new], model.embed_tokens.weight[new].detach())
        torch.testing.assert_close(loaded.lm_head.weight[new], model.lm_head.weight[new].detach())

    # Freezing the embedding would leave the new tokens untrained: refused.
    frozen = RunConfig(
        init=str(tmp_path / "base"), freeze_embeddings=True, data=DataConfig(chat_format="chatml", cache_dir="")
    )
    with pytest.raises(ConfigError, match="freeze_embeddings would leave the 2 tokens added"):
        start_from(frozen, Backends())


def test_pitfall_15_memorising_a_small_set_is_seen_and_stopped(tmp_path):
    """Answers that are pure noise can only be memorised: train loss falls, held-out loss rises.
    The held-out loss is logged, checkpoints/best keeps the lowest one, and early stopping ends the
    run instead of training on into memorisation."""
    from test_resume import records
    from test_train_parts import tiny_model

    rng = torch.Generator().manual_seed(0)

    def noise_examples(n: int) -> list[Example]:  # [1, x, 2] -> y with y random: nothing to generalise
        xs, ys = torch.randint(4, 12, (n,), generator=rng), torch.randint(4, 12, (n,), generator=rng)
        return [Example([1, int(x), 2], [-100, -100, int(y)]) for x, y in zip(xs, ys, strict=True)]

    cfg = TrainConfig(
        steps=300, batch_size=8, lr=3e-2, warmup_steps=5, eval_every=10, save_every=10, early_stop_patience=3,
        log_every=10,
    )  # fmt: skip
    model = tiny_model(vocab_size=16, max_seq_len=32)
    result = train_loop(model, noise_examples(16), {"heldout": noise_examples(64)}, cfg, 0, tmp_path)

    logged = records(tmp_path)
    heldout = [(r["step"], r["eval_loss/heldout"]) for r in logged if "eval_loss/heldout" in r]
    train = [r["train_loss"] for r in logged if "train_loss" in r]
    assert train[-1] < train[0] - 0.5  # the small set is being memorised...
    best_step, best_loss = min(heldout, key=lambda pair: pair[1])
    assert heldout[-1][1] > best_loss  # ...while the held-out loss has turned up: overfitting, seen
    assert result["last_step"] < cfg.steps  # early stopping ended the run
    assert result["last_step"] == best_step + cfg.eval_every * cfg.early_stop_patience
    state = json.loads((tmp_path / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert state["run"]["step"] == best_step and state["run"]["best_eval_loss"] == best_loss
