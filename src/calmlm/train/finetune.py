"""Supervised fine-tuning (issue 13): prompt/completion data -> fixed blocks with loss masks for the engine.

Data: JSON Lines (or one JSON array) whose rows are either ``{"prompt": ..., "completion": ...}`` or chat
``{"messages": [{"role": ..., "content": ...}, ...]}`` ending with an assistant message (the formats TRL and
litgpt accept). A chat row becomes a prompt with :func:`calmlm.data.chat.chat_prompt` (every message before the last one as
``Role: content`` lines, then ``Assistant:``) and the last assistant message, after a space, as the completion;
when the tokenizer has a ``chat_template``, that template renders the prompt and the reply follows as is.

Layout of one example (prompt and completion are tokenised separately, as ``calm generate`` tokenises a
prompt; EOS ends the completion so the model learns to stop):

* **CALM**: ``[EOS]*pad + prompt + completion + EOS``, where ``pad`` left-pads the prompt to a multiple of K
  exactly as generation does (:func:`prompt_padding`), so the completion starts on a chunk boundary; the
  last chunk is filled up with EOS (generation stops at the first EOS anyway). The loss mask marks the
  completion's chunks: the head's loss (energy, flow or diffusion) never scores a prompt chunk.
* **Baseline**: ``prompt + completion + EOS`` (an empty prompt starts from BOS, or EOS, as generation does);
  the mask marks the completion's tokens and the final EOS as cross-entropy targets.

Every example is then right-padded with EOS to one block size (masked out; causal attention means the
padding changes nothing before it), and a batch is ``{"input_ids", "loss_mask"}``, which the training
engine passes to ``forward`` as keyword arguments. A micro-batch's loss is the mean over its own masked
positions, so accumulation steps and DDP ranks weigh equally whatever their completion lengths.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.chat import chat_prompt
from ..errors import ConfigError, DataError
from ..sampling.generation import padded_prompt, prompt_padding  # noqa: F401  (prompt_padding: re-exported)


@dataclass
class Example:
    prompt: str
    completion: str
    source: str = ""  # "file:line", for error messages


@dataclass
class TokenizedExample:
    prompt: list[int]
    completion: list[int]  # ends with EOS
    source: str = ""


# -- reading ---------------------------------------------------------------------------------------------

def _example(row: Any, source: str, template: str | None = None, tokenizer: Any = None) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected a JSON object with 'prompt'/'completion' or 'messages', got "
                        f"{type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in msgs)):
            raise DataError(f"{source}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{source}: the last message must be the assistant's reply (the completion to learn), "
                            f"got role {msgs[-1]['role']!r}")
        try:
            prompt = chat_prompt(msgs[:-1], template, tokenizer)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None
        reply = msgs[-1]["content"] if template is not None else " " + msgs[-1]["content"]
        return Example(prompt, reply, source)
    if "prompt" in row and "completion" in row:
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            raise DataError(f"{source}: 'prompt' and 'completion' must be strings")
        if not row["completion"]:
            raise DataError(f"{source}: the completion is empty; there is nothing to learn from this row")
        return Example(row["prompt"], row["completion"], source)
    raise DataError(f"{source}: a row needs 'prompt' and 'completion', or 'messages' (found keys {sorted(row)})")


def read_examples(path: str | Path, chat_template: str | None = None, tokenizer: Any = None) -> list[Example]:
    """Rows of a ``.jsonl`` file (one JSON object per line) or a ``.json`` array, as :class:`Example`; chat rows
    are formatted by :func:`chat_prompt` (with ``chat_template`` when given)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"no fine-tuning data at {path}: give a .jsonl file of prompt/completion or messages rows")
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[Any, str]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e})") from None
        rows = [(row, f"{path}[{i}]") for i, row in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((json.loads(line), f"{path}:{n}"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n} is not valid JSON ({e}); each line must be one JSON object") from None
    if not rows:
        raise DataError(f"{path} holds no examples")
    return [_example(row, source, chat_template, tokenizer) for row, source in rows]


def split_examples(examples: list[Example], val_fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Deterministic hold-out by a seeded hash of each example's text (as for pre-training documents)."""
    from ..data.corpus import is_validation

    train, val = [], []
    for ex in examples:
        (val if is_validation(ex.prompt + "\0" + ex.completion, seed, val_fraction) else train).append(ex)
    return train, val


def tokenize_examples(examples: Sequence[Example], tokenizer: Any, eos_id: int) -> list[TokenizedExample]:
    """Tokenise prompt and completion separately and end the completion with EOS. Prompts are tokenised as
    ``calm generate`` and ``calm serve`` tokenise them (special tokens written in the text, e.g. by a chat
    template, are recognised); in completions such text stays text."""
    prompts = tokenizer.encode_batch([e.prompt for e in examples], allow_special=True)
    completions = tokenizer.encode_batch([e.completion for e in examples], allow_special=False)
    return [TokenizedExample(list(p), list(c) + [eos_id], e.source) for p, c, e in zip(prompts, completions, examples)]


# -- layout ----------------------------------------------------------------------------------------------

def layout(example: TokenizedExample, config: Any, eos_id: int) -> tuple[list[int], int]:
    """(token ids, first target position): for CALM the index of the first completion *chunk*, for the
    baseline of the first completion *token*."""
    prompt = padded_prompt(example.prompt, config, eos_id)
    ids = prompt + example.completion
    if config.kind != "calm":
        return ids, len(prompt)
    ids += [eos_id] * ((-len(ids)) % config.chunk_size)
    return ids, len(prompt) // config.chunk_size


class SFTDataset:
    """Fine-tuning examples as blocks of ``block_size`` tokens with loss masks, in the interface the training
    engine reads (``len``, ``block_size``, ``[i] -> {"input_ids", "loss_mask"}``, batched by ``stack_blocks``).
    The CALM mask has one flag per chunk (block_size / K), the baseline's one per token (block_size)."""

    def __init__(self, examples: Sequence[TokenizedExample], model_config: Any, eos_id: int,
                 block_size: int | None = None) -> None:
        cfg = model_config
        self.kind = cfg.kind
        if self.kind not in ("calm", "baseline"):
            raise ConfigError(f"fine-tuning needs a CALM or baseline model, got a {self.kind} checkpoint")
        self.k = cfg.chunk_size if self.kind == "calm" else 1
        self.eos_id = eos_id
        self.examples = list(examples)
        rows = [layout(e, cfg, eos_id) for e in self.examples]
        self.ids = [torch.tensor(ids, dtype=torch.long) for ids, _ in rows]
        self.starts = [start for _, start in rows]
        context = cfg.max_position_embeddings * self.k if self.kind == "calm" else cfg.max_position_embeddings + 1
        longest = max((len(t) for t in self.ids), default=0)
        if block_size is None:
            block_size = min(max(longest, 2 * self.k), context)
        if block_size % self.k:
            raise ConfigError(f"block size {block_size} is not a multiple of the model's K={self.k}")
        too_long = [(e.source, len(t)) for e, t in zip(self.examples, self.ids) if len(t) > block_size]
        if too_long:
            where, n = max(too_long, key=lambda x: x[1])
            limit = "the model's context" if block_size == context else "the block size"
            raise DataError(f"{len(too_long)} example(s) need more than {limit} of {block_size} tokens (the longest, "
                            f"{where}, needs {n} after padding); shorten or drop them"
                            + ("" if block_size == context else ", or raise --block-size"))
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Example i right-padded with EOS to the block size, and its loss mask."""
        seq = self.ids[i]
        ids = torch.full((self.block_size,), self.eos_id, dtype=torch.long)
        ids[:len(seq)] = seq
        mask = torch.zeros(self.block_size // self.k, dtype=torch.bool)
        mask[self.starts[i]:len(seq) // self.k] = True
        return {"input_ids": ids, "loss_mask": mask}


# -- evaluation by generation -------------------------------------------------------------------------------

@torch.no_grad()
def exact_match(model: Any, examples: Sequence[TokenizedExample], temperature: float = 1.0, sampler: str = "batch",
                pool_size: int = 200, seed: int = 0, batch_size: int = 32) -> float:
    """Fraction of examples whose generated completion equals the reference token for token, up to and
    including its EOS. Prompts of the same length are generated together (no extra padding)."""
    from ..sampling.generation import generate

    if not examples:
        return float("nan")
    model = getattr(model, "module", model)
    kw = dict(sampler=sampler, pool_size=pool_size) if model.config.kind == "calm" else {}
    groups: dict[int, list[TokenizedExample]] = {}
    for e in examples:
        groups.setdefault(len(e.prompt), []).append(e)
    hits = 0
    for length, group in sorted(groups.items()):
        for s in range(0, len(group), batch_size):
            part = group[s:s + batch_size]
            out = generate(model, [e.prompt for e in part], max_new_tokens=max(len(e.completion) for e in part),
                           temperature=temperature, seed=seed + s + 7919 * length, **kw)
            for row, e in zip(out[:, length:].tolist(), part):
                hits += row[:len(e.completion)] == e.completion
    return hits / len(examples)


def make_exact_match_eval_fn(num_examples: int, **kwargs: Any) -> Any:
    """An ``evaluate_fn`` for the engine: exact match of generated completions on the first ``num_examples``
    validation examples."""
    def evaluate_fn(model: Any, val_data: SFTDataset) -> dict[str, float]:
        return {"exact_match": exact_match(model, val_data.examples[:num_examples], **kwargs)}
    return evaluate_fn


# -- the job ---------------------------------------------------------------------------------------------------

def finetune(model_path: str, data: str, cfg: Any, val_data: str | None = None, val_fraction: float = 0.05,
             tokenizer: str | None = None, autoencoder: str | None = None, epochs: float | None = None,
             eval_examples: int = 0, eval_temperature: float = 1.0, resume: bool = False,
             device: str | None = None) -> dict[str, Any]:
    """Fine-tune the CALM or baseline checkpoint at ``model_path`` (any format ``calmlm.load`` reads, or a Hub
    id) on prompt/completion data with the training engine (``cfg``: a :class:`calmlm.train.trainer.TrainConfig`;
    ``cfg.block_size`` None = the longest example). Writes a normal calmlm run folder. Returns the final metrics."""
    from ..io.checkpoint import read_metadata
    from ..io.loading import detect_format, load_with_tokenizer, resolve
    from .trainer import Trainer

    directory = resolve(model_path)  # a Hub id is downloaded once
    # fp32 master weights whatever the stored dtype (a bf16 conversion); the engine autocasts to bf16 on GPUs
    model, tok = load_with_tokenizer(directory, dtype=torch.float32, tokenizer=tokenizer, purpose="fine-tuning",
                                     autoencoder=autoencoder)
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tok.eos_id
    if eos is None:
        raise ConfigError(f"neither {model_path} nor its tokenizer names an EOS token, which ends every completion; "
                          "pass a tokenizer with an EOS token")
    template = tok.chat_template  # kept in the fine-tuned checkpoint's tokenizer, so serving formats chats alike
    rows = read_examples(data, template, tok)
    if val_data is not None:
        train_rows, val_rows = rows, read_examples(val_data, template, tok)
    else:
        train_rows, val_rows = split_examples(rows, val_fraction, cfg.seed)
    if not train_rows:
        raise DataError(f"no training examples left in {data} after holding out {val_fraction:.0%} for validation")
    train_ex, val_ex = tokenize_examples(train_rows, tok, eos), tokenize_examples(val_rows, tok, eos)
    block = cfg.block_size
    if block is None:  # one block size for both splits: the longest example of either
        block = SFTDataset(train_ex + val_ex, model.config, eos).block_size
    train_set = SFTDataset(train_ex, model.config, eos, block)
    val_set = SFTDataset(val_ex, model.config, eos, block) if val_ex else None
    if epochs is not None:
        per_step = cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
        cfg = cfg.replace(max_steps=max(1, math.ceil(epochs * len(train_set) / per_step)))
    cfg = cfg.replace(block_size=block)
    base_meta = read_metadata(directory) if detect_format(directory) == "native" else {}
    meta = {k: v for k, v in base_meta.items() if k in ("data", "data_info")}  # `calm eval` default split
    meta["finetune"] = {"base_model": str(model_path), "base_model_on_hub": not Path(model_path).expanduser().exists(),
                        "data": str(data), "val_data": val_data,
                        "val_fraction": None if val_data else val_fraction, "seed": cfg.seed,
                        "train_examples": len(train_set), "val_examples": len(val_ex), "block_size": block,
                        "base_step": base_meta.get("step")}
    eval_fn = make_exact_match_eval_fn(eval_examples, temperature=eval_temperature) if eval_examples else None
    return Trainer(model, train_set, val_set, cfg, tokenizer=tok, evaluate_fn=eval_fn, resume=resume,
                   device=device, metadata=meta).fit()

