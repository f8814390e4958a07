"""The flow-matching and diffusion heads against tensors the CALM reference computed (FlowTransformer,
DiffusionTransformer, models/diffusion): backbone, networks, losses, schedules, reverse steps, full samples,
decoded tokens and full-model losses, for the folders read directly and after `calm convert`.

The fixture lives outside the repository (../shared/fixtures/upstream_tiny_heads; its README describes every
tensor); the tests skip when it is absent. Nothing here depends on the fixture's sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from calmlm.cli import main as cli_main
from calmlm.errors import CheckpointError
from calmlm.io.loading import load_reference
from calmlm.io.reference import head_from_weights

HEADS_DIR = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "upstream_tiny_heads"
TOL = 2e-6  # float32 absolute (the README's independent re-implementation: <= 1.9e-6)
REL = 1e-5  # relative to the tensor's max |value|, for the large random-weight diffusion values

pytestmark = pytest.mark.skipif(not (HEADS_DIR / "reference.safetensors").is_file(),
                                reason=f"reference head fixtures not found at {HEADS_DIR} (not checked in)")


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(HEADS_DIR / "reference.safetensors")


@pytest.fixture(scope="module", params=["reference", "converted"])
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.nn.Module]:
    from calmlm.io.loading import load

    out = {}
    for name in ("flow", "diffusion"):
        src = HEADS_DIR / name
        if request.param == "converted":
            dst = tmp_path_factory.mktemp("conv") / name
            assert cli_main(["convert", str(src), str(dst)]) == 0
            saved = json.loads((dst / "config.json").read_text())
            assert saved["kind"] == "calm" and saved["head"] == name
            src = dst
        out[name] = load(src)
    return out


def _abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach().double() - b.double()).abs().max().item()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return _abs(a, b) / b.double().abs().max().item()


def _rows(ref: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    h = ref[f"{name}_hidden"]
    return h.reshape(-1, h.shape[-1])  # row b*N + n


# -- what was loaded ------------------------------------------------------------------------------------

def test_heads_are_told_apart(models) -> None:
    for name, model in models.items():
        assert model.config.head == name and not model.training
        cfg = json.loads((HEADS_DIR / name / "config.json").read_text())
        assert model.config.num_head_blocks == cfg["num_mlp_layers"]
        assert model.config.latent_size == cfg["latent_size"]
        # its flow/diffusion heads train on num_samples posterior targets: calmlm's num_targets
        assert (model.config.num_targets, model.config.num_samples) == (cfg["num_samples"], None)
        # the reference's hard-coded options are calmlm's defaults
        assert (model.config.flow_steps, model.config.flow_solver) == (20, "midpoint")
        assert (model.config.diffusion_steps, model.config.diffusion_sample_steps) == (1000, 100)
    assert models["flow"].head.network_calls == 20 and models["diffusion"].head.network_calls == 100


def test_head_from_weights_alone(tmp_path: Path) -> None:
    """Without `architectures` the state-dict keys decide (output layer l rows: flow, 2l: diffusion)."""
    from calmlm.io.checkpoint import WeightFiles

    for name in ("flow", "diffusion"):
        shapes = WeightFiles.find(HEADS_DIR / name).shapes()
        assert head_from_weights(shapes) == name
        folder = tmp_path / name
        shutil.copytree(HEADS_DIR / name, folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["architectures"] = ["EnergyTransformer" if name == "flow" else "FlowTransformer"]
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=f"weights hold the {name} head"):
            load_reference(folder)


# -- backbone and networks --------------------------------------------------------------------------------

def test_backbone_hidden_states(models, ref) -> None:
    with torch.no_grad():
        for name, model in models.items():
            assert _abs(model.hidden_states(ref["input_ids"]), ref[f"{name}_hidden"]) < TOL


def test_flow_network_and_time_truncation(models, ref) -> None:
    head = models["flow"].head
    # the net embeds (t * 1000).long(): a float32 multiply, then truncation (0.7f -> 700, not 699)
    assert torch.equal((ref["flow_t"] * 1000).long(), ref["flow_t_index"])
    with torch.no_grad():
        out = head.net(ref["flow_xt"], ref["flow_t"], _rows(ref, "flow"))
    assert _abs(out, ref["flow_net_out"]) < TOL
    t = ref["flow_t"]
    assert _abs((1 - t[:, None]) * ref["flow_x0"] + t[:, None] * ref["flow_x"], ref["flow_xt"]) < TOL


def test_flow_training_loss(models, ref) -> None:
    head = models["flow"].head
    with torch.no_grad():
        rows = head.row_losses(_rows(ref, "flow"), ref["flow_x"], ref["flow_t"], ref["flow_x0"])
        mean = head.loss(_rows(ref, "flow"), ref["flow_x"], ref["flow_t"], ref["flow_x0"])
    assert _abs(rows, ref["flow_loss"]) < TOL
    assert _abs(mean.reshape(1), ref["flow_loss_mean"]) < TOL


def test_flow_sample_every_call(models, ref) -> None:
    """Midpoint: 20 calls = 10 steps; each call's x, t and velocity, then the sample and its tokens."""
    model = models["flow"]
    head, hidden = model.head, _rows(ref, "flow")
    with torch.no_grad():
        for j in range(ref["flow_sample_calls_t"].shape[0]):
            t = ref["flow_sample_calls_t"][j].expand(hidden.shape[0])
            assert torch.equal((t * 1000).long(), ref["flow_sample_calls_t_index"][j].expand_as(t.long()))
            assert _abs(head.net(ref["flow_sample_calls_x"][j], t, hidden), ref["flow_sample_calls_v"][j]) < TOL
        sample = head(hidden, ref["flow_sample_x0"])
        assert _abs(sample, ref["flow_sample"]) < TOL
        b, n, k = ref["flow_tokens"].shape
        assert torch.equal(model.decode_latents(sample).reshape(b, n, k), ref["flow_tokens"])


