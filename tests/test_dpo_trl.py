"""DPO against TRL's DPOTrainer (a test-only reference): a small random Llama, the same batch (TRL's
own collated token ids and completion mask), the same β and reference log-probs — the loss and every
parameter's gradient equal to 1e-5.

Conventions that differ, measured here too: TRL's completion is everything after the rendered
prompt, so with ChatML it trains the "\\n" the template writes after <|im_end|>; minisft's answer
ends at <|im_end|>, as in SFT. Given TRL's token ids and mask, the maths agree exactly.
"""

import pytest
import torch
from tokenizers import pre_tokenizers

from minisft.chat import ChatML
from minisft.distributed import Replica
from minisft.dpo import DPOConfig, DPOObjective, PairBatch
from minisft.hf import export_hf, hf_name, load_hf
from minisft.labels import IGNORE_INDEX
from minisft.model import ModelConfig, Transformer
from minisft.preference import render_pair
from minisft.tokenizer import Tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # ~10 s, most of it importing TRL

RECORDS = [
    {"prompt": [{"role": "user", "content": "sort c a b"}], "chosen": [{"role": "assistant", "content": "a b c"}],
     "rejected": [{"role": "assistant", "content": "no idea"}]},
    {"prompt": [{"role": "user", "content": "sort b a"}], "chosen": [{"role": "assistant", "content": "a b"}],
     "rejected": [{"role": "assistant", "content": "b a , of course"}]},
    {"prompt": [{"role": "user", "content": "count a b c d"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "three"}]},
]  # fmt: skip
BETA = 0.3


def random_model(tokenizer: Tokenizer, seed: int) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    model = Transformer(config)
    with torch.no_grad():  # logits of order 1, so the log-probs differ between models and tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5)
    return model


def test_loss_and_gradients_equal_trl_dpo_trainer(tmp_path):
    tok = Tokenizer.train_bpe(["sort a c b : a b c count d of course three no idea"] * 4, vocab_size=300)
    # No space before the first word (the demo tokenizer adds one): then a template rendered as one
    # string, as TRL tokenizes it, gives the ids minisft builds piece by piece.
    tok.backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.Digits(individual_digits=True)]
    )
    for name, seed in (("policy", 0), ("reference", 1)):
        export_hf(tmp_path / name, random_model(tok, seed), tok, "chatml")
    policy = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reference", dtype=torch.float32)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=BETA, per_device_train_batch_size=3, report_to=[], use_cpu=True,
        max_length=64, seed=0, bf16=False,  # transformers 5 defaults to bf16 where the CPU has it
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(RECORDS),
        processing_class=transformers.AutoTokenizer.from_pretrained(tmp_path / "policy"),
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    their_grads = {name: p.grad for name, p in trainer.model.named_parameters()}

    # Ours on the same token ids: labels are the next token where TRL's completion mask is 1.
    ids, mask = batch["input_ids"].cpu(), batch["completion_mask"].cpu()
    labels = torch.where(mask[:, 1:] == 1, ids[:, 1:], IGNORE_INDEX)
    ours_policy, _, _ = load_hf(tmp_path / "policy")
    ours_reference, _, _ = load_hf(tmp_path / "reference")
    with torch.no_grad():
        ref_logps = ours_reference.sequence_log_probs(ids[:, :-1], labels)
    pair_batch = PairBatch(ids[:, :-1], labels, ref_logps)
    ours, _ = DPOObjective(DPOConfig(beta=BETA)).loss(Replica(ours_policy), pair_batch, len(RECORDS))
    ours.backward()
    assert abs(theirs.item() - torch.log(torch.tensor(2.0)).item()) > 0.05  # policy ≠ reference: a real check
    torch.testing.assert_close(ours, theirs.detach().float(), atol=1e-5, rtol=1e-5)
    compared = 0
    for name, p in ours_policy.named_parameters():
        torch.testing.assert_close(p.grad, their_grads[hf_name(name)], atol=1e-5, rtol=1e-4, msg=name)
        compared += 1
    assert compared == len(their_grads)

    # The one convention that differs: the same token ids (the "\n" after <|im_end|> is the last
    # one, the target of no input here), but TRL trains that "\n" too (the loader shuffled: sets).
    chat, newline = ChatML(tok, "last"), tok.encode("\n")
    ours_rendered = set()
    for r in RECORDS:
        for example in render_pair(chat, r["prompt"], r["chosen"][0], r["rejected"][0], "x"):
            trained = [t for t in example.labels if t != IGNORE_INDEX]
            ours_rendered.add((tuple(example.input_ids + newline), tuple(trained + newline)))
    theirs_rendered = {
        (tuple(row[keep.bool()].tolist()), tuple(label[label != IGNORE_INDEX].tolist()))
        for row, keep, label in zip(ids, batch["attention_mask"].cpu(), labels, strict=True)
    }
    assert theirs_rendered == ours_rendered
