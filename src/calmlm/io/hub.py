"""Share calmlm checkpoints on the Hugging Face Hub (issue 13).

:func:`push` uploads a native checkpoint's config, weights and tokenizer (never its optimizer or RNG state)
with a generated model card in one commit through ``huggingface_hub``; ``calmlm.load(repo_id)`` (see
:mod:`calmlm.io.loading`) downloads the same files back. :func:`model_card` writes the card: the model's kind
and config (K, latent size, shapes), parameter counts, the data it was trained and fine-tuned on, and
BrierLM with its protocol (block size, tokens, data) when known — from a ``calm eval --json`` report, or the
last evaluation in the run's ``metrics.jsonl`` (the training data's validation split).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .checkpoint import is_checkpoint, native_weights, read_config, read_metadata
from .loading import detect_format, looks_like_repo_id
from .metrics import last_eval
from ..errors import CheckpointError

CARD_FILE = "README.md"
# What a checkpoint needs to be loaded: the files calmlm.io.loading downloads, minus the reference format's.
PUSH_PATTERNS = ("config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def checkpoint_dir(path: str | Path) -> Path:
    """The native checkpoint folder of ``path`` (a checkpoint or a training run folder)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the folder does not exist")
    if not (path / "config.json").is_file() and (path / "checkpoint" / "config.json").is_file():
        path = path / "checkpoint"
    if detect_format(path) != "native":
        raise CheckpointError(f"{path} is a reference-format checkpoint; convert it first "
                              f"(`calm convert {path} OUT`) and push OUT")
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} has config.json but no model.safetensors; it is not a complete checkpoint")
    return path


def _parameters(directory: Path) -> dict[str, int]:
    """Parameter counts from the safetensors headers (no weights are read)."""
    shapes = native_weights(directory).shapes()
    return {"total": sum(math.prod(s) for s in shapes.values()),
            "autoencoder": sum(math.prod(s) for k, s in shapes.items() if k.startswith("autoencoder."))}


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def _data_line(record: Any) -> str:
    if isinstance(record, dict):
        spec = record.get("spec") or "the Python standard library (calmlm's default corpus)"
        val = f"validation: {record['val_data']}" if record.get("val_data") else \
            f"{record.get('val_fraction', 0):.0%} held out for validation, seed {record.get('seed', 0)}"
        return f"`{spec}` ({val})"
    return f"`{record}`"


