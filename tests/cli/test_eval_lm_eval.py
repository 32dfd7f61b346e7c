"""``ssmkit eval MODEL --lm-eval TASKS``: a saved model on a local task (JSON lines + YAML written
here, nothing downloaded) reports the accuracy that the model's own log-likelihoods give, and
writes it to --output; misuse is one line with exit status 2. Skipped without lm_eval."""

import json

import pytest
import torch

import ssmkit
from ssmkit.cli.main import main

pytest.importorskip("lm_eval")

DOCS = [{"q": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
        {"q": "Fire is", "choices": [" hot", " cold"], "answer": 1},
        {"q": "Ice", "choices": [" melts", " sings"], "answer": 0}]


@pytest.fixture()
def setup(tmp_path):
    torch.manual_seed(0)
    model = ssmkit.LanguageModel(ssmkit.ModelConfig.from_name("tiny-hybrid")).eval()
    model.save_pretrained(str(tmp_path / "model"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "mc.yaml").write_text(
        f"task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    return model, tmp_path / "model", tasks


def _accuracy(model) -> float:
    right = 0
    for d in DOCS:
        scores = []
        for c in d["choices"]:
            ids = list(d["q"].encode()) + list((" " + c).encode())  # the task's " " delimiter
            n_ctx = len(d["q"].encode())
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0, :, :257].log_softmax(-1)
            scores.append(sum(float(logp[p, ids[p + 1]]) for p in range(n_ctx - 1, len(ids) - 1)))
        right += max(range(len(scores)), key=scores.__getitem__) == d["answer"]
    return right / len(DOCS)


def test_lm_eval_on_a_model_directory(setup, tmp_path, capsys):
    model, model_dir, tasks = setup
    out = tmp_path / "results.json"
    assert main(["eval", str(model_dir), "--lm-eval", "local_mc", "--include", str(tasks),
                 "--batch-size", "4", "--device", "cpu", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    acc = json.loads(out.read_text())["results"]["local_mc"]["acc,none"]
    assert acc == pytest.approx(_accuracy(model))
    assert f"{acc:.4f}" in next(line for line in printed.splitlines() if line.startswith("local_mc"))


@pytest.mark.parametrize("argv, match", [
    (["--lm-eval", "local_mc", "--lengths", "8"], "--lengths is for synthetic tasks"),
    (["--lm-eval", "local_mc", "--include", "{model}/config.json"], "config.json: not a directory"),
    (["--limit", "3"], "--limit goes with --lm-eval TASKS"),
])
def test_misuse_is_one_line(setup, capsys, argv, match):
    _, model_dir, _ = setup
    assert main(["eval", str(model_dir), *[a.format(model=model_dir) for a in argv]]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
