"""The generative heads: the uniform interface, the samplers checked statistically against a known conditional
distribution (a 2-D Gaussian mixture whose modes depend on a label fed as the hidden state), with negative
controls showing that a wrong sampler fails the same check, and CALM models with each head end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from calmlm.models.calm import CALM
from calmlm.config import calm_preset
from calmlm.errors import ConfigError
from calmlm.evaluation.flops import head_network_calls, inference_flops_per_token
from calmlm.models.heads import HEADS, DiffusionHead

# The target: label 0 -> modes (-2, 0) and (2, 0); label 1 -> (0, 2) and (0, -2); weights 0.3 / 0.7, std 0.3.
MEANS = torch.tensor([[[-2.0, 0.0], [2.0, 0.0]], [[0.0, 2.0], [0.0, -2.0]]])
WEIGHTS = torch.tensor([0.3, 0.7])
STD = 0.3
D = 32  # hidden size of the test heads


def _head(kind: str, **over) -> nn.Module:
    cfg = calm_preset("debug", head=kind, latent_size=2, hidden_size=D, num_head_blocks=2, **over)
    head = HEADS[kind](cfg)
    head.zero_init_output()
    return head


def _label_hidden(labels: torch.Tensor) -> torch.Tensor:
    """A fixed hidden state per label (what a backbone would emit)."""
    g = torch.Generator().manual_seed(123)
    table = torch.randn(2, D, generator=g)
    return table[labels]


def _draw_targets(labels: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    comp = (torch.rand(labels.shape, generator=g) < WEIGHTS[1]).long()
    return MEANS[labels, comp] + STD * torch.randn(*labels.shape, 2, generator=g)


def mixture_errors(samples: torch.Tensor, label: int) -> dict[str, float]:
    """Distances of the samples' mixture (nearest-mode assignment) from the target's: weight, means, stds."""
    modes = MEANS[label]
    comp = torch.cdist(samples, modes).argmin(-1)
    out = {"weight": abs((comp == 1).float().mean().item() - WEIGHTS[1].item()), "mean": 0.0, "std": 0.0}
    for k in range(2):
        zk = samples[comp == k]
        if zk.shape[0] < 10:
            return {"weight": 1.0, "mean": math.inf, "std": math.inf}
        out["mean"] = max(out["mean"], (zk.mean(0) - modes[k]).abs().max().item())
        out["std"] = max(out["std"], (zk.std(0) - STD).abs().max().item())
    return out


def reproduces(head: nn.Module, bound: dict[str, float], n: int = 3000) -> tuple[bool, list[dict[str, float]]]:
    g = torch.Generator().manual_seed(7)
    errors = []
    with torch.no_grad():
        for label in (0, 1):
            z = head.sample(_label_hidden(torch.full((n,), label)), generator=g)
            errors.append(mixture_errors(z, label))
    ok = all(e[k] <= bound[k] for e in errors for k in bound)
    return ok, errors


# Sampling error for n = 3000: the weight's standard error is sqrt(0.21 / 3000) = 0.008; a mode's mean and std
# estimates have standard errors <= 0.3 / sqrt(900) = 0.01 and 0.007. The exact-network bounds are ~5 sigma.
EXACT_BOUND = {"weight": 0.04, "mean": 0.05, "std": 0.04}


# -- exact networks: the samplers alone ---------------------------------------------------------------------

class ExactVelocity(nn.Module):
    """The true flow-matching velocity E[x - x0 | x_t] of the mixture (x0 ~ N(0, I) at t = 0, data at t = 1);
    the label is read back from the hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.cond_embed = nn.Identity()

    def forward(self, x, t, c, c_emb=None):
        labels = (c @ _label_hidden(torch.tensor([0, 1])).T).argmax(-1)
        labels = labels.expand(x.shape[:-1])
        mu, t = MEANS[labels], t.float()[..., None, None]  # (…, 2 modes, 2), (…, 1, 1)
        var = t ** 2 * STD ** 2 + (1 - t) ** 2
        diff = x[..., None, :] - t * mu
        logw = WEIGHTS.log() - 0.5 * (diff ** 2).sum(-1) / var[..., 0]
        r = logw.softmax(-1)[..., None]
        u = mu + (t * STD ** 2 - (1 - t)) / var * diff
        return (r * u).sum(-2)