def model_card(path: str | Path, repo_id: str, evaluation: dict[str, Any] | None = None) -> str:
    """A Markdown model card (with Hub metadata) for the checkpoint at ``path``. ``evaluation``: a
    ``calm eval --json`` report to quote; otherwise the run's last training-time BrierLM, if any."""
    directory = checkpoint_dir(path)
    config, meta = read_config(directory), read_metadata(directory)
    kind = config["kind"]
    params = _parameters(directory)
    title = {"calm": "CALM (Continuous Autoregressive Language Model)", "baseline": "Transformer baseline",
             "autoencoder": "CALM autoencoder"}[kind]
    lines = ["---", "library_name: calmlm", "pipeline_tag: text-generation" if kind != "autoencoder" else
             "pipeline_tag: feature-extraction", "tags:", "- calmlm", f"- {kind}"]
    if kind == "calm":
        lines.append("- continuous-autoregressive-language-model")
    ft = meta.get("finetune")
    finetuned = isinstance(ft, dict)
    if finetuned and ft.get("base_model_on_hub"):  # fine-tuned from a Hub repository, not a folder
        lines.append(f"base_model: {ft['base_model']}")
    lines += ["---", "", f"# {repo_id.split('/')[-1]}", "",
              f"A {title} checkpoint in calmlm's format (Shao et al. 2025, "
              "[arXiv 2510.27688](https://arxiv.org/abs/2510.27688); reference implementation "
              "[shaochenze/calm](https://github.com/shaochenze/calm)).", ""]
    shape = (f"hidden size {config['hidden_size']}, {config['num_layers']} layers, "
             f"{config['num_heads']} heads ({config['num_kv_heads']} KV), vocabulary {config['vocab_size']:,}")
    if kind == "calm":
        ae = config["autoencoder"]
        lines += [f"- **K = {config['chunk_size']}** tokens per step (one latent vector of size "
                  f"{config['latent_size']} per chunk), {config.get('head', 'energy')} head with "
                  f"{config['num_head_blocks']} blocks",
                  f"- backbone: {shape}, context {config['max_position_embeddings']} chunks "
                  f"({config['max_position_embeddings'] * config['chunk_size']} tokens)",
                  f"- parameters: {_millions(params['total'] - params['autoencoder'])} (+ "
                  f"{_millions(params['autoencoder'])} frozen autoencoder: hidden size {ae['hidden_size']}, "
                  f"latent {ae['latent_size']})"]
    elif kind == "baseline":
        lines += [f"- backbone: {shape}, context {config['max_position_embeddings']} tokens",
                  f"- parameters: {_millions(params['total'])}"]
    else:
        lines += [f"- K = {config['chunk_size']}, latent size {config['latent_size']}, hidden size "
                  f"{config['hidden_size']}, vocabulary {config['vocab_size']:,}",
                  f"- parameters: {_millions(params['total'])}"]
    lines += ["", "## Training data", ""]
    if "data" in meta and finetuned:
        lines.append(f"- base model trained on {_data_line(meta['data'])}")
    elif "data" in meta:
        steps = f", {meta['step']:,} steps" if "step" in meta else ""
        lines.append(f"- trained on {_data_line(meta['data'])}{steps}")
    if finetuned:
        val = f"validation `{ft['val_data']}`" if ft.get("val_data") else \
            f"{ft.get('val_fraction') or 0:.0%} held out, seed {ft.get('seed', 0)}"
        lines.append(f"- fine-tuned from `{ft.get('base_model')}` on `{ft.get('data')}` ({ft.get('train_examples')} "
                     f"prompt/completion examples, {val}), {meta.get('step', '?')} steps, with `calm finetune`")
    elif "data" not in meta:
        lines.append("- not recorded in the checkpoint")
    lines += ["", "## Evaluation", ""]
    if evaluation is not None and "brierlm" in evaluation:
        e = evaluation
        lines.append(f"BrierLM **{e['brierlm']:.3f}** (Brier-1..4: " + ", ".join(
            f"{e[f'brier_{n}']:.4f}" for n in range(1, 5) if f"brier_{n}" in e) + ") on "
            f"{e.get('data', 'the evaluation data')}, blocks of {e.get('block_size', '?')} tokens, "
            f"{e.get('num_tokens', 0):,} tokens, seed {e.get('seed', 0)} (`calm eval`).")
    elif (last := last_eval(directory, "brierlm")) is not None:
        lines.append(f"BrierLM {last['brierlm']:.3f} at training step {last.get('step')} on the training data's "
                     f"validation split, blocks of {last.get('brier_block_size', '?')} tokens, "
                     f"{int(last.get('brier_tokens', 0)):,} tokens (the training-time estimate; `calm eval` "
                     "gives the full protocol).")
    else:
        lines.append("No BrierLM recorded yet (`calm eval --model " + repo_id + " --data ...`).")
        if (last := last_eval(directory, "val_loss")) is not None:
            extra = f", exact match {last['exact_match']:.3f} of generated completions" if "exact_match" in last else ""
            what = " over the completions of the fine-tuning validation set" if finetuned else ""
            lines.append(f"Validation loss{what} {last['val_loss']:.4f} at step {last.get('step')}{extra}.")
    lines.append("BrierLM depends on the block size and the data: compare only scores measured the same way.")
    lines += ["", "## Use", "", "```bash", "pip install calmlm", ""]
    if kind != "autoencoder":
        lines += [f'calm generate --model {repo_id} --prompt "Hello" --temperature '
                  + ("0.5" if kind == "calm" else "0.8"), "```", "", "```python", "import calmlm", "",
                  f'model = calmlm.load("{repo_id}")', "tok = model.tokenizer",
                  'out = model.generate(tok.encode("Hello"), max_new_tokens=64)',
                  "print(tok.decode(out[0].tolist()))", "```"]
    else:
        lines += [f"calm train --autoencoder {repo_id} --out runs/calm", "```"]
    return "\n".join(lines) + "\n"


def push(path: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         commit_message: str | None = None, evaluation: dict[str, Any] | None = None) -> str:
    """Create (or reuse) the model repository ``repo_id`` and upload the checkpoint with its card in one
    commit. Returns the commit URL."""
    if not looks_like_repo_id(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a Hub repository id; use NAMESPACE/NAME, e.g. your-name/calm-sft")
    directory = checkpoint_dir(path)
    card = model_card(directory, repo_id, evaluation)
    message = commit_message or f"Upload calmlm {read_config(directory)['kind']} checkpoint"
    files = [f for pattern in PUSH_PATTERNS for f in sorted(directory.glob(pattern))]
    try:
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f)) for f in files]
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode("utf-8")))
        info = api.create_commit(repo_id, operations=ops, repo_type="model", commit_message=message)
    except Exception as e:  # not logged in, no permission, offline...
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"uploading {directory} to the Hub as {repo_id} failed ({type(e).__name__}: {first}); "
                              "log in with `huggingface-cli login` (or set HF_TOKEN / pass --token), check that you "
                              "may write to that namespace, and that you are online") from None
    return str(getattr(info, "commit_url", info))
