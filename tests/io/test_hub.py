"""`calm push` and `calmlm.load(repo_id)` against a local stand-in for the Hugging Face Hub.

There is no network here, so ``huggingface_hub.HfApi`` (repository creation, commits) and
``huggingface_hub.snapshot_download`` are replaced by a folder per repository; everything else (the commit
operations, calmlm's upload and download code, the file patterns) is the real code path.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

import calmlm
from calmlm.models.baseline import BaselineLM
from calmlm.models.calm import CALM
from calmlm.io.checkpoint import save_model
from calmlm.cli import main
from calmlm.config import baseline_preset, calm_preset
from calmlm.errors import CheckpointError
from calmlm.io.hub import model_card, push
from calmlm.data.tokenizer import train_tokenizer


class LocalHub:
    """Repositories as folders under ``root``; records what each call was given."""

    def __init__(self, root: Path) -> None:
        self.root, self.created, self.commits = root, {}, []
        self.fail: Exception | None = None
        hub = self

        class Api:
            def __init__(self, token: str | None = None) -> None:
                self.token = token

            def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False, **kw):
                if hub.fail is not None:
                    raise hub.fail
                (hub.root / repo_id).mkdir(parents=True, exist_ok=True)
                hub.created[repo_id] = {"private": private, "repo_type": repo_type, "token": self.token}

            def create_commit(self, repo_id, operations, commit_message=None, repo_type=None, **kw):
                for op in operations:  # real huggingface_hub.CommitOperationAdd objects
                    dest = hub.root / repo_id / op.path_in_repo
                    src = op.path_or_fileobj
                    dest.write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
                hub.commits.append((repo_id, commit_message, sorted(op.path_in_repo for op in operations)))
                return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

        self.Api = Api

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, **kw):
        repo = self.root / repo_id
        if not repo.is_dir():
            raise FileNotFoundError(f"404 Client Error: Repository Not Found for url: .../{repo_id}")
        cache = self.root.parent / "hf-cache" / repo_id
        cache.mkdir(parents=True, exist_ok=True)
        for f in repo.iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, cache / f.name)
        return str(cache)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    h = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", h.Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", h.snapshot_download)
    return h


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([f"line {i} of some text with words" for i in range(50)], vocab_size=300)


@pytest.fixture
def calm_run(tmp_path, tokenizer):
    """A run folder like `calm train`/`calm finetune` write: checkpoint with training state + metrics.jsonl."""
    torch.manual_seed(0)
    model = CALM(calm_preset("debug", eos_token_id=tokenizer.eos_id))
    torch.nn.init.normal_(model.head.final_layer.linears[2].weight, std=0.5)
    run = tmp_path / "run"
    meta = {"data": {"spec": "docs.jsonl", "val_data": None, "val_fraction": 0.02, "seed": 0}, "step": 12,
            "finetune": {"base_model": "runs/calm", "data": "sft.jsonl", "val_data": None, "val_fraction": 0.05,
                         "seed": 0, "train_examples": 230}}
    save_model(model, run / "checkpoint", tokenizer, meta,
               training_state={"optimizer": torch.optim.AdamW(model.head.parameters()), "step": 12})
    (run / "metrics.jsonl").write_text(json.dumps({"type": "eval", "step": 12, "brierlm": 1.234,
                                                   "brier_block_size": 64, "brier_tokens": 512}) + "\n")
    return run, model


def test_push_uploads_weights_tokenizer_and_card_only(hub, calm_run):
    run, _ = calm_run
    url = push(run, "me/calm-sft", private=True, token="hf_x")
    assert url == "https://huggingface.co/me/calm-sft/commit/0"
    assert hub.created["me/calm-sft"] == {"private": True, "repo_type": "model", "token": "hf_x"}
    (_, message, files), = hub.commits
    assert files == ["README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert "calm" in message  # never the optimizer, RNG or trainer state
    card = (hub.root / "me/calm-sft/README.md").read_text()
    assert card.startswith("---\nlibrary_name: calmlm\npipeline_tag: text-generation\n")
    assert "**K = 4** tokens per step" in card and "latent vector of size 16" in card and "energy head with" in card
    assert "fine-tuned from `runs/calm` on `sft.jsonl` (230 prompt/completion examples" in card
    assert "base model trained on `docs.jsonl` (2% held out" in card
    assert "BrierLM 1.234 at training step 12" in card and "blocks of 64 tokens, 512 tokens" in card
    assert 'calmlm.load("me/calm-sft")' in card
    assert "base_model:" not in card  # the base was a local folder
    meta = json.loads((run / "checkpoint" / "config.json").read_text())
    meta["finetune"].update(base_model="cccczshao/CALM-M", base_model_on_hub=True)
    (run / "checkpoint" / "config.json").write_text(json.dumps(meta))
    assert "base_model: cccczshao/CALM-M\n---" in model_card(run, "me/calm-sft")


def test_load_reads_a_pushed_checkpoint_back(hub, calm_run, tokenizer):
    run, model = calm_run
    push(run / "checkpoint", "me/calm-sft")
    back = calmlm.load("me/calm-sft")
    assert back.config == model.config and back.tokenizer.encode("line 3") == tokenizer.encode("line 3")
    for (k, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), k
    ids = tokenizer.encode("line 3 of")
    assert torch.equal(back.generate(ids, max_new_tokens=8, seed=0), model.eval().generate(ids, max_new_tokens=8, seed=0))
    with pytest.raises(CheckpointError, match="downloading it from the Hugging Face Hub failed"):
        calmlm.load("me/missing")


def test_cli_push_with_eval_report_and_baseline_card(hub, tmp_path, tokenizer, capsys):
    torch.manual_seed(0)
    save_model(BaselineLM(baseline_preset("debug")), tmp_path / "base", tokenizer)
    report = {"model": "base", "data": "wikitext103_test_documents.jsonl", "brierlm": 3.5, "brier_1": 0.5,
              "brier_2": 0.1, "brier_3": 0.05, "brier_4": 0.02, "block_size": 1024, "num_tokens": 245569, "seed": 0}
    (tmp_path / "eval.json").write_text(json.dumps(report))
    assert main(["push", str(tmp_path / "base"), "me/base", "--eval", str(tmp_path / "eval.json"),
                 "--message", "first upload"]) == 0
    assert "pushed" in capsys.readouterr().out and hub.commits[0][1] == "first upload"
    card = (hub.root / "me/base/README.md").read_text()
    assert "BrierLM **3.500**" in card and "wikitext103_test_documents.jsonl, blocks of 1024 tokens, 245,569" in card
    assert "Transformer baseline" in card and "not recorded in the checkpoint" in card
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"type": "eval", "step": 4, "val_loss": 0.5,
                                                        "exact_match": 0.75}) + "\n")
    card = model_card(tmp_path / "base", "me/base")
    assert "No BrierLM recorded yet" in card and "Validation loss 0.5000 at step 4, exact match 0.750" in card
    assert main(["push", str(tmp_path / "base"), "me/base", "--card-only"]) == 0
    assert capsys.readouterr().out == model_card(tmp_path / "base", "me/base")
    assert calmlm.load("me/base").config.kind == "baseline"


def test_push_errors(hub, calm_run, tmp_path, capsys):
    run, _ = calm_run
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text(json.dumps({"architectures": ["EnergyTransformer"]}))
    with pytest.raises(CheckpointError, match="reference-format checkpoint; convert it first"):
        push(ref, "me/x")
    with pytest.raises(CheckpointError, match="not a Hub repository id"):
        push(run, "no-namespace")
    with pytest.raises(CheckpointError, match="does not exist"):
        push(tmp_path / "nope", "me/x")
    hub.fail = PermissionError("401 Client Error: Unauthorized")
    with pytest.raises(CheckpointError, match="huggingface-cli login"):
        push(run, "me/x")
    assert main(["push", str(run), "me/x"]) == 2  # one line, no traceback
    assert "401 Client Error" in capsys.readouterr().err