def test_diffusion_network_and_losses(models, ref) -> None:
    head = models["diffusion"].head
    hidden, t = _rows(ref, "diffusion"), ref["diffusion_t"]
    with torch.no_grad():
        xt = head.train_diffusion.q_sample(ref["diffusion_x"], t, ref["diffusion_noise"])
        assert _abs(xt, ref["diffusion_xt"]) < TOL
        assert _abs(head.net(ref["diffusion_xt"], t, hidden), ref["diffusion_net_out"]) < TOL
        terms = head.loss_terms(hidden, ref["diffusion_x"], t, ref["diffusion_noise"])
        mean = head.loss(hidden, ref["diffusion_x"], t, ref["diffusion_noise"])
    assert _abs(terms["mse"], ref["diffusion_loss_mse"]) < TOL
    assert _rel(terms["vb"], ref["diffusion_loss_vb"]) < REL  # up to ~1.8e3 bits at t = 999
    assert _rel(terms["loss"], ref["diffusion_loss"]) < REL
    assert _rel(mean.reshape(1), ref["diffusion_loss_mean"]) < REL


def test_diffusion_schedules(models, ref) -> None:
    head = models["diffusion"].head
    for prefix, chain in (("train", head.train_diffusion), ("gen", head.gen_diffusion)):
        assert torch.equal(chain.timestep_map, ref[f"diffusion_{prefix}_timestep_map"])
        for key in [k for k in ref if k.startswith(f"diffusion_{prefix}_") and not k.endswith("timestep_map")]:
            name = key[len(f"diffusion_{prefix}_"):]
            ours, theirs = chain.arrays[name], ref[key]
            assert ours.dtype == torch.float64
            assert (ours - theirs).abs().max().item() <= 1e-15 * theirs.abs().max().item(), key
    cosine = ref["diffusion_cosine_betas"]
    from calmlm.models.diffusion import cosine_betas
    assert torch.equal(torch.from_numpy(cosine_betas(cosine.shape[0])), cosine)


def test_diffusion_reverse_steps(models, ref) -> None:
    """p_mean_variance and p_sample at single respaced steps; the net is fed the original timestep."""
    head = models["diffusion"].head
    chain, hidden, x = head.gen_diffusion, _rows(ref, "diffusion"), ref["diffusion_pmv_x"]
    with torch.no_grad():
        for i, k in enumerate(ref["diffusion_pmv_steps"].tolist()):
            ks = torch.full((x.shape[0],), k)
            tau = chain.original_timestep(ks)
            assert torch.equal(tau, ref["diffusion_pmv_orig_t"][i].expand_as(tau))
            out = head.net(x, tau, hidden)
            assert _abs(out, ref["diffusion_pmv_net_out"][i]) < TOL
            p = chain.p_mean_variance(out, x, ks)
            assert _abs(p["log_variance"], ref["diffusion_pmv_log_variance"][i]) < TOL
            assert _abs(p["variance"], ref["diffusion_pmv_variance"][i]) < TOL
            for name in ("mean", "pred_xstart"):
                assert _rel(p[name], ref[f"diffusion_pmv_{name}"][i]) < REL, (k, name)
            step = chain.p_sample(out, x, ks, ref["diffusion_psample_noise"])
            assert _rel(step, ref["diffusion_psample"][i]) < REL


