"""The lm-evaluation-harness model: a local task (JSON lines + task YAML written here, nothing
downloaded) run by ``lm_eval.simple_evaluate`` gives the log-likelihoods of a direct computation
with ``LanguageModel`` (log-softmax of the logits over the continuation), rolling log-likelihoods
equal the direct sum over the whole text, and ``generate_until`` returns ssmkit.generate's greedy
text. Skipped without the ``lm_eval`` extra."""

import json

import pytest
import torch

import ssmkit
from ssmkit import LanguageModel, ModelConfig
from ssmkit.models.tokenizer import ByteTokenizer

lm_eval = pytest.importorskip("lm_eval")

from ssmkit.inference.harness import harness_model  # noqa: E402

DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0,
     "text": "State space models carry their context in a fixed-size state.", "prompt": "Q: 2+2="},
    {"question": "Fire is", "choices": [" hot", " cold"], "answer": 0, "text": "Short.",
     "prompt": "Name a colour:"},
    {"question": "Ice", "choices": [" melts", " sings", " is cold today"], "answer": 2,
     "text": "A third, medium-length text.", "prompt": "x"},
]
EOS = 256


def _write_tasks(d):
    (d / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'data.jsonl'}\ntest_split: test\n"
    (d / "mc.yaml").write_text(
        "task: local_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (d / "rolling.yaml").write_text(
        "task: local_rolling\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n")
    (d / "gen.yaml").write_text(
        "task: local_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_target: ' x'\ngeneration_kwargs:\n  until: ['e']\n  max_gen_toks: 6\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=4, vocab_size=257, layer_pattern="MA2G", ssm_cfg={"d_state": 4},
                      mamba2_cfg={"d_state": 8, "headdim": 16, "chunk_size": 4}, attn_cfg={"n_heads": 2},
                      deltanet_cfg={}, eos_token_id=EOS)
    return LanguageModel(cfg).eval()


@pytest.fixture(scope="module")
def samples(model, tmp_path_factory):
    from lm_eval.tasks import TaskManager

    d = tmp_path_factory.mktemp("tasks")
    _write_tasks(d)
    # chunk_size=4: long texts run through the cache in several chunks
    lm = harness_model(model, batch_size=4, chunk_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["local_mc", "local_rolling", "local_gen"],
                                  task_manager=TaskManager(include_path=str(d), include_defaults=False),
                                  log_samples=True)
    return out["samples"]


def _direct(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = model(ids).logits[0, :, :257].double().log_softmax(-1)
    pos = torch.arange(len(context) - 1, ids.shape[1] - 1)
    target = ids[0, pos + 1]
    return float(logp[pos, target].sum()), bool((logp[pos].argmax(-1) == target).all())


def test_multiple_choice_loglikelihoods_equal_the_direct_computation(model, samples):
    tok = ByteTokenizer()
    n = 0
    for s in samples["local_mc"]:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            lp, greedy = resp[0]
            want_lp, want_greedy = _direct(model, tok.encode(context), tok.encode(continuation))
            assert lp == pytest.approx(want_lp, abs=1e-3)
            assert greedy == want_greedy
            n += 1
    assert n == sum(len(d["choices"]) for d in DOCS)


def test_rolling_loglikelihood_is_the_sum_over_the_whole_text(model, samples):
    assert len(samples["local_rolling"]) == len(DOCS)
    for s in samples["local_rolling"]:
        (text,) = s["arguments"][0]
        want, _ = _direct(model, [EOS], ByteTokenizer().encode(text))
        assert s["resps"][0][0] == pytest.approx(want, abs=1e-3)


def test_generate_until_is_greedy_generate_cut_at_the_stop_string(model, samples):
    tok = ByteTokenizer()
    assert len(samples["local_gen"]) == len(DOCS)
    for s in samples["local_gen"]:
        context, kw = s["arguments"][0]
        ids = tok.encode(context)
        out = ssmkit.generate(model, torch.tensor([ids]), max_new_tokens=kw["max_gen_toks"], eos_token_id=EOS)
        new = out[0, len(ids):].tolist()
        new = new[:new.index(EOS)] if EOS in new else new
        assert s["resps"][0][0] == tok.decode(new).split("e", 1)[0]


def test_scores_do_not_depend_on_batch_or_chunk(model):
    tok = ByteTokenizer()
    pairs = [(tok.encode(d["question"]), tok.encode(c)) for d in DOCS for c in d["choices"]]
    one = harness_model(model, batch_size=1).score(pairs)
    many = harness_model(model, batch_size=8, chunk_size=3).score(pairs)
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb


def test_bad_arguments_name_themselves(model, monkeypatch):
    with pytest.raises(ValueError, match="batch_size"):
        harness_model(model, batch_size=0)
    with pytest.raises(TypeError, match="model must be an ssmkit LanguageModel"):
        harness_model(object())
    monkeypatch.setitem(__import__("sys").modules, "lm_eval.api.model", None)
    with pytest.raises(ImportError, match=r"ssmkit\[lm_eval\]"):
        harness_model(model)


def test_generate_until_stops_at_a_stop_string_the_model_produces(model):
    from lm_eval.api.instance import Instance

    tok = ByteTokenizer()
    prompts = ["Q: 2+2=", "Name a colour:", "x"]
    alone = []
    for p in prompts:
        out = ssmkit.generate(model, torch.tensor([tok.encode(p)]), max_new_tokens=8, eos_token_id=EOS)
        alone.append(tok.decode(out[0, len(tok.encode(p)):].tolist()))
    stop = alone[0][3]  # a character the first prompt generates: its text ends before it
    reqs = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 8}), i)
            for i, p in enumerate(prompts)]
    got = harness_model(model, batch_size=3).generate_until(reqs)
    assert got == [a.split(stop, 1)[0] for a in alone]
    assert len(got[0]) <= 3