class ExactEpsilon(nn.Module):
    """The true E[ε | x_τ] of the mixture at original timestep τ, and v = -1 (the posterior variance)."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.cond_embed = nn.Identity()
        self.ac = alphas_cumprod

    def forward(self, x, t, c, c_emb=None):
        labels = (c @ _label_hidden(torch.tensor([0, 1])).T).argmax(-1).expand(x.shape[:-1])
        a = self.ac[t][..., None, None]  # float64
        mu, xd = MEANS[labels].double(), x.double()[..., None, :]
        var = a * STD ** 2 + 1 - a
        diff = xd - a.sqrt() * mu
        logw = WEIGHTS.double().log() - 0.5 * (diff ** 2).sum(-1) / var[..., 0]
        r = logw.softmax(-1)[..., None]
        eps = (r * (1 - a).sqrt() / var * diff).sum(-2)
        return torch.cat([eps.float(), -torch.ones_like(x)], -1)


@pytest.mark.parametrize("solver, steps", [("midpoint", 20), ("euler", 100)])
def test_flow_sampler_reproduces_the_mixture(solver: str, steps: int) -> None:
    head = _head("flow", flow_solver=solver, flow_steps=steps)
    head.net = ExactVelocity()
    ok, errors = reproduces(head, EXACT_BOUND)
    assert ok, errors


def test_wrong_flow_samplers_fail() -> None:
    """Negative controls: integrating the wrong way, or too few Euler steps to resolve the modes' spread."""
    head = _head("flow")
    head.net = ExactVelocity()
    real = head.net.forward
    head.net.forward = lambda x, t, c, c_emb=None: -real(x, t, c)  # Euler/midpoint with the wrong sign
    assert not reproduces(head, EXACT_BOUND)[0]
    head = _head("flow", flow_solver="euler", flow_steps=2)
    head.net = ExactVelocity()
    assert not reproduces(head, EXACT_BOUND)[0]


def test_diffusion_sampler_reproduces_the_mixture() -> None:
    head = _head("diffusion")
    head.net = ExactEpsilon(head.train_diffusion.arrays["alphas_cumprod"])
    ok, errors = reproduces(head, EXACT_BOUND)
    assert ok, errors


@pytest.mark.parametrize("break_it", ["respaced index", "no noise", "posterior swapped"])
def test_wrong_diffusion_samplers_fail(break_it: str, monkeypatch: pytest.MonkeyPatch) -> None:
    head = _head("diffusion")
    chain = head.gen_diffusion
    head.net = ExactEpsilon(head.train_diffusion.arrays["alphas_cumprod"])
    if break_it == "respaced index":  # feed the net k instead of the original timestep tau_k
        monkeypatch.setattr(chain, "original_timestep", lambda k: k)
    elif break_it == "no noise":
        head.temperature = 0.0
    else:
        a = chain.arrays
        a["posterior_mean_coef1"], a["posterior_mean_coef2"] = a["posterior_mean_coef2"], a["posterior_mean_coef1"]
        chain._cache.clear()
    assert not reproduces(head, EXACT_BOUND)[0]


# -- trained heads ------------------------------------------------------------------------------------------

def _train(head: nn.Module, steps: int, lr: float, batch: int = 256) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        labels = torch.randint(0, 2, (batch,), generator=g)
        loss = head.loss(_label_hidden(labels), _draw_targets(labels, g)[None])
        opt.zero_grad()
        loss.backward()
        opt.step()


# A briefly trained network is not exact: its bound is looser, but still fails a sampler that loses a mode,
# merges the modes, gets their weights wrong by 0.15, or their spread wrong by a factor 1.5.
TRAINED_BOUND = {"weight": 0.12, "mean": 0.25, "std": 0.15}


def test_trained_flow_head_reproduces_the_mixture() -> None:
    head = _head("flow")
    _train(head, steps=800, lr=3e-3)
    ok, errors = reproduces(head, TRAINED_BOUND, n=2000)
    assert ok, errors
    real = head.net.forward
    head.net.forward = lambda x, t, c, c_emb=None: -real(x, t, c, c_emb)
    assert not reproduces(head, TRAINED_BOUND, n=2000)[0]


def _reverse_from(head: DiffusionHead, start: int, label: int, n: int = 2000) -> torch.Tensor:
    """The head's reverse chain from respaced step ``start``, begun at the true q(x_tau | x_0) there."""
    chain, g = head.gen_diffusion, torch.Generator().manual_seed(9)
    labels = torch.full((n,), label)
    hidden = _label_hidden(labels)
    x = head.train_diffusion.q_sample(_draw_targets(labels, g), chain.original_timestep(torch.full((n,), start)),
                                      torch.randn(n, 2, generator=g))
    with torch.no_grad():
        for k in range(start, -1, -1):
            ks = torch.full((n,), k)
            x = chain.p_sample(head.net(x, chain.original_timestep(ks), hidden), x, ks, torch.randn(n, 2, generator=g))
    return x


