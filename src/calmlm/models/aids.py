"""Training aids for CALM (issue 19): extra training-only losses that give the backbone and the head a dense,
low-variance signal from the first step, where the energy score alone learns the context slowly.

Each aid is off unless its weight in :class:`~calmlm.config.CALMConfig` is positive; the paper presets keep them
all off. An aid never changes inference: CALM builds no aid module (``CALM(config)`` is the model that
generates, evaluates and serves), the training workflow attaches one with :meth:`CALM.attach_aids`, and the
trainer keeps the parameters under ``aids.`` out of the checkpoint's weights (in the training state, for
an exact resume). The aids:

- ``aux_token_weight``: an auxiliary head reads the hidden state that predicts chunk i and gives logits for
  its K tokens (Linear d -> K·d, RMSNorm, then the backbone's token embedding as output matrix): a
  cross-entropy per token, as the baseline gets, dropped after training;
- ``aux_latent_weight``: a linear map of the hidden state regresses the posterior mean of chunk i (mean squared
  error per latent dimension): a nearly free, dense target in latent space;
- ``head_mean_weight``: the mean of the energy loss's N head samples regresses the posterior mean of chunk i
  (squared error per latent dimension). Any distribution whose mean is the conditional mean of the latent
  minimises it, the true one included, so unlike the next aid it does not bias the head; it gives the head a
  direct, low-variance signal of where its samples belong;
- ``decoder_ce_weight``: one head sample is decoded by the frozen decoder and the chunk's true tokens are
  scored by cross-entropy; the gradient reaches the head and the backbone through the sample (SONAR-LLM's
  token loss through a frozen decoder). It sharpens the head's distribution, so it is annealed.

``aid_until`` and ``aid_schedule`` set how the weights fall over training (fraction of the run's steps or of its
time budget, whichever is further): linearly to 0 at ``aid_until``, or constant and then off. Past that point
no aid is computed. ``aid_control`` gives the negative controls: "detach" stops every aid's gradient at the
backbone and its embedding (the aid heads still learn), "shuffle" scores each position against another position's chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CALMConfig
from .layers import RMSNorm
from .losses import linear_cross_entropy, masked_mean

TRAINING_ONLY_PREFIX = "aids."  # parameters under this name are kept out of the checkpoint's weights


def aid_weight_factor(config: CALMConfig, progress: float) -> float:
    """The factor on every aid weight at ``progress`` (0..1) of training."""
    if progress >= config.aid_until:
        return 0.0
    return 1.0 if config.aid_schedule == "constant" else 1.0 - progress / config.aid_until


class TrainingAids(nn.Module):
    """The aid heads and losses of one CALM model; ``forward`` returns (weighted loss, metrics)."""

    def __init__(self, config: CALMConfig) -> None:
        super().__init__()
        self.config = config
        d, k = config.hidden_size, config.chunk_size
        self.token_head = (nn.Sequential(nn.Linear(d, k * d), nn.Unflatten(-1, (k, d)), RMSNorm(d, config.rms_norm_eps))
                           if config.aux_token_weight > 0 else None)
        self.latent_head = nn.Linear(d, config.latent_size) if config.aux_latent_weight > 0 else None
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=config.initializer_range)
                nn.init.zeros_(m.bias)
        self.uses_samples = config.head_mean_weight > 0 or config.decoder_ce_weight > 0
        # the factor of the current training progress; a tensor, so a compiled step is not re-traced per value
        self.register_buffer("factor", torch.ones(()), persistent=False)
        self.active = True

    def set_progress(self, progress: float) -> None:
        """Called by the trainer before every step with the fraction of training done."""
        f = aid_weight_factor(self.config, progress)
        self.factor.fill_(f)
        self.active = f > 0

    def forward(self, model: nn.Module, hidden: torch.Tensor, chunks: torch.Tensor, mean: torch.Tensor,
                mask: torch.Tensor | None, samples: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """For the CALM ``model`` (its embedding, head and frozen decoder): hidden (P, d) predicting the chunks (P, K)
        whose posterior means are mean (P, l); mask (P,) or None;
        samples (N, P, l): the energy loss's head draws (for the aids that read samples)."""
        cfg = self.config
        if cfg.aid_control == "shuffle":  # negative control: a random other position's chunk as the target
            perm = torch.randperm(chunks.shape[0], device=chunks.device)
            chunks, mean = chunks[perm], mean[perm]
        state = hidden.detach() if cfg.aid_control == "detach" else hidden
        if samples is not None and cfg.aid_control == "detach":  # the control: no aid gradient reaches the backbone
            samples = model.head(state, model.head.draw_noise(state))
        total = hidden.new_zeros((), dtype=torch.float32)
        metrics: dict[str, torch.Tensor] = {}
        targets = chunks if mask is None else chunks.masked_fill(~mask[:, None], -100)
        if self.token_head is not None:
            slots = self.token_head(state)  # (P, K, d)
            embedding = model.backbone.embed_tokens.weight
            ce, acc = linear_cross_entropy(slots, embedding.detach() if cfg.aid_control == "detach" else embedding,
                                           targets)
            total = total + cfg.aux_token_weight * ce
            metrics.update(aux_token_ce=ce.detach(), aux_token_acc=acc.detach())
        if self.latent_head is not None:
            err = F.mse_loss(self.latent_head(state).float(), mean.float(), reduction="none").mean(-1)
            mse = masked_mean(err, mask)
            total = total + cfg.aux_latent_weight * mse
            metrics["aux_latent_mse"] = mse.detach()
        if cfg.head_mean_weight > 0:
            err = F.mse_loss(samples.float().mean(0), mean.float(), reduction="none").mean(-1)
            mse = masked_mean(err, mask)
            total = total + cfg.head_mean_weight * mse
            metrics["head_mean_mse"] = mse.detach()
        if cfg.decoder_ce_weight > 0:
            z = samples[0]  # one of the energy loss's draws: differentiable in the head's weights and the state
            decoder = model.autoencoder.decoder
            slots = decoder.slot_hidden(decoder.expand(z.to(decoder.expand_layer.weight.dtype)))
            ce, acc = linear_cross_entropy(slots, decoder.output_weight, targets)
            total = total + cfg.decoder_ce_weight * ce
            metrics.update(decoder_ce=ce.detach(), decoder_acc=acc.detach())
        return self.factor * total, metrics
