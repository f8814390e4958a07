"""The Gaussian diffusion process of the diffusion head: cosine schedule, respacing, posterior, losses.

This is the improved-DDPM formulation the CALM reference uses (its ``models/diffusion``, from DiT/ADM):
ε-prediction with a learned-range variance, trained with MSE + the variational-bound term, sampled by
ancestral steps on a respaced chain. The schedule arrays are float64 (NumPy), as in the reference; every
coefficient gathered for a step is cast to float32 before it multiplies a tensor, as the reference does.

Nothing here is a module: a :class:`GaussianDiffusion` holds the schedule and turns network outputs into
posterior means, samples and losses. The network itself is called by the head (:mod:`calmlm.models.heads`), so
each function takes the network's output, not the network.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ConfigError


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta) with ᾱ(s) = cos²((s + 0.008)/1.008 · π/2) (Nichol & Dhariwal)."""
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """``count`` timesteps of 0..num_steps-1, evenly strided (a float stride accumulated, Python ``round``).

    For 1000 -> 100 this gives 0, 10, 20, 30, 40, 50, 61, ..., 989, 999 (the reference's ``space_timesteps``)."""
    if not 1 <= count <= num_steps:
        raise ConfigError(f"cannot respace {num_steps} diffusion steps into {count}; use 1..{num_steps}")
    stride = 1 if count <= 1 else (num_steps - 1) / (count - 1)
    steps, cur = [], 0.0
    for _ in range(count):
        steps.append(round(cur))
        cur += stride
    return sorted(set(steps))


class GaussianDiffusion:
    """A (possibly respaced) diffusion chain: index k of this chain is original timestep ``timestep_map[k]``."""

    def __init__(self, num_steps: int = 1000, sample_steps: int | None = None) -> None:
        base = np.cumprod(1.0 - cosine_betas(num_steps))
        keep = space_timesteps(num_steps, sample_steps or num_steps)
        # Respacing keeps ᾱ at the kept steps and recomputes β from it (also when every step is kept).
        betas, last = [], 1.0
        for i in keep:
            betas.append(1 - base[i] / last)
            last = base[i]
        b = np.array(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        arrays = {
            "betas": b,
            "log_betas": np.log(b),
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "alphas_cumprod_next": np.append(ac[1:], 0.0),
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
            "posterior_variance": post_var,
            # the posterior variance is 0 at k = 0; its log is clipped to the value at k = 1
            "posterior_log_variance_clipped": (np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1
                                               else np.log(b)),
            "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        }
        self.num_steps = len(b)
        # from_numpy: always CPU tensors, even when the model is built under torch.device("meta")
        self.arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}  # float64
        self.timestep_map = torch.from_numpy(np.array(keep, dtype=np.int64))
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def coef(self, name: str, k: torch.Tensor) -> torch.Tensor:
        """The float64 array ``name`` gathered at steps k, as float32 with a trailing axis (broadcasts over l)."""
        key = (name, k.device)
        if key not in self._cache:
            self._cache[key] = self.arrays[name].to(k.device).float()
        return self._cache[key][k][..., None]

    def original_timestep(self, k: torch.Tensor) -> torch.Tensor:
        """The timestep the network is fed at chain index k (the original, not the respaced, index)."""
        return self.timestep_map.to(k.device)[k]

    # -- forward process -----------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε."""
        return self.coef("sqrt_alphas_cumprod", t) * x_start + self.coef("sqrt_one_minus_alphas_cumprod", t) * noise

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t−1} | x_t, x_0)."""
        mean = self.coef("posterior_mean_coef1", t) * x_start + self.coef("posterior_mean_coef2", t) * x_t
        return mean, self.coef("posterior_log_variance_clipped", t)

    # -- reverse process -----------------------------------------------------------------------------
    def p_mean_variance(self, out: torch.Tensor, x: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
        """p(x_{k−1} | x_k) from the network output ``out`` = [ε_pred, v] (…, 2l) at x (…, l), steps k (…).

        Learned range: log σ² = frac·log β_k + (1 − frac)·log σ̃²_k with frac = (v + 1)/2, not clamped."""
        eps, v = out.chunk(2, dim=-1)
        min_log = self.coef("posterior_log_variance_clipped", k)
        max_log = self.coef("log_betas", k)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self.coef("sqrt_recip_alphas_cumprod", k) * x - self.coef("sqrt_recipm1_alphas_cumprod", k) * eps
        mean, _ = self.q_posterior(pred_xstart, x, k)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_sample(self, out: torch.Tensor, x: torch.Tensor, k: torch.Tensor, noise: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
        """One ancestral step: mean + [k ≠ 0]·σ·noise·temperature (the last step adds no noise)."""
        p = self.p_mean_variance(out, x, k)
        nonzero = (k != 0).float()[..., None]
        return p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise * temperature

    # -- training --------------------------------------------------------------------------------------
    def training_losses(self, out: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row ``mse`` (ε-prediction), ``vb`` (bits; ε_pred detached so only the variance learns from it)
        and ``loss`` = mse + vb, from the network output at x_t = q_sample(x_start, t, noise)."""
        eps, v = out.chunk(2, dim=-1)
        frozen = torch.cat([eps.detach(), v], dim=-1)
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        p = self.p_mean_variance(frozen, x_t, t)
        kl = normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]).mean(-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"])
        nll = nll.mean(-1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)  # t = 0: the decoder term of the bound
        mse = ((noise - eps) ** 2).mean(-1)
        return {"mse": mse, "vb": vb, "loss": mse + vb}


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of Φ."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(means, e^(2·log_scales)), bins of half-width 1/255, open-ended beyond ±0.999.

    An image-model term (pixels in [−1, 1]) kept because it is the reference's t = 0 loss; for latents it
    is simply the bound's decoder term evaluated on that grid."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