def test_trained_diffusion_head_reproduces_the_mixture() -> None:
    """Trained for seconds, the ε-network and the reverse chain reproduce the mixture from tau ~ 950, where
    x_tau is almost pure noise (sqrt(alpha_bar) = 0.07: the modes and their weights must come from the model).

    The full chain starts at tau = 999 where the reference's schedule has beta = 0.99999: its posterior mean is
    ~316 x (x - ε_pred), so it needs the ε error there below ~1e-3, which seconds of training do not reach
    (the samples then diverge; see README "Generative heads"). The exact-network test covers the full chain."""
    head = _head("diffusion")
    _train(head, steps=800, lr=3e-3)
    start = round(0.95 * (head.gen_diffusion.num_steps - 1))
    for label in (0, 1):
        errors = mixture_errors(_reverse_from(head, start, label), label)
        assert all(errors[k] <= TRAINED_BOUND[k] for k in TRAINED_BOUND), (label, errors)
    a = head.gen_diffusion.arrays  # negative control: a broken posterior mean fails the same check
    a["posterior_mean_coef1"], a["posterior_mean_coef2"] = a["posterior_mean_coef2"], a["posterior_mean_coef1"]
    head.gen_diffusion._cache.clear()
    errors = mixture_errors(_reverse_from(head, start, 0), 0)
    assert not all(errors[k] <= TRAINED_BOUND[k] for k in TRAINED_BOUND)


# -- the interface ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["energy", "flow", "diffusion"])
def test_uniform_interface(kind: str) -> None:
    head = _head(kind)
    torch.nn.init.normal_(head.net.final_layer.linear.weight) if kind != "energy" else None
    hidden = torch.randn(3, 5, D)
    noise = head.noise((4, 3, 5), "cpu", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = head(hidden, noise)
        assert z.shape == (4, 3, 5, 2)
        # samples broadcast over the hidden state: sample s of position p depends only on (hidden p, noise s p)
        sub = noise[:, :, 0] if kind == "diffusion" else noise[:, 0]
        assert torch.allclose(head(hidden[0], sub), z[:, 0], atol=1e-5)
        # sample() = forward on its own noise draws, reproducible from the generator
        s1 = head.sample(hidden, 4, torch.Generator().manual_seed(0))
        assert torch.equal(s1, z)
        assert head.sample(hidden, generator=torch.Generator().manual_seed(0)).shape == (3, 5, 2)
    loss = head.loss(hidden.flatten(0, 1), torch.randn(head.num_targets, 15, 2))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert head.network_calls == {"energy": 1, "flow": 20, "diffusion": 100}[kind]


def test_fresh_heads_output_zero() -> None:
    """The reference's initialisation: modulation and output layers start at zero."""
    for kind in ("flow", "diffusion"):
        head = _head(kind)
        out = head.net(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]), torch.randn(4, D))
        assert torch.equal(out, torch.zeros_like(out))


def test_flow_step_count_and_solver() -> None:
    head = _head("flow", flow_steps=8)
    assert head.network_calls == 8
    calls = []
    real = head.net.forward
    head.net.forward = lambda x, t, c, c_emb=None: calls.append(t.flatten()[0].item()) or real(x, t, c, c_emb)
    head.sample(torch.randn(2, D))
    assert calls == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875])
    calls.clear()
    head.configure(calm_preset("debug", head="flow", latent_size=2, hidden_size=D, flow_solver="euler", flow_steps=4))
    head.sample(torch.randn(2, D))
    assert calls == pytest.approx([0.0, 0.25, 0.5, 0.75])


def test_diffusion_step_count() -> None:
    head = _head("diffusion", diffusion_sample_steps=10)
    assert head.network_calls == 10 and head.noise((3,), "cpu").shape == (11, 3, 2)
    assert head.gen_diffusion.timestep_map.tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    with pytest.raises(ConfigError, match="11"):
        head(torch.randn(3, D), torch.randn(5, 3, 2))


