"""Guards that no test used to check (issue 14): each test here fails when its guard is broken
(each was broken by hand, and the test seen failing, before it was kept).

  1. the NaN guard when the loss is finite but the gradient norm is not
  2. gradient clipping, through train_loop
  3. `chat` stopping at the chat format's end-of-turn token
  4. a Hugging Face config.json without tie_word_embeddings loads untied
  5. AdamW's betas, and weight decay on matrices only (never norms or biases)
  6. an example of exactly max_seq_len tokens is kept, one token longer is not
  7. replacing checkpoints/best: at every moment best or best.old holds a whole version; an
     orphaned best.old is put back
  8. the fused linear cross-entropy accumulates ∂W in fp32 when W is bf16
  9. rows for new special tokens start at the mean of the old vocabulary's rows only
 10. top-p at an exact probability tie keeps the fewest tokens reaching top_p
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from test_resume import TRAIN, records
from test_train_parts import tiny_model

import minisft.checkpoint as checkpoint
import minisft.integrity as integrity
import minisft.train
from minisft.__main__ import main
from minisft.chat import ChatML
from minisft.checkpoint import recover_folder, save_model, write_folder
from minisft.generate import pick_next
from minisft.model import ModelConfig, Transformer
from minisft.packing import pad_batch
from minisft.tokenizer import Tokenizer
from minisft.train import TrainConfig, make_optimizer, train_loop

from helpers import interpreter_only

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.train_bpe(["hello world yes no maybe", "user assistant system"], vocab_size=280)


# ---------------------------------------------------------------- 1. NaN guard on the gradient norm


def test_a_finite_loss_with_a_non_finite_gradient_norm_is_not_stepped(tmp_path, monkeypatch):
    model = tiny_model(vocab_size=16, max_seq_len=32)
    backwards = {"n": 0}

    def poison(grad):  # the third step's gradient overflows; its loss is fine
        backwards["n"] += 1
        return torch.full_like(grad, float("inf")) if backwards["n"] == 3 else grad

    model.norm.weight.register_hook(poison)
    seen = {}
    real_step = minisft.train.optimizer_step

    def watched_step(replica, optimizer, *args, **kwargs):
        if backwards["n"] == 2:  # the weights as step 3 finds them
            seen["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        result = real_step(replica, optimizer, *args, **kwargs)
        if backwards["n"] == 3 and "after" not in seen:
            seen["after"], seen["result"] = {k: v.clone() for k, v in model.state_dict().items()}, result
        return result

    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0, log_every=1, save_every=0)
    monkeypatch.setattr(minisft.train, "optimizer_step", watched_step)
    train_loop(model, TRAIN, {}, cfg, 0, tmp_path)
    loss, norm, _ = seen["result"]
    assert math.isfinite(loss) and norm == float("inf")
    for name, value in seen["before"].items():
        assert torch.equal(seen["after"][name], value), name  # no update, not even weight decay
    assert {"step": 3, "skipped": "non-finite grad_norm"} in records(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- 2. gradient clipping


def test_train_loop_clips_the_global_gradient_norm(tmp_path, monkeypatch):
    """One step with plain SGD (lr 1: the update is minus the gradient): the update is the gradient
    scaled by grad_clip / its global norm, and the logged norm is the one before clipping."""
    monkeypatch.setattr(minisft.train, "make_optimizer", lambda model, cfg: torch.optim.SGD(model.parameters(), lr=1.0))
    model = tiny_model(vocab_size=16, max_seq_len=32)
    reference = copy.deepcopy(model)
    input_ids, labels = pad_batch(TRAIN, 0)
    n = int((labels != -100).sum())
    reference.loss(input_ids, labels, n).backward()
    grads = {name: p.grad for name, p in reference.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()
    clip = norm / 4
    cfg = TrainConfig(steps=1, batch_size=len(TRAIN), lr=1.0, warmup_steps=0, grad_clip=clip, log_every=1)
    train_loop(model, TRAIN, {}, cfg, 0, tmp_path)
    scale = clip / (norm + 1e-6)  # torch's clip_grad_norm_ coefficient
    for name, p in model.named_parameters():
        expected = reference.get_parameter(name).detach() - scale * grads[name]
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5, msg=name)
    assert records(tmp_path)[0]["grad_norm"] == pytest.approx(norm, rel=1e-5)


# ---------------------------------------------------------------- 3. chat stops at the end-of-turn token


def test_chat_stops_at_the_chat_formats_end_of_turn_token(tok, tmp_path, capsys):
    """A model wired to answer token 100, then <|im_end|>, then 101 forever: chat prints 100's text only."""
    chat = ChatML(tok)
    prompt = chat.render_prompt([{"role": "user", "content": "hello"}])
    yes, no = 100, 101  # two ordinary tokens
    assert chat.end_id != tok.eos_id  # the stop must come from the format, not from eos
    model = Transformer(ModelConfig(vocab_size=320, dim=64, n_layers=1, ffn_dim=64, tie_embeddings=False))
    with torch.no_grad():
        for block in model.layers:  # every block adds 0: the residual stream is the embedding
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        e = model.embed_tokens.weight
        head = torch.zeros_like(model.lm_head.weight)
        head[yes], head[chat.end_id], head[no] = 10 * e[prompt[-1]], 10 * e[yes], 10 * (e[chat.end_id] + e[no])
        model.lm_head.weight.copy_(head)
    save_model(tmp_path / "m", model, tok, "chatml")
    assert main(["chat", str(tmp_path / "m"), "--prompt", "hello", "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out == tok.decode([yes]).strip() + "\n"


# ---------------------------------------------------------------- 4. tie_word_embeddings absent: untied


def test_hf_config_without_tie_word_embeddings_loads_untied(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    from minisft.hf import load_hf

    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    tok.save(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    del config_json["tie_word_embeddings"]  # Llama's, Mistral's and Qwen2's default: False
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    ours, _, _ = load_hf(tmp_path)
    assert ours.lm_head is not None
    torch.testing.assert_close(ours.lm_head.weight, hf.lm_head.weight, atol=0, rtol=0)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), hf(ids).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 5. AdamW: betas and weight decay


def test_adamw_uses_the_betas_and_decays_matrices_only():
    """Two AdamW steps by hand (Loshchilov & Hutter 2019, decoupled decay) against make_optimizer's,
    on a model with norms (qk_norm too) and biases (attention_bias): those must not decay."""
    model = tiny_model(vocab_size=16, max_seq_len=32, attention_bias=True, qk_norm=True, tie_embeddings=False)
    cfg = TrainConfig(lr=0.1, weight_decay=0.5, beta1=0.8, beta2=0.9)
    optimizer = make_optimizer(model, cfg)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    grads = [{name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()} for _ in range(2)]
    for step_grads in grads:
        for name, p in model.named_parameters():
            p.grad = step_grads[name].clone()
        optimizer.step()
    no_decay = [name for name, p in model.named_parameters() if name.endswith(("norm.weight", "bias"))]
    assert any(n.endswith("bias") for n in no_decay) and any("q_norm" in n for n in no_decay)
    for name, p in model.named_parameters():
        decay = 0.0 if name in no_decay else cfg.weight_decay
        w, m, v = start[name].double(), 0, 0
        for t, step_grads in enumerate(grads, 1):
            g = step_grads[name].double()
            w = w * (1 - cfg.lr * decay)
            m, v = cfg.beta1 * m + (1 - cfg.beta1) * g, cfg.beta2 * v + (1 - cfg.beta2) * g * g
            m_hat, v_hat = m / (1 - cfg.beta1**t), v / (1 - cfg.beta2**t)
            w = w - cfg.lr * m_hat / (v_hat.sqrt() + 1e-8)
        torch.testing.assert_close(p.detach().double(), w, atol=1e-6, rtol=1e-6, msg=name)


# ---------------------------------------------------------------- 6. max_seq_len boundary


@pytest.mark.parametrize("too_long", ["drop", "truncate"])
def test_an_example_of_exactly_max_seq_len_tokens_is_kept_one_longer_is_not(tok, tmp_path, too_long):
    from minisft.dataset import load_examples

    chat = ChatML(tok)

    def rendered(record: dict):
        return chat.render(
            [{"role": "user", "content": "hello"}, {"role": "assistant", "content": record["completion"]}]
        )  # noqa: E501

    candidates = [{"prompt": "hello", "completion": "." * k} for k in range(1, 12)]
    lengths = [len(rendered(r).input_ids) for r in candidates]
    exact = next(i for i in range(len(lengths) - 1) if lengths[i + 1] == lengths[i] + 1)
    records_ = candidates
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records_[exact : exact + 2]))
    examples, report = load_examples(path, chat, lengths[exact], too_long=too_long)
    if too_long == "drop":
        assert [len(e.input_ids) for e in examples] == [lengths[exact]]
    else:  # the longer one is cut to max_seq_len; the exact one untouched
        assert [len(e.input_ids) for e in examples] == [lengths[exact]] * 2
        whole = rendered(records_[exact])
        assert examples[0].input_ids == whole.input_ids and examples[0].labels == whole.labels


# ---------------------------------------------------------------- 7. replacing checkpoints/best


class Crash(Exception):
    pass


def version_of(folder: Path) -> str | None:
    """'old' or 'new' for a whole version (both files, the same text), None for none or a torn one."""
    files = [folder / "a", folder / "b"]
    if not all(f.is_file() for f in files):
        return None
    texts = {f.read_text() for f in files}
    return texts.pop() if len(texts) == 1 else None


def write_version(folder: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        (tmp / "a").write_text(text)
        (tmp / "b").write_text(text)

    write_folder(folder, write)


@pytest.mark.parametrize("start", ["best", "orphaned best.old"])
def test_replacing_best_always_leaves_a_whole_version_on_disk(tmp_path, monkeypatch, start):
    """Crash the replacement at each of its file operations in turn: after every crash, best or
    best.old holds a whole version; reading it back (recover_folder, as `chat` does) finds one."""
    real = {"rmtree": checkpoint.shutil.rmtree, "rename": Path.rename, "fsync": integrity.os.fsync}
    crashes = 0
    for crash_at in range(1, 100):
        root = tmp_path / str(crash_at)
        best = root / "checkpoints" / "best"
        write_version(best, "old")
        if start == "orphaned best.old":  # an earlier save died between its two renames
            best.rename(best.with_name("best.old"))
        calls = {"n": 0}

        def crashing(name, calls=calls, crash_at=crash_at):
            def call(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == crash_at:
                    raise Crash
                return real[name](*args, **kwargs)

            return call

        monkeypatch.setattr(checkpoint.shutil, "rmtree", crashing("rmtree"))
        monkeypatch.setattr(Path, "rename", crashing("rename"))
        monkeypatch.setattr(integrity.os, "fsync", crashing("fsync"))  # write_folder flushes through integrity
        try:
            write_version(best, "new")
            finished = True
        except Crash:
            finished, crashes = False, crashes + 1
        monkeypatch.undo()
        held = {version_of(best), version_of(best.with_name("best.old"))} - {None}
        assert held, f"crash at file operation {crash_at}: neither best nor best.old is whole"
        recover_folder(best)
        assert version_of(best) in ("old", "new"), crash_at
        if finished:
            assert version_of(best) == "new" and not best.with_name("best.old").exists()
            break
    assert crashes >= 5  # every rename, removal and flush was a crash point


def test_chat_finds_best_after_a_save_died_between_its_renames(tok, tmp_path, capsys):
    model = tiny_model(vocab_size=320, max_seq_len=64)
    best = tmp_path / "run" / "checkpoints" / "best"
    save_model(best, model, tok, "chatml")
    best.rename(best.with_name("best.old"))
    assert main(["chat", str(best), "--prompt", "hello", "--max_new_tokens", "2"]) == 0
    assert best.is_dir() and not best.with_name("best.old").exists()


# ---------------------------------------------------------------- 8. fused linear CE: ∂W in fp32


@interpreter_only
def test_fused_linear_cross_entropy_accumulates_the_weight_gradient_in_fp32(monkeypatch):
    """bf16 hidden and weight: ∂W summed over 128 one-row chunks equals ∂W of one chunk of 128 rows
    (one matmul, accumulated in fp32 inside it) to the final rounding to bf16. Summing the 128
    contributions in bf16 instead drifts 7x further (0.22 vs 0.031 at the worst entry; bound 0.071)."""
    import triton_kernels.cross_entropy as ce

    gen = torch.Generator().manual_seed(0)
    rows, dim, vocab = 128, 16, 32
    hidden = torch.randn(rows, dim, generator=gen).bfloat16()
    weight = (torch.randn(vocab, dim, generator=gen) / 4).bfloat16()
    labels = torch.randint(0, vocab, (rows,), generator=gen)

    def weight_grad(chunk_bytes: int) -> torch.Tensor:
        monkeypatch.setattr(ce, "CHUNK_BYTES", chunk_bytes)
        w = weight.clone().requires_grad_()
        ce.linear_cross_entropy(hidden, w, labels, "sum").backward()
        assert w.grad.dtype == torch.bfloat16
        return w.grad.double()

    whole, chunked = weight_grad(rows * vocab * 2), weight_grad(1)  # 1 chunk; 128 chunks of one row
    assert (chunked - whole).abs().max() <= 2**-7 * whole.abs().max(), (chunked - whole).abs().max()


# ---------------------------------------------------------------- 9. new rows at the mean of the old ones


def test_rows_for_added_tokens_start_at_the_mean_of_the_old_vocabulary(tmp_path):
    """A base tokenizer of 280 tokens in an embedding of 320 rows (40 unused padding rows, here
    far from the others): the chat markers take ids 280 and 281 — padding rows — and must start
    at the mean of rows 0-279, for the embedding and an untied head alike."""
    from minisft.pretrained import fit_chat_format

    base = Tokenizer.train_bpe(["hello world", "user assistant"], 280, special_tokens=("<|pad|>", "<|eos|>"))
    model, n = tiny_model(vocab_size=320, tie_embeddings=False), base.vocab_size
    with torch.no_grad():
        for weight in (model.embed_tokens.weight, model.lm_head.weight):
            weight[n:] = 100.0  # never trained: must not pull the mean
    old = {"embed": model.embed_tokens.weight[:n].detach().clone(), "head": model.lm_head.weight[:n].detach().clone()}
    _, added = fit_chat_format(model, base, "chatml", "assistant")
    assert added == [280, 281] and model.config.vocab_size == 320  # no resize: the rows existed
    for name, weight in (("embed", model.embed_tokens.weight), ("head", model.lm_head.weight)):
        for token in added:
            torch.testing.assert_close(weight[token], old[name].mean(0), msg=name)
        assert torch.equal(weight[:n], old[name])

    grown = tiny_model(vocab_size=64, tie_embeddings=False)  # the other way in: the embedding grows
    before = grown.embed_tokens.weight.detach().clone()
    grown.resize_vocab(128)
    torch.testing.assert_close(grown.embed_tokens.weight[64:], before.mean(0).expand(64, -1))


# ---------------------------------------------------------------- 10. top-p at a tie


def test_top_p_at_an_exact_tie_keeps_the_fewest_tokens_reaching_it():
    """Four tokens at probability 1/4 each (exact in binary), top_p = 1/2: the nucleus is the fewest
    most likely tokens whose probabilities add up to at least 1/2 — two, never three."""
    logits = torch.full((1, 10), -float("inf"))
    logits[0, [1, 4, 6, 9]] = 0.0
    gen = torch.Generator().manual_seed(0)
    drawn = {int(pick_next(logits, 1.0, 0.5, gen)) for _ in range(400)}
    assert len(drawn) == 2 and drawn <= {1, 4, 6, 9}
    drawn = {int(pick_next(logits, 1.0, 0.75, gen)) for _ in range(400)}
    assert len(drawn) == 3
