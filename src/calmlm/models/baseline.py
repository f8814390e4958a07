"""The discrete baseline: the same backbone over tokens with an LM head, trained by cross-entropy."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .transformer import KVCache, Transformer
from ..config import BaselineConfig
from ..errors import ConfigError
from .layers import ModelOutput, init_linear_and_embedding
from .losses import linear_cross_entropy


class BaselineLM(nn.Module):
    def __init__(self, config: BaselineConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        init_linear_and_embedding(self, config.initializer_range)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embed_tokens.weight

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.backbone(self.backbone.embed_tokens(input_ids), cache)

    def logits(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) next-token logits."""
        return self.lm_head(self.hidden_states(input_ids, cache))

    def forward(self, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> ModelOutput:
        """Next-token cross-entropy and accuracy. ``loss_mask`` (B, T) bool, one flag per input token (token 0
        is never a target): average only over the target tokens it marks (e.g. the completion in fine-tuning)."""
        targets = input_ids[:, 1:]
        if loss_mask is not None:
            if loss_mask.shape != input_ids.shape:
                raise ConfigError(f"baseline loss_mask must have the input's shape {tuple(input_ids.shape)}, "
                                  f"got {tuple(loss_mask.shape)}")
            targets = targets.masked_fill(~loss_mask[:, 1:].bool(), -100)
        hidden = self.hidden_states(input_ids[:, :-1])
        loss, acc = linear_cross_entropy(hidden, self.lm_head.weight, targets, ignore_index=-100)
        return ModelOutput(loss, {"ce": loss.detach(), "token_acc": acc.detach()})

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """See :func:`calmlm.sampling.generation.generate`."""
        from ..sampling.generation import generate
        return generate(self, input_ids, **kwargs)
