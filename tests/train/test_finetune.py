"""Supervised fine-tuning: data formats, the CALM chunk layout, prompt-masked losses, learning, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import calmlm
from calmlm.models.autoencoder import Autoencoder
from calmlm.models.baseline import BaselineLM
from calmlm.models.calm import CALM
from calmlm.io.checkpoint import save_model
from calmlm.cli import main
from calmlm.config import autoencoder_preset, baseline_preset, calm_preset
from calmlm.data.corpus import stack_blocks
from calmlm.errors import ConfigError, DataError, TokenizerError
from calmlm.data.chat import chat_prompt
from calmlm.train.finetune import (SFTDataset, TokenizedExample, exact_match, finetune, prompt_padding, read_examples,
                                   tokenize_examples)
from calmlm.sampling.generation import generate
from calmlm.data.tokenizer import Tokenizer
from calmlm.train.trainer import TrainConfig

EOS = 2


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- data ---------------------------------------------------------------------------------------------

def test_reads_prompt_completion_and_chat_rows(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "2+2=", "completion": " 4"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
    ])
    a, b = read_examples(path)
    assert (a.prompt, a.completion) == ("2+2=", " 4")
    assert b.prompt == "System: Be brief.\nUser: Hi\nAssistant:" and b.completion == " Hello."
    assert chat_prompt([]) == "Assistant:"
    (tmp_path / "arr.json").write_text(json.dumps([{"prompt": "", "completion": "x"}]))
    assert read_examples(tmp_path / "arr.json")[0].completion == "x"


@pytest.mark.parametrize("row,match", [
    ({"text": "x"}, "needs 'prompt' and 'completion', or 'messages'"),
    ({"prompt": "a", "completion": ""}, "completion is empty"),
    ({"prompt": 1, "completion": "b"}, "must be strings"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
    ({"messages": [{"role": "user"}]}, "non-empty list"),
])
def test_bad_rows_name_the_line(tmp_path, row, match):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, row])
    with pytest.raises(DataError, match=match) as e:
        read_examples(path)
    assert "d.jsonl:2" in str(e.value)
    with pytest.raises(DataError, match="no fine-tuning data"):
        read_examples(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match="bad.jsonl:1 is not valid JSON"):
        read_examples(tmp_path / "bad.jsonl")


def test_prompt_padding_is_the_generation_policy():
    """The fine-tuning layout must give the backbone exactly the chunks generation gives it."""
    torch.manual_seed(0)
    model = CALM(calm_preset("debug", eos_token_id=EOS)).eval()
    seen = []
    original = model.hidden_states

    def spy(ids, cache=None):
        seen.append(ids.clone())
        return original(ids, cache)

    model.hidden_states = spy  # type: ignore[method-assign]
    for length in range(10):
        seen.clear()
        prompt = list(range(5, 5 + length))
        generate(model, prompt, max_new_tokens=4, seed=0)
        ids = SFTDataset([TokenizedExample(prompt, [7, EOS])], model.config, EOS)[0]["input_ids"]
        pad = prompt_padding(length, 4)
        assert torch.equal(seen[0][0], ids[:pad + length]), length
        assert (pad + length) % 4 == 0  # the completion starts on a chunk boundary


def test_calm_and_baseline_layouts_and_masks():
    cfg = calm_preset("debug", eos_token_id=EOS)
    ex = [TokenizedExample([5, 6, 7, 8, 9], [10, 11, EOS]), TokenizedExample([5], [12, EOS])]
    ds = SFTDataset(ex, cfg, EOS)
    b = stack_blocks(ds, [0, 1])
    assert ds.block_size == 12 and b["input_ids"].shape == (2, 12) and b["loss_mask"].shape == (2, 3)
    assert b["input_ids"][0].tolist() == [EOS, EOS, EOS, 5, 6, 7, 8, 9, 10, 11, EOS, EOS]
    assert b["loss_mask"][0].tolist() == [False, False, True]  # only the completion's chunk
    assert b["input_ids"][1].tolist() == [EOS, EOS, EOS, 5, 12, EOS, EOS, EOS, EOS, EOS, EOS, EOS]
    assert b["loss_mask"][1].tolist() == [False, True, False]  # the right padding is masked out

    base = SFTDataset(ex + [TokenizedExample([], [13, EOS])], baseline_preset("debug", bos_token_id=1), EOS)
    b = stack_blocks(base, [0, 2])
    assert base.block_size == 8
    assert b["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, EOS]
    assert b["loss_mask"][0].tolist() == [False] * 5 + [True] * 3  # completion tokens and the final EOS
    assert b["input_ids"][1].tolist()[:3] == [1, 13, EOS] and b["loss_mask"][1].tolist()[:3] == [False, True, True]


def test_too_long_examples_and_bad_block_size():
    cfg = calm_preset("debug", eos_token_id=EOS, max_position_embeddings=4)  # 16 tokens of context
    with pytest.raises(DataError, match="longest, x.jsonl:3, needs 20"):
        SFTDataset([TokenizedExample(list(range(5, 20)), [5, EOS], "x.jsonl:3")], cfg, EOS)
    with pytest.raises(DataError, match="raise --block-size"):
        SFTDataset([TokenizedExample([5, 6, 7, 8, 9], [5, EOS])], cfg, EOS, block_size=8)
    with pytest.raises(ConfigError, match="multiple of the model's K=4"):
        SFTDataset([TokenizedExample([5], [5, EOS])], cfg, EOS, block_size=10)


# -- the loss ignores the prompt --------------------------------------------------------------------------

def _kept(t: torch.Tensor, store: list) -> torch.Tensor:
    """t, with its gradient kept (appended to store) for inspection after backward."""
    t.retain_grad()
    store.append(t)
    return t


def _calm_model(head: str = "energy"):
    torch.manual_seed(0)
    model = CALM(calm_preset("debug", eos_token_id=EOS, head=head))
    for p in model.head.parameters():  # the zero-initialised output / modulation layers would block gradients
        if p.dim() >= 2 and not p.any():
            torch.nn.init.normal_(p, std=0.1)
    return model


def _calm_batch():
    ex = [TokenizedExample([5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, EOS]), TokenizedExample([20, 21], [22, EOS])]
    return stack_blocks(SFTDataset(ex, calm_preset("debug", eos_token_id=EOS), EOS), [0, 1])


@pytest.mark.parametrize("head", ["energy", "flow", "diffusion"])
def test_calm_loss_ignores_prompt_chunk_targets(head):
    model, b = _calm_model(head), _calm_batch()
    mask = b["loss_mask"]
    assert mask[0].tolist() == [False, False, True, True] and mask[1].tolist() == [False, True, False, False]

    def loss(**kw):  # the same draws (posterior targets, head noise, times) on every call
        torch.manual_seed(1)
        return model(b["input_ids"], **kw).loss

    base = loss(loss_mask=mask)
    encode = model.autoencoder.encode

    def shifted_targets(chunks):  # change the target latents of the chosen (batch, chunk) positions only
        def fake(ids):
            mean, log_std = encode(ids)
            mean = mean.clone()
            for i, c in chunks:
                mean[i, c] += 3.0
            return mean, log_std
        return fake

    model.autoencoder.encode = shifted_targets([(0, 1), (1, 2), (1, 3)])  # prompt chunk / padding chunks
    torch.testing.assert_close(loss(loss_mask=mask), base, rtol=1e-6, atol=0)
    model.autoencoder.encode = shifted_targets([(0, 2)])  # a completion chunk
    assert (loss(loss_mask=mask) - base).abs() > 1e-3
    model.autoencoder.encode = encode

    # the gradient reaching the hidden states is exactly zero at prompt chunks, non-zero at completion chunks
    hidden = []
    original = model.hidden_states
    model.hidden_states = lambda ids, cache=None: _kept(original(ids, cache), hidden)  # type: ignore[method-assign]
    loss(loss_mask=mask).backward()
    grad = hidden[0].grad.abs().sum(-1)[:, :-1]  # (B, N-1): predictions of chunks 1..3
    assert (grad[mask[:, 1:]] > 0).all() and (grad[~mask[:, 1:]] == 0).all()
    model.hidden_states = original  # type: ignore[method-assign]
    # without a mask every chunk counts, as in pre-training
    full = loss()
    torch.testing.assert_close(full, loss(loss_mask=torch.ones_like(mask)))
    assert not torch.allclose(full, base)
    with pytest.raises(ConfigError, match="one flag per input chunk"):
        model(b["input_ids"], loss_mask=torch.ones(2, 16, dtype=torch.bool))


def test_baseline_loss_ignores_prompt_targets():
    torch.manual_seed(0)
    model = BaselineLM(baseline_preset("debug"))
    ex = [TokenizedExample([5, 6, 7, 8], [9, 10, EOS]), TokenizedExample([20, 21, 22], [23, EOS])]
    b = stack_blocks(SFTDataset(ex, model.config, EOS), [0, 1])
    ids, mask = b["input_ids"], b["loss_mask"]
    base = model(ids, loss_mask=mask).loss
    # the last token is only ever a target: with it masked out, changing it changes nothing
    last_masked = mask.clone()
    last_masked[:, -1] = False
    changed = ids.clone()
    changed[:, -1] = 99
    assert torch.equal(model(ids, loss_mask=last_masked).loss, model(changed, loss_mask=last_masked).loss)
    assert model(ids, loss_mask=mask).loss != model(changed, loss_mask=mask).loss  # row 0 ends with a completion EOS
    # gradient reaching the hidden states: zero at prompt (and padding) targets, non-zero at completion targets
    hidden = []
    original = model.hidden_states
    model.hidden_states = lambda x, cache=None: _kept(original(x, cache), hidden)  # type: ignore[method-assign]
    model(ids, loss_mask=mask).loss.backward()
    model.hidden_states = original  # type: ignore[method-assign]
    grad = hidden[0].grad.abs().sum(-1)  # (B, T-1): target t+1 at position t
    assert (grad[mask[:, 1:]] > 0).all() and (grad[~mask[:, 1:]] == 0).all()
    # the masked loss is the mean cross-entropy over the completion tokens
    logp = torch.log_softmax(model.logits(ids[:, :-1]).float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.allclose(base, -logp[mask[:, 1:]].mean(), atol=1e-6)
    hits = model.logits(ids[:, :-1]).argmax(-1) == ids[:, 1:]
    assert torch.allclose(model(ids, loss_mask=mask).metrics["token_acc"], hits[mask[:, 1:]].float().mean())
    assert torch.allclose(model(ids).loss, model(ids, loss_mask=torch.ones_like(mask)).loss)
    with pytest.raises(ConfigError, match="loss_mask must have the input's shape"):
        model(ids, loss_mask=mask[:, :4])


# -- the engine ------------------------------------------------------------------------------------------------

def test_engine_trains_and_resumes_dict_batches_exactly(tmp_path):
    """SFT batches ({"input_ids", "loss_mask"}) go through the one engine: N steps = N/2 + resume + N/2."""
    from calmlm.train.trainer import Trainer

    cfg = calm_preset("debug", eos_token_id=EOS)
    data = SFTDataset([TokenizedExample([5 + i, 6, 7], [8 + i, 9, 10, 11, EOS]) for i in range(12)], cfg, EOS)
    val = SFTDataset([TokenizedExample([30, 31], [32, EOS])] * 2, cfg, EOS, data.block_size)

    def model(seed=0):
        torch.manual_seed(seed)
        return CALM(cfg)

    def tc(name):
        return TrainConfig(lr=1e-3, max_steps=6, batch_size=4, eval_every=3, eval_batches=1, save_every=0,
                           log_every=1, out_dir=str(tmp_path / name), progress=False, precision="fp32")

    full = model()
    result = Trainer(full, data, val, tc("full")).fit()
    assert result["step"] == 6 and "val_energy_loss" in result
    Trainer(model(), data, val, tc("half")).fit(stop_at=3)
    resumed = model(seed=123)
    Trainer(resumed, data, val, tc("half"), resume=True).fit()
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    bf16 = Trainer(model(), data, val, tc("bf16").replace(precision="bf16", max_steps=2)).fit()  # autocast path
    assert torch.isfinite(torch.tensor([bf16["loss"], bf16["val_loss"]])).all()


@pytest.mark.slow
def test_two_process_ddp_sft_matches_single_process(tmp_path):
    """Masked SFT batches under a real 2-process DDP job (gloo) train like one process with the global batch."""
    import os
    import socket
    import subprocess
    import sys

    from calmlm.train.trainer import Trainer

    sys.path.insert(0, str(Path(__file__).parent))
    import sft_ddp_worker as w

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(port), str(Path(__file__).parent / "sft_ddp_worker.py"), str(tmp_path / "d")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = w.model()
    Trainer(single, *w.data(), w.config(str(tmp_path / "s"), batch_size=4)).fit()
    ddp = calmlm.load(tmp_path / "d")
    for k, v in single.state_dict().items():
        torch.testing.assert_close(v, ddp.state_dict()[k], atol=1e-5, rtol=0)


# -- learning a synthetic instruction task -----------------------------------------------------------------

SYMBOLS = [f"s{i}" for i in range(12)]


def word_tokenizer() -> Tokenizer:
    """A word-level tokenizer for the synthetic task: specials 0-2, the two instructions, 12 symbols."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    words = ["<pad>", "<bos>", "<eos>", "first", "second", *SYMBOLS]
    backend = Backend(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return Tokenizer(backend, "<bos>", "<eos>", "<pad>")


def task_rows() -> tuple[list[dict], list[dict]]:
    """'first a b' -> ' a', 'second a b' -> ' b'; 20 % of the 288 items are held out."""
    rows = [{"prompt": f"{ins} {a} {b}", "completion": f" {a if ins == 'first' else b}"}
            for ins in ("first", "second") for a in SYMBOLS for b in SYMBOLS]
    random.Random(0).shuffle(rows)
    return rows[58:], rows[:58]


def quick_autoencoder(tok: Tokenizer) -> Autoencoder:
    """A debug autoencoder trained in about a second on the chunks the task's completions make."""
    torch.manual_seed(0)
    ae = Autoencoder(autoencoder_preset("debug", vocab_size=tok.vocab_size, token_dropout=0.0, latent_dropout=0.0))
    ids = [tok.token_to_id(s) for s in SYMBOLS]
    chunks = torch.tensor([[a, b, EOS, EOS] for a in ids for b in ids] + [[a, EOS, EOS, EOS] for a in ids] * 4)
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        loss = ae(chunks[torch.randint(0, len(chunks), (64,))]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ae.eval()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tok = word_tokenizer()
    ae = quick_autoencoder(tok)
    torch.manual_seed(0)
    # initializer_range 0.1: at width 64 the default 0.02 leaves the energy head's signal too small to learn fast
    cfg = calm_preset("debug", autoencoder=ae.config, vocab_size=tok.vocab_size, eos_token_id=EOS,
                      max_position_embeddings=8, initializer_range=0.1)
    save_model(CALM(cfg, autoencoder=ae), root / "base", tok)
    train, val = task_rows()
    return root, tok, _write_jsonl(root / "train.jsonl", train), _write_jsonl(root / "val.jsonl", val)


def _held_out(tok, val_path):
    return tokenize_examples(read_examples(val_path), tok, EOS)


def test_calm_finetune_learns_held_out_items(task):
    root, tok, train, val = task
    held_out = _held_out(tok, val)
    kw = dict(temperature=0.5, pool_size=16, seed=0)
    before = exact_match(calmlm.load(root / "base"), held_out, **kw)
    cfg = TrainConfig(lr=3e-3, warmup_steps=10, schedule="constant", max_steps=300, batch_size=32, eval_every=0,
                      save_every=0, log_every=50, out_dir=str(root / "sft"), progress=False)
    final = finetune(str(root / "base"), str(train), cfg, val_data=str(val))
    tuned = calmlm.load(root / "sft")  # a normal calmlm checkpoint
    after = exact_match(tuned, held_out, **kw)
    # Chance is 1/12 (the untrained head decodes one fixed chunk); 300 steps reach about 0.7 on held-out pairs.
    assert before <= 0.2 and after >= 0.45, (before, after)
    assert final["val_loss"] < 2.5
    meta = json.loads((root / "sft" / "checkpoint" / "config.json").read_text())["finetune"]
    assert meta["train_examples"] == 230 and meta["val_examples"] == 58 and meta["block_size"] == 8
    assert meta["base_model"] == str(root / "base") and meta["base_model_on_hub"] is False
    out = tuned.generate(tok.encode("first s3 s7"), max_new_tokens=2, temperature=0.5, pool_size=16, seed=0)
    assert out.shape == (1, 5)


def test_finetune_cli_then_generate_eval_and_resume(task, capsys):
    root, _, train, val = task
    out = root / "cli"
    args = ["finetune", "--model", str(root / "base"), "--data", str(train), "--val-data", str(val), "--out",
            str(out), "--max-steps", "4", "--batch-size", "8", "--lr", "1e-3", "--eval-every", "2",
            "--eval-examples", "8", "--no-progress"]
    assert main(args) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and 0 <= evals[-1]["exact_match"] <= 1 and "val_loss" in evals[-1]
    assert main(args[:-5] + ["--max-steps", "6", "--resume", "--no-progress"]) == 0  # continues from step 4
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 6
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "second s1 s2", "--max-new-tokens", "4",
                 "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("second s1 s2")
    (root / "text.txt").write_text(" ".join(SYMBOLS * 20))
    assert main(["eval", "--model", str(out), "--data", str(root / "text.txt"), "--block-size", "32",
                 "--cache-dir", str(root / "cache"), "--json", "--no-progress"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["brierlm"] <= 100


def test_finetune_baseline_learns_and_errors(task, tmp_path):
    _, tok, train, val = task
    torch.manual_seed(0)
    save_model(BaselineLM(baseline_preset("debug", vocab_size=tok.vocab_size, eos_token_id=EOS)), tmp_path / "b", tok)
    held_out = _held_out(tok, val)
    before = exact_match(calmlm.load(tmp_path / "b"), held_out, temperature=0)
    cfg = TrainConfig(lr=3e-3, schedule="constant", max_steps=150, batch_size=32, eval_every=0, save_every=0,
                      out_dir=str(tmp_path / "r"), progress=False)
    final = finetune(str(tmp_path / "b"), str(train), cfg, val_data=str(val))
    after = exact_match(calmlm.load(tmp_path / "r"), held_out, temperature=0)
    assert before <= 0.2 and after >= 0.6 and final["val_loss"] < 1.0, (before, after, final["val_loss"])
    ae_dir = tmp_path / "ae"
    save_model(Autoencoder(autoencoder_preset("debug")), ae_dir, tok)
    with pytest.raises(ConfigError, match="is an autoencoder"):
        finetune(str(ae_dir), str(train), cfg)
    with pytest.raises(DataError, match="no training examples left"):
        finetune(str(tmp_path / "b"), str(val), cfg, val_fraction=1.0)
    from calmlm.data.tokenizer import train_tokenizer

    big = train_tokenizer([f"some text {i}" for i in range(30)], vocab_size=300).save(tmp_path / "big")
    with pytest.raises(TokenizerError, match="vocab_size 17"):
        finetune(str(tmp_path / "b"), str(train), cfg, tokenizer=str(big))


def test_finetune_starts_from_a_reference_checkpoint(tmp_path, shared_dir):
    """A reference-format CALM (as the released CALM-M is stored) fine-tunes into a native checkpoint."""
    ref = shared_dir / "fixtures" / "upstream_tiny_k4" / "calm"
    if not (ref / "config.json").is_file():
        pytest.skip(f"reference fixture not found at {ref}")
    from calmlm.io.loading import detect_format
    from calmlm.data.tokenizer import train_tokenizer

    tok = train_tokenizer([f"question {i}: answer {i * 7}" for i in range(40)], vocab_size=300)
    tok_dir = tok.save(tmp_path / "tok")
    rows = [{"prompt": f"question {i}:", "completion": f" answer {i * 7}"} for i in range(40)]
    data = _write_jsonl(tmp_path / "qa.jsonl", rows)
    assert main(["finetune", "--model", str(ref), "--tokenizer", str(tok_dir), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--max-steps", "3", "--batch-size", "4", "--val-fraction", "0.2",
                 "--no-progress"]) == 0
    ck = tmp_path / "run" / "checkpoint"
    assert detect_format(ck) == "native"
    tuned, original = calmlm.load(ck), calmlm.load(ref)
    assert tuned.config == original.config and tuned.tokenizer is not None
    assert torch.equal(tuned.autoencoder.encoder.embed_tokens.weight, original.autoencoder.encoder.embed_tokens.weight)
    assert not torch.equal(tuned.backbone.embed_tokens.weight, original.backbone.embed_tokens.weight)
    assert tuned.generate(tok.encode("question 3:"), max_new_tokens=4, seed=0).shape[1] == len(tok.encode("question 3:")) + 4


def test_chat_template_of_the_tokenizer_formats_chats_and_is_kept(tmp_path):
    from calmlm.data.tokenizer import train_tokenizer

    tok = train_tokenizer([f"user asks {i} and assistant answers {i}" for i in range(40)], vocab_size=300)
    tok.chat_template = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}")
    torch.manual_seed(0)
    save_model(CALM(calm_preset("debug", eos_token_id=tok.eos_id)), tmp_path / "base", tok)
    rows = [{"messages": [{"role": "user", "content": f"asks {i}"}, {"role": "assistant", "content": f"answers {i}"}]}
            for i in range(12)]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    ex = read_examples(data, tok.chat_template, tok)[0]
    assert (ex.prompt, ex.completion) == ("<bos>user: asks 0\n<bos>assistant:", "answers 0")
    t = tokenize_examples([ex], tok, tok.eos_id)[0]
    assert t.prompt[0] == tok.bos_id and t.completion[-1] == tok.eos_id  # the template's specials are specials
    assert tokenize_examples(read_examples(data)[:1], tok, tok.eos_id)[0].prompt[0] != tok.bos_id  # plain format
    cfg = TrainConfig(max_steps=2, batch_size=4, eval_every=0, save_every=0, out_dir=str(tmp_path / "run"),
                      progress=False)
    finetune(str(tmp_path / "base"), str(data), cfg, val_fraction=0.0)
    tuned = calmlm.load(tmp_path / "run")
    assert tuned.tokenizer.chat_template == tok.chat_template  # `calm serve` reads it from tokenizer_config.json
    saved = json.loads((tmp_path / "run" / "checkpoint" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == tok.chat_template