def test_diffusion_full_sample(models, ref) -> None:
    model = models["diffusion"]
    head, hidden = model.head, _rows(ref, "diffusion")
    chain, traj, noises = head.gen_diffusion, ref["diffusion_sample_traj"], ref["diffusion_sample_noises"]
    with torch.no_grad():
        for j in range(noises.shape[0]):  # each step on its own, from the stored trajectory
            ks = torch.full((hidden.shape[0],), chain.num_steps - 1 - j)
            out = head.net(traj[j], chain.original_timestep(ks), hidden)
            assert _rel(chain.p_sample(out, traj[j], ks, noises[j]), traj[j + 1]) < REL, j
        sample = head(hidden, torch.cat([ref["diffusion_sample_x_T"][None], noises]))
        assert _rel(sample, ref["diffusion_sample"]) < REL
        b, n, k = ref["diffusion_tokens"].shape
        assert torch.equal(model.decode_latents(sample).reshape(b, n, k), ref["diffusion_tokens"])


# -- the full model --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, time_key, noise_key", [("flow", "t", "x0"), ("diffusion", "t", "noise")])
def test_full_model_loss(models, ref, name: str, time_key: str, noise_key: str) -> None:
    """CALM.forward: 8 posterior targets per position, paired with the hidden state, rows sample-major."""
    model = models[name]
    ids = ref["input_ids"]
    with torch.no_grad():
        mean, log_std = model.autoencoder.encode(ids)
        k = model.config.chunk_size
        assert _abs(mean[:, 1:].flatten(0, 1), ref["model_loss_target_mean"]) < TOL
        assert _abs(log_std[:, 1:].flatten(0, 1), ref["model_loss_target_log_std"]) < TOL
        hidden = model.hidden_states(ids)[:, :-1].flatten(0, 1)
        assert _abs(hidden, ref[f"{name}_model_loss_hidden"]) < TOL
        # the forward drops the last chunk: the backbone over chunks 0..N-2 gives the same states
        assert _abs(model.hidden_states(ids[:, :-k]).flatten(0, 1), ref[f"{name}_model_loss_hidden"]) < TOL
        eps = ref[f"{name}_model_loss_eps"]
        targets = mean[:, 1:].flatten(0, 1) + eps * log_std[:, 1:].flatten(0, 1).exp()
        assert _abs(targets, ref[f"{name}_model_loss_latents"]) < TOL
        t, noise = ref[f"{name}_model_loss_{time_key}"], ref[f"{name}_model_loss_{noise_key}"]
        rows = model.head.row_losses(hidden, targets, t, noise)
        assert _abs(rows.flatten(), ref[f"{name}_model_loss_rows"]) < 1e-5 * max(1.0, ref[f"{name}_model_loss_rows"].abs().max().item())
        out = model(ids, noise=noise, target_eps=eps, t=t)
    assert _abs(out.loss.reshape(1), ref[f"{name}_model_loss"]) < 1e-5 * max(1.0, ref[f"{name}_model_loss"].abs().item())
    assert f"{name}_loss" in out.metrics


@pytest.mark.parametrize("name", ["flow", "diffusion"])
def test_same_seed_same_draws_as_the_reference(models, ref, name: str) -> None:
    """Unpinned, calmlm makes the reference's draws in the reference's order (CPU generator): the seeded
    full-model loss, sample and temperature-1 tokens come out the same."""
    model = models[name]
    seeds = {"flow": (2484, 2480), "diffusion": (2485, 2483)}[name]
    with torch.no_grad():
        torch.manual_seed(seeds[0])
        loss = model(ref["input_ids"]).loss
        assert _rel(loss.reshape(1), ref[f"{name}_model_loss"]) < REL
        torch.manual_seed(seeds[1])
        assert _rel(model.head.sample(_rows(ref, name)), ref[f"{name}_sample"]) < REL
        torch.manual_seed(seeds[1])
        assert torch.equal(model.sample_chunks(ref[f"{name}_hidden"]), ref[f"{name}_tokens"])