@pytest.mark.parametrize("over, match", [
    (dict(head="gan"), "unknown generative head"),
    (dict(head="flow", flow_solver="rk4"), "flow_solver"),
    (dict(head="flow", flow_steps=1), "midpoint"),
    (dict(head="diffusion", diffusion_sample_steps=2000), "exceeds diffusion_steps"),
    (dict(head="diffusion", diffusion_steps=0), "positive"),
])
def test_bad_head_options(over: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        calm_preset("debug", **over)


def test_flow_and_diffusion_allow_one_target() -> None:
    """num_samples >= 2 is an energy-score requirement only; the other heads have no model samples."""
    assert calm_preset("debug", head="flow", num_targets=1).num_targets == 1
    with pytest.raises(ConfigError, match="num_samples"):
        calm_preset("debug", num_samples=1)


def test_each_head_has_its_reference_draws() -> None:
    """num_samples is the energy head's N (none for the others); num_targets is every head's M, by default the
    reference's: energy 8 / 100, flow and diffusion 8 targets."""
    assert (calm_preset("debug").num_samples, calm_preset("debug").num_targets) == (8, 100)
    for head in ("flow", "diffusion"):
        cfg = calm_preset("debug", head=head)
        assert (cfg.num_samples, cfg.num_targets, cfg.training_head_calls) == (None, 8, 8)
    # the small preset's N (4) is its calls per position for every head; its M (25) is the energy head's
    small = calm_preset("small")
    assert (small.num_samples, small.num_targets) == (4, 25)
    assert calm_preset("small", head="flow").num_targets == small.replace(head="flow").num_targets == 4
    assert (small.replace(head="flow").replace(head="energy").num_samples,
            small.replace(head="flow").replace(head="energy").num_targets) == (4, 100)
    assert small.replace(head="diffusion", num_targets=16).num_targets == 16


@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_num_samples_with_a_flow_or_diffusion_head_is_one_line_error(head: str) -> None:
    with pytest.raises(ConfigError, match="give num_targets=4 instead") as e:
        calm_preset("debug", head=head, num_samples=4, num_targets=8)
    assert "\n" not in str(e.value) and "energy head" in str(e.value)


@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_old_config_dicts_load_with_their_meaning(tmp_path, head: str) -> None:
    """Older calmlm wrote every field; a flow/diffusion config's num_samples was its targets (num_targets=100 went
    unused). Such a config.json loads as the same model, trained on the same targets."""
    from calmlm.config import config_from_dict
    from calmlm.io.checkpoint import save_model
    from calmlm.io.loading import load

    for old_n, old_m, new_m in ((8, 100, 8), (4, 25, 4), (1, 100, 1)):
        cfg = calm_preset("debug", head=head, num_targets=new_m)
        old = {**cfg.to_dict(), "num_samples": old_n, "num_targets": old_m}
        assert config_from_dict(old) == cfg
    torch.manual_seed(0)
    model = CALM(calm_preset("debug", head=head))
    save_model(model, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_samples": 8, "num_targets": 100}))
    loaded = load(tmp_path / "m")
    assert loaded.config == model.config and loaded.head.num_targets == 8
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    torch.manual_seed(1)
    want = model(ids).loss
    torch.manual_seed(1)
    assert torch.equal(loaded(ids).loss, want)  # same draws, same loss
    # an energy config of either age is the same
    energy = calm_preset("debug")
    assert config_from_dict({**energy.to_dict(), "num_samples": 8, "num_targets": 100}) == energy


@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_flow_and_diffusion_losses_use_num_targets(head: str) -> None:
    from calmlm.evaluation.flops import training_flops_per_token

    torch.manual_seed(0)
    model = CALM(calm_preset("debug", head=head, num_targets=3))
    seen = []
    loss = model.head.loss
    model.head.loss = lambda hidden, targets, **kw: seen.append(targets.shape[0]) or loss(hidden, targets, **kw)
    model(torch.randint(0, model.config.vocab_size, (2, 16)))
    assert seen == [3]
    # training FLOPs: one head call per target
    flops = [training_flops_per_token(calm_preset("debug", head=head, num_targets=m)) for m in (3, 6, 9)]
    head_flops = [f.components["generative_head"] for f in flops]
    assert flops[0].notes["num_targets"] == 3 and "num_samples" not in flops[0].notes
    assert math.isclose(head_flops[2] - head_flops[1], head_flops[1] - head_flops[0]) and head_flops[1] > head_flops[0]


def test_flops_count_network_calls() -> None:
    for kind, calls in (("energy", 1), ("flow", 20), ("diffusion", 100)):
        cfg = calm_preset("debug", head=kind)
        assert head_network_calls(cfg) == calls
        assert inference_flops_per_token(cfg).notes["head_network_calls"] == calls
    flow = inference_flops_per_token(calm_preset("debug", head="flow")).components["generative_head"]
    flow10 = inference_flops_per_token(calm_preset("debug", head="flow", flow_steps=10)).components["generative_head"]
    assert flow10 < flow
    assert head_network_calls(calm_preset("debug", head="flow", flow_solver="euler", flow_steps=7)) == 7


# -- CALM models with each head -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_calm_with_head_trains_evaluates_and_generates(kind: str, tmp_path) -> None:
    """The same CALM code serves every head: forward/backward, save/load, BrierLM and T < 1 generation."""
    from calmlm.io.checkpoint import save_model
    from calmlm.io.loading import load_model
    from calmlm.sampling.generation import generate
    from calmlm.evaluation.brierlm import evaluate_brierlm

    torch.manual_seed(0)
    cfg = calm_preset("debug", head=kind, diffusion_sample_steps=10, flow_steps=4)
    model = CALM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    out = model(ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and f"{kind}_loss" in out.metrics
    assert model.head.net.final_layer.linear.weight.grad.abs().sum() > 0
    model.eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.head == kind and loaded.head.network_calls == model.head.network_calls
    r = evaluate_brierlm(loaded, ids, seed=0, progress=False)
    assert 0.0 <= r["brierlm"] <= 100.0
    gen = generate(loaded, ids[:1, :8], max_new_tokens=8, temperature=0.5, sampler="batch", pool_size=8, seed=0)
    assert gen.shape == (1, 16) and torch.equal(gen[:, :8], ids[:1, :8])
    loaded.set_head_options(**({"flow_steps": 2} if kind == "flow" else {"diffusion_sample_steps": 5}))
    assert loaded.head.network_calls == (2 if kind == "flow" else 5)
    with pytest.raises(ConfigError, match="cannot change after training"):
        loaded.set_head_options(diffusion_steps=10)


def test_energy_forward_unchanged_by_the_interface() -> None:
    """CALM.forward through head.loss gives the energy loss it always did (pinned draws)."""
    from calmlm.models.losses import energy_loss

    torch.manual_seed(0)
    cfg = calm_preset("debug")
    model = CALM(cfg)
    torch.nn.init.normal_(model.head.final_layer.linears[2].weight, std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    p = 2 * (16 // cfg.chunk_size - 1)
    noise = model.head.noise((cfg.num_samples, p), "cpu")
    eps = torch.randn(cfg.num_targets, p, cfg.latent_size)
    with torch.no_grad():
        got = model(ids, noise=noise, target_eps=eps).loss
        hidden = model.hidden_states(ids)[:, :-1].flatten(0, 1)
        mean, log_std = model.autoencoder.encode(ids)
        want = energy_loss(model.head(hidden, noise), mean[:, 1:].flatten(0, 1), log_std[:, 1:].flatten(0, 1),
                           cfg.num_targets, cfg.energy_alpha, eps)
    assert torch.equal(got, want)


def test_head_options_through_the_cli(tmp_path, capsys) -> None:
    """calm train --head/--diffusion-sample-steps, then calm generate/eval with other sampling steps, calm flops."""
    import json

    from calmlm.models.autoencoder import Autoencoder
    from calmlm.io.checkpoint import save_model
    from calmlm.cli import main
    from calmlm.config import autoencoder_preset
    from calmlm.io.loading import load
    from calmlm.data.tokenizer import train_tokenizer

    docs = [f"document {i}: " + " ".join(f"word{(i * j) % 37}" for j in range(60)) for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    save_model(Autoencoder(autoencoder_preset("debug", vocab_size=300)), tmp_path / "ae",
               tokenizer=train_tokenizer(docs, vocab_size=300))
    common = ["--data", str(tmp_path / "docs.jsonl"), "--cache-dir", str(tmp_path / "cache"), "--val-fraction", "0.1",
              "--max-steps", "2", "--eval-every", "0", "--save-every", "0", "--block-size", "32", "--batch-size", "2",
              "--no-progress", "--brier-tokens", "32"]
    assert main(["train", "--autoencoder", str(tmp_path / "ae"), "--preset", "debug", "--out", str(tmp_path / "calm"),
                 "--head", "diffusion", "--diffusion-sample-steps", "8", *common]) == 0
    model = load(tmp_path / "calm")
    assert model.config.head == "diffusion" and model.head.network_calls == 8
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "calm"), "--prompt", "document", "--max-new-tokens", "4",
                 "--diffusion-sample-steps", "4", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("document")
    assert main(["eval", "--model", str(tmp_path / "calm"), "--block-size", "32", "--max-tokens", "32", "--json",
                 "--no-progress", "--diffusion-sample-steps", "4"]) == 0
    assert "brierlm" in json.loads(capsys.readouterr().out)
    assert main(["flops", "--model", str(tmp_path / "calm" / "checkpoint"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inference_flops_per_token"]["notes"]["head_network_calls"] == 8
    assert main(["flops", "--preset", "debug", "--head", "flow", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inference_flops_per_token"]["notes"]["head_network_calls"] == 20
