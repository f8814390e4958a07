"""The ``calmlm`` lm-evaluation-harness model, end to end through ``lm_eval.simple_evaluate`` on small local
task definitions (YAML + a JSON Lines file in a tmp folder; nothing is downloaded)."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from calmlm.io.checkpoint import save_model  # noqa: E402
from calmlm.config import baseline_preset, calm_preset  # noqa: E402
from calmlm.errors import CalmError  # noqa: E402
from calmlm.sampling.generation import generate  # noqa: E402
from calmlm.evaluation.lm_eval import CalmLMEval  # noqa: E402
from calmlm.models import build_model  # noqa: E402
from calmlm.data.tokenizer import train_tokenizer  # noqa: E402

DOCS = [{"question": q, "answer": a, "choices": [" cat", " dog", " mat"], "label": i % 3}
        for i, (q, a) in enumerate([("the cat sat on the", "mat"), ("a dog and a", "cat"), ("hello", "world"),
                                    ("the mat", "sat"), ("said the", "dog"), ("a cat", "sat")])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    tok = train_tokenizer(["the cat sat on the mat", "a dog and a cat", "hello world, said the dog"] * 20,
                          vocab_size=300)
    torch.manual_seed(0)
    calm = build_model(calm_preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    torch.nn.init.normal_(calm.head.final_layer.linears[2].weight, std=2.0)  # samples depend on the noise
    base = build_model(baseline_preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    paths = {"calm": save_model(calm, root / "calm", tokenizer=tok),
             "baseline": save_model(base, root / "baseline", tokenizer=tok)}
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = root / "tasks"
    tasks.mkdir()
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tasks / "gen.yaml").write_text(
        "task: calm_tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: [\" the\", \"\\n\"]\n  max_gen_toks: 12\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    (tasks / "mc.yaml").write_text(
        "task: calm_tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (tasks / "ppl.yaml").write_text(
        "task: calm_tiny_ppl\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{question}} {{answer}}'\nmetric_list:\n  - metric: word_perplexity\n")
    from lm_eval.tasks import TaskManager

    return paths, TaskManager(include_path=str(tasks), include_defaults=False), tok


def _evaluate(model, manager, task, **kw):
    return lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=manager, log_samples=True,
                                   bootstrap_iters=0, **kw)


def _responses(results, task):
    return {s["doc"]["question"]: s["resps"][0][0] for s in results["samples"][task]}


def test_registered_calm_model_runs_generate_until(setup, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    paths, manager, _ = setup
    args = f"pretrained={paths['calm']},dtype=float64,seed=3,greedy_temperature=0.5,calm_pool_size=16"
    first = _evaluate("calmlm", manager, "calm_tiny_gen", model_args=args, batch_size=4)
    assert 0.0 <= first["results"]["calm_tiny_gen"]["exact_match,none"] <= 1.0
    answers = _responses(first, "calm_tiny_gen")
    assert len(answers) == len(DOCS) and any(answers.values())
    for text in answers.values():  # stop strings cut the text
        assert " the" not in text and "\n" not in text
    again = _evaluate("calmlm", manager, "calm_tiny_gen", model_args=args, batch_size=4)
    assert _responses(again, "calm_tiny_gen") == answers  # per-request seeds: reproducible in batches


def test_baseline_greedy_generation_is_the_argmax_continuation(setup):
    paths, manager, tok = setup
    lm = CalmLMEval(pretrained=str(paths["baseline"]), dtype="float64", batch_size=8)
    answers = _responses(_evaluate(lm, manager, "calm_tiny_gen"), "calm_tiny_gen")
    assert lm.engine.largest_batch == len(DOCS)  # every request decoded in one batch
    for question, text in answers.items():
        ids = tok.encode(question)
        row = generate(lm.model, ids, 12, temperature=0.0)[0, len(ids):].tolist()
        if tok.eos_id in row:
            row = row[:row.index(tok.eos_id)]
        expected = tok.decode(row, skip_special_tokens=True)
        cuts = [i for i in (expected.find(" the"), expected.find("\n")) if i >= 0]
        assert text == (expected[:min(cuts)] if cuts else expected)


@torch.no_grad()
def test_baseline_likelihoods_are_the_model_log_probabilities(setup):
    paths, manager, tok = setup
    lm = CalmLMEval(pretrained=str(paths["baseline"]), dtype="float64", batch_size=4)
    results = _evaluate(lm, manager, "calm_tiny_mc")
    assert 0.0 <= results["results"]["calm_tiny_mc"]["acc,none"] <= 1.0
    sample = results["samples"]["calm_tiny_mc"][0]
    context, continuation = sample["arguments"][0]  # (context, first choice)
    ids = tok.encode(context + continuation)
    n = len(ids) - len(tok.encode(context))
    logp = torch.log_softmax(lm.model.logits(torch.tensor([ids[:-1]])).float(), -1)[0]
    expected = sum(float(logp[len(ids) - 1 - n + j, ids[len(ids) - n + j]]) for j in range(n))
    assert sample["resps"][0][0][0] == pytest.approx(expected, abs=1e-6)

    ppl = _evaluate(lm, manager, "calm_tiny_ppl")
    sample = ppl["samples"]["calm_tiny_ppl"][0]
    ids = [tok.eos_id, *tok.encode(sample["arguments"][0][0])]
    logp = torch.log_softmax(lm.model.logits(torch.tensor([ids[:-1]])).float(), -1)[0]
    expected = float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-6)
    assert ppl["results"]["calm_tiny_ppl"]["word_perplexity,none"] > 1


@torch.no_grad()
def test_rolling_windows_cover_every_token_once(setup):
    paths, _, tok = setup
    lm = CalmLMEval(pretrained=str(paths["baseline"]), dtype="float64")
    text = "the cat sat on the mat " * 40
    ids = [tok.eos_id, *tok.encode(text)]
    assert len(ids) > 201
    lm.model.config.max_position_embeddings = 100  # a context of 100 tokens: three windows

    class Req:
        args = (text,)

    got = lm.loglikelihood_rolling([Req()])[0]
    expected = 0.0
    for s in range(1, len(ids), 100):
        window = ids[s - 1:s + 100]
        logp = torch.log_softmax(lm.model.logits(torch.tensor([window[:-1]])).float(), -1)[0]
        expected += float(logp.gather(-1, torch.tensor(window[1:])[:, None]).sum())
    assert got == pytest.approx(expected, abs=1e-6)


def test_calm_likelihood_requests_name_the_reason(setup):
    paths, manager, _ = setup
    lm = CalmLMEval(pretrained=str(paths["calm"]), dtype="float64")
    for task in ("calm_tiny_mc", "calm_tiny_ppl"):
        with pytest.raises(CalmError, match="likelihood-free.*BrierLM"):
            _evaluate(lm, manager, task)


@pytest.mark.slow  # the harness's command line indexes its own thousands of tasks first (~15 s)
def test_harness_command_line(setup, monkeypatch, capsys):
    """``python -m calmlm.evaluation.lm_eval run --model calmlm ...`` is lm-eval's own CLI with calmlm registered."""
    from lm_eval.__main__ import cli_evaluate

    paths, _, _ = setup
    tasks = paths["calm"].parent / "tasks"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("sys.argv", ["lm_eval", "run", "--model", "calmlm", "--model_args",
                                     f"pretrained={paths['baseline']}", "--tasks", "calm_tiny_gen",
                                     "--include_path", str(tasks), "--device", "cpu", "--batch_size", "8"])
    cli_evaluate()
    assert "calm_tiny_gen" in capsys.readouterr().out
