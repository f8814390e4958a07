"""CALM's training aids (models/aids.py): nothing changes when they are off or detached from inference, each
one's gradient reaches the parameters it should, their schedule, and that checkpoints stay plain CALM."""

from __future__ import annotations

import pytest
import torch

from calmlm.config import calm_preset
from calmlm.errors import ConfigError
from calmlm.evaluation.flops import training_flops_per_token
from calmlm.models.aids import TRAINING_ONLY_PREFIX, aid_weight_factor
from calmlm.models.calm import CALM

AIDS = {"aux_token_weight": 1.0, "aux_latent_weight": 1.0, "head_mean_weight": 1.0, "decoder_ce_weight": 0.5}


def _model(seed: int = 0, attach: bool = True, **aids: float | str) -> CALM:
    torch.manual_seed(seed)
    model = CALM(calm_preset("debug", **aids))
    with torch.no_grad():  # a non-trivial frozen autoencoder and head output, so every aid has a gradient to give
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if attach:
        model.attach_aids()
    return model.train()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(seed))


def _loss(model: CALM, ids: torch.Tensor, seed: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    return model(ids).loss


def test_off_or_unattached_is_plain_calm() -> None:
    ids = _ids()
    plain = _loss(_model(), ids)
    assert _model(**AIDS, attach=False).aids is None
    assert torch.equal(_loss(_model(**AIDS, attach=False), ids), plain)  # inference-built model: no aid, same loss
    assert _model().aids is None  # nothing to attach when every weight is 0
    with_aids = _model(**AIDS)
    assert set(with_aids.state_dict()) - set(_model().state_dict()) == {
        k for k in with_aids.state_dict() if k.startswith(TRAINING_ONLY_PREFIX)}
    with_aids.eval()  # evaluation (validation loss, BrierLM) never includes an aid
    _model().eval()
    with torch.no_grad():
        assert torch.equal(_loss(with_aids, ids), _loss(_model().eval(), ids))


@pytest.mark.parametrize("aid, own", [("aux_token_weight", "aids.token_head"),
                                      ("aux_latent_weight", "aids.latent_head"),
                                      ("head_mean_weight", None), ("decoder_ce_weight", None)])
def test_gradient_reaches_backbone_and_own_parameters(aid: str, own: str | None) -> None:
    ids = _ids()
    base, aided = _model(), _model(**{aid: 1.0})
    _loss(base, ids).backward()
    _loss(aided, ids).backward()
    grads = dict(aided.named_parameters())
    base_grads = dict(base.named_parameters())
    # the backbone's last layer gets a different gradient with the aid than without
    name = "backbone.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(grads[name].grad, base_grads[name].grad)
    if own is not None:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in grads.items() if n.startswith(own))
    if own is None:  # through the samples: the head's weights get more gradient
        head = "head.final_layer.linears.2.weight"
        assert not torch.allclose(grads[head].grad, base_grads[head].grad)
    assert all(p.grad is None for n, p in grads.items() if n.startswith("autoencoder."))  # still frozen


@pytest.mark.parametrize("aid", ["aux_token_weight", "aux_latent_weight", "head_mean_weight"])
def test_detach_control_keeps_the_backbone_gradient_of_plain_calm(aid: str) -> None:
    ids = _ids()
    base, control = _model(), _model(**{aid: 1.0, "aid_control": "detach"})
    _loss(base, ids).backward()
    _loss(control, ids).backward()
    for (name, p), q in zip(base.named_parameters(), control.parameters()):
        if p.grad is not None and not name.startswith("head."):  # the head itself may learn from its aid
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_shuffle_control_scores_other_chunks() -> None:
    ids = _ids()
    torch.manual_seed(0)
    straight = _model(aux_latent_weight=1.0)(ids).metrics["aux_latent_mse"]
    torch.manual_seed(0)
    shuffled = _model(aux_latent_weight=1.0, aid_control="shuffle")(ids).metrics["aux_latent_mse"]
    assert shuffled != straight


def test_schedule_and_switching_off() -> None:
    cfg = calm_preset("debug", aux_latent_weight=1.0, aid_until=0.5)
    assert aid_weight_factor(cfg, 0.0) == 1.0 and aid_weight_factor(cfg, 0.25) == 0.5
    assert aid_weight_factor(cfg, 0.5) == 0.0
    constant = cfg.replace(aid_schedule="constant")
    assert aid_weight_factor(constant, 0.49) == 1.0 and aid_weight_factor(constant, 0.5) == 0.0
    ids = _ids()
    aided = _model(aux_latent_weight=1.0, aid_until=0.5)
    aided.aids.set_progress(0.6)  # past aid_until: no aid is computed, the loss is plain CALM's
    assert torch.equal(_loss(aided, ids), _loss(_model(), ids))
    aided.aids.set_progress(0.25)
    out = aided(ids)
    assert out.metrics["aid_factor"] == 0.5 and "aux_latent_mse" in out.metrics


def test_config_checks_and_flops() -> None:
    with pytest.raises(ConfigError, match="aux_token_weight must be >= 0"):
        calm_preset("debug", aux_token_weight=-1.0)
    with pytest.raises(ConfigError, match="aid_until"):
        calm_preset("debug", aux_latent_weight=1.0, aid_until=0.0)
    with pytest.raises(ConfigError, match="decoder_ce_weight needs the energy head"):
        calm_preset("debug", head="flow", decoder_ce_weight=0.1)
    with pytest.raises(ConfigError, match="head_mean_weight needs the energy head"):
        calm_preset("debug", head="diffusion", head_mean_weight=0.1)
    off = dict(aux_latent_weight=0.0)  # the small preset's own aid off
    plain = training_flops_per_token(calm_preset("small", **off), 256)
    aided = training_flops_per_token(calm_preset("small", aux_token_weight=1.0, **off), 256)
    half = training_flops_per_token(calm_preset("small", aux_token_weight=1.0, aid_until=0.5, **off), 256)
    latent = training_flops_per_token(calm_preset("small"), 256).components["aux_latent_head"]
    assert latent == pytest.approx(6 * 256 * 64 / 4) and latent < 0.003 * plain.total  # nearly free
    extra = aided.components["aux_token_head"]
    d, k, v = 256, 4, 8192
    assert extra == pytest.approx(6 * (d * k * d + k * d * v) / k)  # per token: trained 3x, 2 FLOPs per MAC
    assert aided.total == pytest.approx(plain.total + extra)
    assert half.total == pytest.approx(plain.total + extra / 2)


def test_samples_are_shared_with_the_energy_loss():
    """The aids that read samples reuse the energy loss's own draws: with every aid weight at 0 but the head-mean
    regression's, the energy loss is the plain model's for the same seed (same draws, in the same order)."""
    ids = _ids()
    torch.manual_seed(5)
    plain = _model()(ids).metrics["energy_loss"]
    torch.manual_seed(5)
    aided = _model(head_mean_weight=1.0)(ids).metrics["energy_loss"]
    assert torch.equal(plain, aided)
