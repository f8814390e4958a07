"""``calm serve`` end to end: a real uvicorn server on 127.0.0.1 (a free port) with tiny random models, driven
by the official ``openai`` client. Models run in float64 so that batching cannot flip a near-tie."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from calmlm.io.checkpoint import save_model  # noqa: E402
from calmlm.cli.serve import build_server  # noqa: E402
from calmlm.config import baseline_preset, calm_preset  # noqa: E402
from calmlm.sampling.generation import generate  # noqa: E402
from calmlm.models import build_model  # noqa: E402
from calmlm.serve.app import create_app, simple_chat_prompt  # noqa: E402
from calmlm.serve.schemas import ChatMessage  # noqa: E402
from calmlm.data.tokenizer import train_tokenizer  # noqa: E402

TEXTS = ["the cat sat on the mat", "a dog and a cat", "hello world, said the dog"] * 20


def save_tiny_models(root: Path) -> dict[str, Path]:
    """A tiny tokenizer with a random debug CALM and baseline of its vocabulary (also used by test_lm_eval).
    The CALM head's zero-initialised output layer is randomised so that samples depend on the noise."""
    tok = train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    calm = build_model(calm_preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    torch.nn.init.normal_(calm.head.final_layer.linears[2].weight, std=2.0)
    base = build_model(baseline_preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    return {"calm": save_model(calm, root / "calm", tokenizer=tok),
            "baseline": save_model(base, root / "baseline", tokenizer=tok)}


class Running:
    """A uvicorn server in a thread, on a socket bound to a free loopback port."""

    def __init__(self, path: Path) -> None:
        self.server = build_server(str(path), device="cpu", dtype="float64", max_batch_size=16, batch_wait_ms=0)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(self.server), log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        self.name = self.server.model_name

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
        self.server.engine.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    paths = save_tiny_models(tmp_path_factory.mktemp("serve"))
    running = {kind: Running(path) for kind, path in paths.items()}
    yield running
    for r in running.values():
        r.stop()


@pytest.fixture(params=["calm", "baseline"])
def srv(request, servers) -> Running:
    return servers[request.param]


def _alone(srv: Running, prompt: str, max_tokens: int, seed: int, n: int = 1, **options) -> list[str]:
    """What calmlm.generate gives for this request (EOS and special tokens removed)."""
    tok, model = srv.server.tokenizer, srv.server.model
    ids = tok.encode(prompt)
    out = generate(model, ids, max_tokens, seed=seed, num_samples=n, eos_token_id=srv.server.eos, **options)
    texts = []
    for row in out[:, len(ids):].tolist():
        if srv.server.eos in row:
            row = row[:row.index(srv.server.eos)]
        texts.append(tok.decode(row, skip_special_tokens=True))
    return texts


def test_models_and_health(srv):
    assert [m.id for m in srv.client.models.list().data] == [srv.name]
    assert srv.client.models.retrieve(srv.name).id == srv.name
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}


SAMPLING = {
    "calm": [dict(temperature=1.0), dict(temperature=0.5, calm_sampler="batch", calm_pool_size=8),
             dict(temperature=0.5, calm_sampler="exact")],
    "baseline": [dict(temperature=1.0), dict(temperature=0.7, top_k=5)],
}


@pytest.mark.parametrize("kind,options", [
    pytest.param(k, o, marks=[pytest.mark.slow] if o.get("calm_sampler") == "exact" else [])  # rejection: ~30 s
    for k, opts in SAMPLING.items() for o in opts])
def test_completion_is_what_generate_gives(servers, kind, options):
    srv = servers[kind]
    extra = {k: v for k, v in options.items() if k != "temperature"}
    r = srv.client.completions.create(model=srv.name, prompt="the cat", max_tokens=10, seed=7, n=2,
                                      temperature=options["temperature"], extra_body=extra)
    gen_options = {"sampler": options.get("calm_sampler", "batch"), "pool_size": options.get("calm_pool_size", 200),
                   "top_k": options.get("top_k")}
    assert [c.text for c in r.choices] == _alone(srv, "the cat", 10, 7, n=2, temperature=options["temperature"],
                                                 **gen_options)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == len(srv.server.tokenizer.encode("the cat"))
    assert 0 < r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_seed_and_n(srv):
    ask = dict(model=srv.name, prompt="a dog", max_tokens=16, n=4)
    first = [c.text for c in srv.client.completions.create(seed=3, **ask).choices]
    assert first == [c.text for c in srv.client.completions.create(seed=3, **ask).choices]
    assert len(set(first)) > 1  # the n choices are different draws
    assert first != [c.text for c in srv.client.completions.create(seed=4, **ask).choices]


def test_streaming_completion_and_chat(srv):
    ask = dict(model=srv.name, prompt="hello", max_tokens=16, seed=5)
    whole = srv.client.completions.create(**ask).choices[0]
    pieces = list(srv.client.completions.create(stream=True, **ask))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == whole.text
    assert [p.choices[0].finish_reason for p in pieces if p.choices][-1] == whole.finish_reason
    assert len(pieces) > 2  # CALM: one event per K-token chunk; baseline: per token

    chat = dict(model=srv.name, messages=[{"role": "user", "content": "hello"}], max_tokens=12, seed=9)
    answer = srv.client.chat.completions.create(**chat)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == _alone(srv, simple_chat_prompt([ChatMessage(role="user",
                                                       content="hello")]), 12, 9)[0]
    events = list(srv.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **chat))
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == answer.choices[0].message.content
    assert events[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_stop_sequences(servers):
    srv = servers["baseline"]
    ask = dict(model=srv.name, prompt="the", max_tokens=24, seed=11)
    full = srv.client.completions.create(**ask).choices[0].text
    assert len(full) > 6
    stop = full[3:6]
    cut = full[:full.index(stop)]
    got = srv.client.completions.create(stop=[stop, "never-there"], **ask).choices[0]
    assert (got.text, got.finish_reason) == (cut, "stop")
    streamed = list(srv.client.completions.create(stop=stop, stream=True, **ask))
    assert "".join(p.choices[0].text for p in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_echo(srv):
    got = srv.client.completions.create(model=srv.name, prompt="the cat", max_tokens=4, seed=1, echo=True)
    alone = srv.client.completions.create(model=srv.name, prompt="the cat", max_tokens=4, seed=1)
    assert got.choices[0].text == "the cat" + alone.choices[0].text


@torch.no_grad()
def test_baseline_logprobs_are_the_model_log_probabilities(servers):
    srv = servers["baseline"]
    tok, model = srv.server.tokenizer, srv.server.model
    r = srv.client.completions.create(model=srv.name, prompt="the cat", max_tokens=6, seed=4, logprobs=3,
                                      temperature=0.8)
    ids = tok.encode("the cat")
    out = generate(model, ids, 6, seed=4, temperature=0.8, eos_token_id=srv.server.eos)[0].tolist()
    new = out[len(ids):]
    if srv.server.eos in new:
        new = new[:new.index(srv.server.eos)]
    lp = torch.log_softmax(model.logits(torch.tensor([out[:-1]])).float(), -1)[0, len(ids) - 1:]
    got = r.choices[0].logprobs
    assert got.tokens == [tok.decode([t]) for t in new]
    assert got.token_logprobs == pytest.approx([float(lp[i, t]) for i, t in enumerate(new)], abs=1e-9)
    for i, top in enumerate(got.top_logprobs):  # token string -> log p (ids that decode alike share a key)
        best = lp[i].topk(3)
        expected = dict(zip([tok.decode([t]) for t in best.indices.tolist()], best.values.tolist()))
        assert top == pytest.approx(expected, abs=1e-9)
    assert got.text_offset[0] == 0 and got.text_offset == sorted(got.text_offset)

    chat = srv.client.chat.completions.create(model=srv.name, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, seed=1, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= c.top_logprobs[0].logprob + 1e-9 for c in content)
    for ask, words in [(dict(logprobs=6), "between 0 and 5"), (dict(logprobs=1, stream=True), "stream"),
                       (dict(logprobs=1, echo=True), "echo with logprobs")]:
        assert words in _error(srv, **ask).body["message"]
    assert "top_logprobs needs logprobs" in _error(srv, "chat", top_logprobs=2).body["message"]


def test_concurrent_requests_are_batched_and_answer_as_alone(srv):
    prompts = ["the cat", "a dog and a cat sat", "", "hello world, said", "the mat", "a"]
    asks = [dict(model=srv.name, prompt=p, max_tokens=4 + 3 * i, seed=i, n=1 + i % 2,
                 temperature=[1.0, 0.5][i % 2]) for i, p in enumerate(prompts)]
    alone = [[c.text for c in srv.client.completions.create(**a).choices] for a in asks]
    engine = srv.server.engine
    batches, engine.batch_wait, engine.largest_batch = engine.batches, 0.5, 0
    try:
        with ThreadPoolExecutor(len(asks)) as pool:
            together = list(pool.map(lambda a: [c.text for c in srv.client.completions.create(**a).choices], asks))
    finally:
        engine.batch_wait = 0.0
    assert together == alone
    assert engine.largest_batch > 3 and engine.batches - batches < len(asks)  # some were decoded together


def test_requests_join_a_running_batch_and_answer_as_alone(srv, monkeypatch):
    """Continuous batching: requests sent while a batch decodes join it: a prompt longer than the batch's
    cache (the batch is shifted) and a short one that outlives the others (its padding is then trimmed)."""
    k = srv.server.engine.k
    first = dict(model=srv.name, prompt="the cat sat on the mat, said the dog", max_tokens=25 * k, seed=1)
    joiners = [dict(model=srv.name, prompt="a", max_tokens=40 * k, seed=2, n=2),
               dict(model=srv.name, prompt="hello world, said the dog " * 8, max_tokens=3 * k, seed=3,
                    temperature=0.5)]
    alone = [[c.text for c in srv.client.completions.create(**a).choices] for a in [first, *joiners]]
    engine = srv.server.engine
    joined, forward = engine.joined, engine._forward

    def slow_forward(*args):  # ~10 ms a step, so that the batch is still running when the others arrive
        time.sleep(0.01)
        return forward(*args)

    monkeypatch.setattr(engine, "_forward", slow_forward)
    stream = srv.client.completions.create(stream=True, **first)
    pieces = iter(stream)
    text = next(pieces).choices[0].text  # the first request is decoding now
    with ThreadPoolExecutor(len(joiners)) as pool:
        later = pool.map(lambda a: [c.text for c in srv.client.completions.create(**a).choices], joiners)
        text += "".join(p.choices[0].text for p in pieces)
        assert [[text], *later] == alone
    assert engine.joined - joined == len(joiners)


def test_a_failing_batch_or_a_vanished_client_does_not_take_the_server_down(srv, monkeypatch):
    engine = srv.server.engine

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine, "_forward", broken)
    with pytest.raises(openai.InternalServerError, match="simulated device failure"):
        srv.client.completions.create(model=srv.name, prompt="the cat", max_tokens=4)
    monkeypatch.undo()
    stream = srv.client.completions.create(model=srv.name, prompt="the", max_tokens=200, stream=True)
    next(iter(stream))
    stream.close()  # the client goes away mid-stream; its rows leave the batch
    got = srv.client.completions.create(model=srv.name, prompt="the cat", max_tokens=4)
    assert got.choices[0].finish_reason in ("length", "stop")


def _error(srv: Running, endpoint: str = "completions", **ask) -> openai.APIStatusError:
    create = srv.client.completions.create if endpoint == "completions" else srv.client.chat.completions.create
    base = dict(model=srv.name, max_tokens=4)
    base.update({"prompt": "the cat"} if endpoint == "completions" else {"messages": [{"role": "user",
                                                                                      "content": "hi"}]})
    base.update(ask)
    with pytest.raises(openai.APIStatusError) as info:
        create(**base)
    assert 400 <= info.value.status_code < 500
    assert info.value.body["message"]  # OpenAI-style {"error": {"message": ...}}
    return info.value


@pytest.mark.parametrize("ask,status,words", [
    (dict(temperature=0), 400, "temperature must be a finite number > 0"),
    (dict(temperature=-1), 400, "temperature"),
    (dict(max_tokens=0), 400, "max_tokens must be >= 1"),
    (dict(max_tokens=10**7), 400, "at most"),
    (dict(prompt="the cat " * 3000), 400, "longer than the model's context"),
    (dict(model="gpt-4"), 404, "does not exist"),
    (dict(n="two"), 400, "n: Input should be a valid integer"),
    (dict(max_tokens=[3]), 400, "max_tokens"),
    (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (dict(top_p=0.5), 400, "top_p is not supported"),
])
def test_bad_requests_get_clear_4xx_errors(srv, ask, status, words):
    e = _error(srv, **ask)
    assert e.status_code == status and words in e.body["message"]


def test_calm_specific_errors(servers):
    calm, base = servers["calm"], servers["baseline"]
    assert "CALM temperature must be in (0, 1]" in _error(calm, temperature=1.5).body["message"]
    assert "likelihood-free" in _error(calm, logprobs=2).body["message"]
    assert "BrierLM" in _error(calm, logprobs=1, echo=True).body["message"]
    assert "likelihood-free" in _error(calm, "chat", logprobs=True).body["message"]
    assert "top_k applies to the baseline only" in _error(calm, extra_body={"top_k": 3}).body["message"]
    assert "pool_size 1 is too small" in _error(calm, temperature=0.5, extra_body={"calm_pool_size": 1}).body["message"]
    assert "calm_sampler" in _error(calm, extra_body={"calm_sampler": "greedy"}).body["message"]
    # the baseline accepts temperatures above 1
    assert base.client.completions.create(model=base.name, prompt="a", max_tokens=2, temperature=1.5).choices


def test_malformed_json_and_wrong_body(srv):
    r = httpx.post(srv.url + "/v1/completions", content=b'{"model": "x", "prompt": ', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", timeout=30, headers={"content-type": "application/json"},
                   content=f'{{"model": "{srv.name}", "prompt": "a", "temperature": NaN}}'.encode())
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": srv.name}, timeout=30)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": srv.name, "messages": []}, timeout=30)
    assert r.status_code == 400 and "messages must not be empty" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", timeout=30, json={  # null means "unset", as clients send it
        "model": srv.name, "prompt": "a", "max_tokens": 3, "temperature": None, "n": None, "stop": None})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


