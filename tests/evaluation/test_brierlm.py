"""BrierLM estimators against exact values on a Markov chain, the batched continuation against plain
forwards, and end-to-end runs of the real debug models.

Statistical checks use Bernstein's inequality with the *exact* per-position variances of the estimators
(computable for a first-order Markov chain), so each check fails for a correct implementation with
probability < DELTA; 16 checks in all keep the file's false-failure probability below 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

from calmlm.models.baseline import BaselineLM
from calmlm.models.calm import CALM
from calmlm.config import baseline_preset, calm_preset
from calmlm.errors import CalmError
from calmlm.evaluation.brierlm import (Continuations, accuracy_diversity, brierlm_from_sums, evaluate_brierlm,
                            make_brierlm_eval_fn)

DELTA = 1e-8
V = 6


def transition_matrix(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2.5 * torch.randn(V, V, generator=g, dtype=torch.float64)).softmax(-1)  # peaked rows


def markov_blocks(p: torch.Tensor, num_blocks: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(num_blocks, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, V, (num_blocks,), generator=g)
    for t in range(1, length):
        ids[:, t] = torch.multinomial(p[ids[:, t - 1]], 1, generator=g).squeeze(1)
    return ids


class MarkovChunks:
    """A sampling Continuable whose next chunk is K steps of the chain from the last token (the 'hidden state')."""

    def __init__(self, p: torch.Tensor, k: int) -> None:
        self.p, self.chunk_size = p.float(), k

    def start(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        b, length = ids.shape
        return ids.view(b, length // self.chunk_size, self.chunk_size)[..., -1:].float(), None

    def extend(self, state: None, chunks: torch.Tensor) -> torch.Tensor:
        return chunks[..., -1:].float()

    def sample_chunks(self, hidden: torch.Tensor, num_samples: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        cur = hidden[..., 0].long()
        if num_samples is not None:
            cur = cur.expand(num_samples, *cur.shape)
        out = []
        for _ in range(self.chunk_size):
            cur = torch.multinomial(self.p[cur.reshape(-1)], 1, generator=generator).view(cur.shape)
            out.append(cur)
        return torch.stack(out, -1)


class MarkovLogits:
    """A baseline stand-in: the hidden state is the last token, the head gives the chain's exact log-probabilities."""

    chunk_size = 1

    def __init__(self, p: torch.Tensor) -> None:
        self.log_p = p.float().log()

    def start(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ids[..., None].float(), None

    def extend(self, state: None, chunks: torch.Tensor) -> torch.Tensor:
        return chunks[..., -1:].float()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.log_p[hidden[..., 0].long()]


def exact_terms(p: torch.Tensor, ids: torch.Tensor, n: int, k: int, estimator: str) -> tuple[float, float, int]:
    """Exact mean Brier-n over the scored positions, the summed estimator variance, and the count.

    A position is the last prefix token t (t = (j+1)K-1 for CALM chunk j); its n-gram is ids[t+1 .. t+n].
    Markov: C_n(a) = Σ_x P(x|a)² over n-grams by C_1 = Σ_v P[a,v]², C_n = Σ_v P[a,v]² C_{n-1}(v)."""
    sq = p.square()
    c = [torch.ones(V, dtype=torch.float64)]
    for _ in range(n):
        c.append(sq @ c[-1])
    s = sq.sum(-1)
    d = s.square()  # baseline: E[c²] = Σ_a P(a)² S(last a)², a over (n-1)-grams
    for _ in range(n - 1):
        d = sq @ d
    length = ids.shape[1]
    ts = [t for t in range(k - 1, length - n, k)]
    mean, var = 0.0, 0.0
    for t in ts:
        y = ids[:, t]
        prob = torch.ones(ids.shape[0], dtype=torch.float64)
        for i in range(n):
            prob = prob * p[ids[:, t + i], ids[:, t + i + 1]]
        coll = c[n][y]
        mean += float((2 * prob - coll).sum())
        if estimator == "calm":  # X = 1 if a draw hits, -1 if both miss and agree, else 0
            hit_any = 1 - (1 - prob).square()
            miss_agree = coll - prob.square()
            var += float((hit_any + miss_agree - (2 * prob - coll).square()).sum())
        else:  # X = 2P(y) - 1{agree} S: only the collision term is random
            var += float((d[y] - coll.square()).sum())
    count = len(ts) * ids.shape[0]
    return mean / count, var, count


def bernstein(total_var: float, count: int, bound: float) -> float:
    """Half-width of the mean of independent terms with |X - EX| <= bound: P(|dev| > w) <= DELTA."""
    lg = math.log(2 / DELTA)
    return (bound * lg / 3 + math.sqrt((bound * lg / 3) ** 2 + 2 * total_var * lg)) / count


@pytest.mark.parametrize("k", [1, 2, 4])
def test_calm_estimator_is_unbiased_on_a_markov_chain(k: int) -> None:
    p = transition_matrix(1)
    ids = markov_blocks(p, 4096 * k, 16, seed=2)  # about 60k positions for every K
    r = evaluate_brierlm(MarkovChunks(p, k), ids, batch_size=4096, seed=3, progress=False)
    assert r["kind"] == "calm" and r["chunk_size"] == k and r["num_tokens"] == 4096 * k * 16
    for n in range(1, 5):
        mean, var, count = exact_terms(p, ids, n, k, "calm")
        assert r[f"count_{n}"] == count
        width = bernstein(var, count, 2.0)
        assert abs(r[f"brier_{n}"] - mean) <= width, (n, r[f"brier_{n}"], mean, width)
        assert width < 0.02  # tight enough to catch e.g. continuing from the true chunk instead of the sample
    assert r["chunk_accuracy"] == pytest.approx(r[f"accuracy_{min(k, 4)}"]) if k <= 4 else True


def test_baseline_estimator_is_unbiased_on_a_markov_chain() -> None:
    p = transition_matrix(4)
    ids = markov_blocks(p, 3000, 12, seed=5)
    r = evaluate_brierlm(MarkovLogits(p), ids, batch_size=3000, seed=6, progress=False)
    assert r["kind"] == "baseline"
    for n in range(1, 5):
        mean, var, count = exact_terms(p, ids, n, 1, "baseline")
        assert r[f"count_{n}"] == count
        width = bernstein(var, count, 1.0)  # the collision term lies in [0, 1]
        assert abs(r[f"brier_{n}"] - mean) <= width, (n, r[f"brier_{n}"], mean, width)
        assert width < 0.01
    # the accuracy term is exact (no sampling): check it to float precision
    for n in range(1, 5):
        prob = torch.ones(ids.shape[0], ids.shape[1] - n, dtype=torch.float64)
        for i in range(n):
            prob = prob * p[ids[:, i:ids.shape[1] - n + i], ids[:, i + 1:ids.shape[1] - n + i + 1]]
        assert r[f"accuracy_{n}"] == pytest.approx(float(prob.mean()), rel=1e-5)


def test_estimator_detects_broken_samplers() -> None:
    """The bounds have power: reusing one draw for both samples, or continuing an n-gram across a chunk
    boundary from the true chunk instead of the sampled one, are both caught."""

    class SameTwice(MarkovChunks):
        def sample_chunks(self, hidden, num_samples=None, generator=None):  # type: ignore[override]
            one = super().sample_chunks(hidden, None, generator)
            return one.expand(num_samples, *one.shape) if num_samples else one

    p = transition_matrix(1)
    ids = markov_blocks(p, 2048, 16, seed=2)
    r = evaluate_brierlm(SameTwice(p, 2), ids, batch_size=2048, seed=3, progress=False)
    mean, var, count = exact_terms(p, ids, 1, 2, "calm")
    assert abs(r["brier_1"] - mean) > bernstein(var, count, 2.0)

    class FromTrueChunk(MarkovChunks):
        def start(self, ids):  # type: ignore[override]
            hidden, _ = super().start(ids)
            return hidden, hidden

        def extend(self, state, chunks):  # type: ignore[override]
            return state.expand(chunks.shape[0], *state.shape)  # the true chunk's last token

    ids = markov_blocks(p, 8192, 16, seed=2)
    r = evaluate_brierlm(FromTrueChunk(p, 2), ids, batch_size=8192, seed=3, progress=False)
    mean, var, count = exact_terms(p, ids, 4, 2, "calm")
    assert abs(r["brier_4"] - mean) > bernstein(var, count, 2.0), (r["brier_4"], mean)


# -- the batched continuation is exact -------------------------------------------------------------------

def test_branch_forward_matches_plain_forwards() -> None:
    torch.manual_seed(0)
    for k in (1, 2):
        model = CALM(calm_preset("debug", chunk_size=k, num_kv_heads=2)).eval()  # GQA path too
        ids = torch.randint(0, 512, (2, 6 * k))
        adapter = Continuations(model)
        hidden, state = adapter.start(ids)
        torch.testing.assert_close(hidden, model.hidden_states(ids))
        chunks = [torch.randint(0, 512, (2, 2, 6, k)) for _ in range(3)]
        with torch.no_grad():
            for step in range(3):
                got = adapter.extend(state, chunks[step])
                for s in range(2):
                    for j in range(6):
                        seq = torch.cat([ids[:, :(j + 1) * k]] + [c[s, :, j] for c in chunks[:step + 1]], 1)
                        torch.testing.assert_close(got[s, :, j], model.hidden_states(seq)[:, -1],
                                                   atol=1e-5, rtol=1e-4)


def test_baseline_continuations_match_plain_logits() -> None:
    torch.manual_seed(0)
    model = BaselineLM(baseline_preset("debug")).eval()
    ids = torch.randint(0, 512, (2, 7))
    fast = Continuations(model)
    with torch.no_grad():
        h_fast, s_fast = fast.start(ids)
        torch.testing.assert_close(fast.head(h_fast), model.logits(ids), atol=1e-5, rtol=1e-4)
        cont = []
        for _ in range(3):
            tokens = torch.randint(0, 512, (2, 2, 7))
            cont.append(tokens)
            slow = torch.stack([torch.stack([model.logits(torch.cat([ids[:, :j + 1]] + [c[s, :, j:j + 1] for c in cont],
                                                                    1))[:, -1] for j in range(7)], 1)
                                for s in range(2)])
            torch.testing.assert_close(fast.head(fast.extend(s_fast, tokens[..., None])), slow, atol=1e-5, rtol=1e-4)


# -- real models end to end ----------------------------------------------------------------------------------

def _check_ranges(r: dict) -> None:
    for n in range(1, 5):
        assert -1.0 <= r[f"brier_{n}"] <= 1.0
        assert 0.0 <= r[f"accuracy_{n}"] <= 1.0 and 0.0 <= r[f"collision_{n}"] <= 1.0
    assert 0.0 <= r["brierlm"] <= 100.0


def test_debug_models_end_to_end() -> None:
    torch.manual_seed(0)
    data = torch.randint(0, 512, (160,))  # a flat stream, cut into blocks
    for model in (CALM(calm_preset("debug")), BaselineLM(baseline_preset("debug"))):
        model.train()
        r = evaluate_brierlm(model, data, block_size=32, batch_size=2, max_tokens=96, seed=0, progress=False)
        assert model.training  # the mode is restored
        assert r["block_size"] == 32 and r["num_blocks"] == 3 and r["num_tokens"] == 96
        _check_ranges(r)
        again = evaluate_brierlm(model, data, block_size=32, batch_size=3, max_tokens=96, seed=0, progress=False)
        assert again["brier_1"] == pytest.approx(r["brier_1"]) if r["kind"] == "baseline" else True
    fn = make_brierlm_eval_fn(block_size=16, batch_size=4)
    out = fn(BaselineLM(baseline_preset("debug")), data.view(-1, 16))
    assert out["brier_block_size"] == 16 and out["brier_tokens"] == 160 and "brierlm" in out


def test_calm_debug_with_a_noisy_head_gives_positive_collisions_below_one() -> None:
    torch.manual_seed(0)
    model = CALM(calm_preset("debug", chunk_size=2))
    for p in model.head.parameters():  # the output layer is zero-initialised; give the head some spread
        torch.nn.init.normal_(p, std=0.5) if p.dim() > 1 else None
    r = evaluate_brierlm(model, torch.randint(0, 512, (4, 24)), batch_size=4, progress=False)
    _check_ranges(r)
    assert r["collision_1"] < 1.0


def test_compiled_sampler_gives_the_same_calm_score() -> None:
    """compile=True draws CALM's samples through the compiled head + decoder: the same draws, the same sums."""
    torch.manual_seed(0)
    model = CALM(calm_preset("debug", chunk_size=2)).eval()
    torch.nn.init.normal_(model.head.final_layer.linears[2].weight, std=0.5)
    data = torch.randint(0, 512, (4, 24))
    eager = evaluate_brierlm(model, data, batch_size=4, progress=False)
    assert evaluate_brierlm(model, data, batch_size=4, progress=False, compile=True) == eager
    assert 0 < eager["collision_1"] < 1  # the draws vary: equal sums are not a coincidence of constant samples


def test_brierlm_geometric_mean_and_nonpositive() -> None:
    sums = {"acc": [0.5, 0.3, 0.2, 0.1], "coll": [0.2, 0.1, 0.05, 0.02], "count": [1.0] * 4, "chunk": [0, 0, 0]}
    r = brierlm_from_sums(sums)
    briers = [0.8, 0.5, 0.35, 0.18]
    assert r["brierlm"] == pytest.approx(100 * math.prod(briers) ** 0.25)
    sums["coll"][3] = 0.5
    r = brierlm_from_sums(sums)
    assert r["brierlm"] == 0.0 and "brierlm_note" in r


def test_bad_input_errors() -> None:
    model = CALM(calm_preset("debug"))
    with pytest.raises(CalmError, match="multiple of"):
        evaluate_brierlm(model, torch.zeros(2, 30, dtype=torch.long), progress=False)
    with pytest.raises(CalmError, match="vocabulary"):
        evaluate_brierlm(model, torch.full((1, 32), 9999), progress=False)
    with pytest.raises(CalmError, match="no complete block"):
        evaluate_brierlm(model, torch.zeros(20, dtype=torch.long), block_size=32, progress=False)
    with pytest.raises(CalmError, match="context"):
        evaluate_brierlm(model, torch.zeros(1, 4096, dtype=torch.long), progress=False)


def test_accuracy_diversity_points() -> None:
    p = transition_matrix(1)
    ids = markov_blocks(p, 256, 16, seed=0)
    base = accuracy_diversity(MarkovLogits(p), ids, [1.0, 0.5, 0.25], progress=False)
    assert [pt["temperature"] for pt in base] == [1.0, 0.5, 0.25]
    # lower temperature: sharper distribution, more collisions (exact for the baseline)
    assert base[0]["collision"] < base[1]["collision"] < base[2]["collision"]
    pts = accuracy_diversity(MarkovChunks(p, 1), ids, [1.0, 0.5], pool_sizes=[8, 32], progress=False)
    assert [(pt["temperature"], pt["pool_size"]) for pt in pts] == [(1.0, None), (0.5, 8), (0.5, 32)]
    assert all(0 <= pt["accuracy"] <= 1 and 0 <= pt["collision"] <= 1 for pt in pts)
    # T=1 chunk collision estimates the baseline's exact Σp² (same chain): 3840 positions, bound 5 sd
    assert abs(pts[0]["collision"] - base[0]["collision"]) < 5.5 * math.sqrt(0.25 / pts[0]["positions"])
    assert pts[2]["collision"] > pts[0]["collision"]


# -- DDP: disjoint blocks per rank, all-reduced sums ---------------------------------------------------------

def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        p = transition_matrix(4)
        ids = markov_blocks(p, 7, 12, seed=5)
        r = evaluate_brierlm(MarkovLogits(p), ids, batch_size=2, seed=0, progress=False)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({k: v for k, v in r.items() if k != "sums"}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_ddp_sums_are_all_reduced(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank returns the global result
    p = transition_matrix(4)
    single = evaluate_brierlm(MarkovLogits(p), markov_blocks(p, 7, 12, seed=5), batch_size=7, progress=False)
    assert ranks[0]["num_blocks"] == 7 and ranks[0]["num_tokens"] == 84
    for n in range(1, 5):
        assert ranks[0][f"count_{n}"] == single[f"count_{n}"]
        # the accuracy term is exact, so it matches the single-process run whatever the draws
        assert ranks[0][f"accuracy_{n}"] == pytest.approx(single[f"accuracy_{n}"], rel=1e-6)