def test_chat_prompt_templates(servers):
    messages = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi"),
                ChatMessage(role="assistant", content=[{"type": "text", "text": "hello"}]),
                ChatMessage(role="user", content="bye")]
    assert simple_chat_prompt(messages) == "System: be brief\nUser: hi\nAssistant: hello\nUser: bye\nAssistant:"
    from calmlm.serve.app import Server

    s = servers["baseline"].server
    templated = Server(s.model, s.tokenizer, "t", chat_template=(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"))
    strict = Server(s.model, s.tokenizer, "t", chat_template="{{ raise_exception('roles must alternate') }}")
    try:
        assert templated.chat_prompt(messages[1:2]) == "<user>hi<eos><assistant>"
        with pytest.raises(Exception, match="chat template refused these messages: roles must alternate") as info:
            strict.chat_prompt(messages)
        assert info.value.status == 400
    finally:
        strict.engine.close()
        templated.engine.close()


def test_cli_lists_serve():
    from calmlm.cli import build_parser

    assert "serve" in build_parser().format_help()


def test_the_served_name_is_what_the_user_passed(tmp_path, monkeypatch):
    """`--model runs/calm` serves the model as `calm` (not as its inner `checkpoint` folder), a Hub id keeps its
    id, and --served-model-name wins."""
    tok = train_tokenizer(TEXTS, vocab_size=300)
    base = build_model(baseline_preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    checkpoint = save_model(base, tmp_path / "runs" / "calm" / "checkpoint", tokenizer=tok)
    monkeypatch.setattr("calmlm.io.loading.download", lambda repo_id, revision=None: checkpoint)  # no network
    monkeypatch.chdir(tmp_path / "runs")
    for passed, served_as, name in [
            ("calm", None, "calm"), ("calm/", None, "calm"), (str(tmp_path / "runs" / "calm"), None, "calm"),
            ("calm/checkpoint", None, "checkpoint"), ("calm/checkpoint/model.safetensors", None, "checkpoint"),
            ("org/tiny-calm", None, "org/tiny-calm"), ("calm", "mine", "mine")]:
        server = build_server(passed, device="cpu", served_model_name=served_as)
        server.engine.close()
        assert server.model_name == name, passed
    monkeypatch.chdir(tmp_path / "runs" / "calm")
    server = build_server(".", device="cpu")
    server.engine.close()
    assert server.model_name == "calm"


@pytest.mark.parametrize("kind", ["calm", "baseline"])
def test_left_padded_rows_compute_what_they_compute_alone(kind):
    """Transformer.forward with left_padding's positions and mask: a row's real positions see neither its
    padding nor a shifted position, in the prefill and in later cached steps."""
    from calmlm.models.transformer import left_padding
    from calmlm.models import build_model as build

    torch.manual_seed(0)
    m = build(calm_preset("debug") if kind == "calm" else baseline_preset("debug")).eval().double()
    d = m.config.hidden_size
    long, short = torch.randn(1, 7, d, dtype=torch.float64), torch.randn(1, 3, d, dtype=torch.float64)
    x = torch.cat([long, torch.cat([torch.randn(1, 4, d, dtype=torch.float64), short], 1)])
    pad = torch.tensor([0, 4])
    cache, alone = m.backbone.new_cache(2, 12), [m.backbone.new_cache(1, 12) for _ in range(2)]
    both = m.backbone(x, cache, *left_padding(pad, 0, 7))
    torch.testing.assert_close(both[0], m.backbone(long, alone[0])[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both[1, 4:], m.backbone(short, alone[1])[0], rtol=1e-12, atol=1e-12)
    for _ in range(2):
        step = torch.randn(2, 1, d, dtype=torch.float64)
        both = m.backbone(step, cache, *left_padding(pad, cache.length, 1))
        for i in range(2):
            torch.testing.assert_close(both[i], m.backbone(step[i:i + 1], alone[i])[0], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(both).all()


def test_serving_benchmark_runs_at_a_tiny_size(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `benchmarks` is a folder beside the package
    from benchmarks import serve as bench

    out = tmp_path / "serve.json"
    bench.main(["--device", "cpu", "--calm-preset", "debug", "--baseline-preset", "debug", "--concurrency", "1,4",
                "--requests-per-client", "2", "--max-tokens", "8", "--prompt-len", "8", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["device"].startswith("CPU")
    rows = {(r["model"], r["concurrency"]): r for r in data["rows"]}
    assert set(rows) == {(m, c) for m in ("calm", "baseline") for c in (1, 4)}
    for (_, c), r in rows.items():
        assert r["requests"] == 2 * c and r["tokens_per_s"] > 0 and r["requests_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(8 * r["requests_per_s"])  # no EOS: exactly max_tokens each
