"""Recovery fine-tuning of a compressed model on a CPU (`llmrom heal`).

Two recipes, both leaving a plain llmrom model with exactly the parameters it had:
  * factors (WeLore's low-rank-only tuning): the factors `first`/`second` (and the bias) of the
    FactorizedLinear modules train, everything else is frozen;
  * lora: LoRA adapters on the factors (llmrom.heal.lora), merged into them at the end; optionally with
    LoRA-GGPO's gradient-guided weight perturbation (llmrom.lora.GGPO).

The loop: AdamW, linear warm-up then linear decay, gradient clipping, gradient accumulation; the
training text is cut into non-overlapping windows visited in a seeded random order (the data
position is one counter, so a checkpoint pins it exactly). Held-out perplexity is measured every
`eval_every` steps; training stops after `patience` evaluations without improvement and the best
evaluated weights are kept. Checkpoints hold the trainable tensors, optimizer, scheduler, RNGs and
data position, written atomically, so a resumed run reproduces an uninterrupted one.
"""

import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..eval.cost import count_params, peak_rss_bytes, reset_peak_rss
from ..errors import LlmromError, NonFiniteError
from ..modeling.factorized import FactorizedLinear
from .lora import GGPO, add_adapters, merge_adapters
from ..eval.perplexity import mean_nll
from ..data.textdata import PYDOCS_DIR, _tokenize, adds_bos

log = logging.getLogger(__name__)
MODES = ("factors", "lora")
DEFAULT_LR = {"factors": 1e-4, "lora": 1e-3}
CHECKPOINT_FILE = "state.pt"


@dataclass(frozen=True)
class HealConfig:
    mode: str = "factors"
    ggpo: bool = False
    tokens: int = 16384  # 16 steps of 4 x 256: about 3.5 min for SmolLM2 on 2 cores (6.5 s per 512 tokens measured)
    seqlen: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR[mode]
    weight_decay: float = 0.0
    warmup: float = 0.05
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple = ("first", "second")
    ggpo_alpha: float = 0.02
    ggpo_beta: float = 0.01
    modules: str | None = None
    eval_every: int = 4
    patience: int = 3
    checkpoint_every: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise LlmromError(f"unknown --train {self.mode!r}; choose factors or lora")
        if self.ggpo and self.mode != "lora":
            raise LlmromError("--ggpo perturbs LoRA adapters; use it with --train lora")
        for name in ("tokens", "seqlen", "batch_size", "grad_accum", "lora_rank", "eval_every", "patience"):
            if getattr(self, name) < 1:
                raise LlmromError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise LlmromError(f"--checkpoint-every must be 0 (off) or positive, got {self.checkpoint_every}")
        if self.lr is not None and not self.lr > 0:
            raise LlmromError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise LlmromError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except re.error as e:
                raise LlmromError(f"--modules {self.modules!r} is not a regular expression ({e})") from None

    @property
    def learning_rate(self):
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    @property
    def tokens_per_step(self):
        return self.seqlen * self.batch_size * self.grad_accum

    @property
    def steps(self):
        return math.ceil(self.tokens / self.tokens_per_step)

    def to_dict(self):
        return {**asdict(self), "lora_targets": list(self.lora_targets), "lr": self.learning_rate}


# ---- held-out text must stay held out -------------------------------------------------------------

SHINGLE_WORDS = 32  # a span of 32 words in common is copying, not shared vocabulary
OVERLAP_LIMIT = 0.01  # refuse when >= 1% of the smaller text's spans appear in the other


def _source_path(source):
    name, _, sub = source.partition(":")
    if name == "python-docs":
        return Path(os.environ.get("LLMROM_PYDOCS_DIR", PYDOCS_DIR), sub).resolve()
    p = Path(source).expanduser()
    return p.resolve() if p.exists() else None


def _shingles(text):
    words = text.split()
    return {hash(" ".join(words[i:i + SHINGLE_WORDS])) for i in range(max(0, len(words) - SHINGLE_WORDS + 1))}


def check_held_out(train_source, train_text, eval_source, eval_text):
    """Refuse training text that is, contains, or is contained in the evaluation text.

    Three checks: the same source name; one path (python-docs:X is a folder) inside the other; and
    verbatim spans: the sets of 32-word windows of both texts (hashed) share >= 1% of the smaller set.
    """
    fix = "train on other text (e.g. --data python-docs:library) or evaluate on other text (--eval)"
    if train_source == eval_source:
        raise LlmromError(f"--data and --eval are both {train_source}: held-out text cannot be trained on; {fix}")
    a, b = _source_path(train_source), _source_path(eval_source)
    if a is not None and b is not None and (a == b or a in b.parents or b in a.parents):
        raise LlmromError(f"--data {train_source} and --eval {eval_source} overlap on disk ({a} / {b}); {fix}")
    sa, sb = _shingles(train_text), _shingles(eval_text)
    shared = len(sa & sb)
    if sa and sb and shared >= max(1, OVERLAP_LIMIT * min(len(sa), len(sb))):
        raise LlmromError(f"--data {train_source} contains {shared} verbatim {SHINGLE_WORDS}-word spans of --eval "
                          f"{eval_source} ({shared / len(sb):.1%} of it); {fix}")
    return shared


# ---- data ---------------------------------------------------------------------------------------

def training_windows(tokenizer, text, seqlen):
    """All non-overlapping windows of the text (BOS first when the tokenizer adds one)."""
    ids = _tokenize(tokenizer, text)
    bos = adds_bos(tokenizer)
    span = seqlen - 1 if bos else seqlen
    n = len(ids) // span
    if n < 1 or span < 1:
        raise LlmromError(f"training text has {len(ids)} tokens, fewer than one --seqlen {seqlen} window; "
                          "use a longer --data text or a smaller --seqlen")
    windows = ids[: n * span].view(n, span)
    if bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), windows], 1)
    return windows


def batch_at(windows, position, batch_size, seed):
    """Micro-batch number `position`: an epoch is a seeded permutation of the windows."""
    n = len(windows)
    rows = []
    for k in range(position * batch_size, (position + 1) * batch_size):
        epoch, i = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(int(perm[i]))
    return windows[rows]


# ---- the loop -------------------------------------------------------------------------------------

def factorized_names(model, pattern=None):
    names = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    if pattern is not None:
        names = [n for n in names if re.search(pattern, n)]
    return names


def _trainable(model, cfg, names):
    """(trainable parameters by name, adapters or None). Everything else is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.mode == "lora":
        adapters = add_adapters(model, names, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha)
        params = {f"{n}.{k}": p for n, ad in adapters.items() for k, p in (("lora_A", ad.lora_A), ("lora_B", ad.lora_B))}
    else:
        adapters = None
        params = {f"{n}.{k}": p for n in names for k, p in model.get_submodule(n).named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    return params, adapters


def _schedule(cfg):
    steps, warm = cfg.steps, max(1, round(cfg.warmup * cfg.steps))
    return lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))


def _save_checkpoint(folder, state):
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT_FILE}.partial-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, folder / CHECKPOINT_FILE)


@torch.enable_grad()  # callers (the CLI, other library calls) may have switched gradients off globally
def heal(model, tokenizer, train_text, cfg: HealConfig, eval_windows=None, modules=None, progress=True,
         checkpoint_dir=None, resume=False, on_step=None):
    """Fine-tune `model` in place; returns the `heal` record for the report.

    `modules`: names of the modules to heal (default: every FactorizedLinear matching cfg.modules;
    dense nn.Linear names are accepted, e.g. to apply the same recipe to an uncompressed model).
    `checkpoint_dir`: where checkpoints go (every cfg.checkpoint_every steps); `resume` continues
    from the one there. `on_step(step)` is called after each optimizer step (tests interrupt here).
    """
    t_start = time.perf_counter()
    reset_peak_rss()
    names = list(modules) if modules is not None else factorized_names(model, cfg.modules)
    if not names:
        raise LlmromError("no factorized modules to heal" + (f" match --modules {cfg.modules!r}" if cfg.modules else
                          "; heal an llmrom-compressed folder (run `llmrom compress` first)"))
    params_before = count_params(model)
    windows = training_windows(tokenizer, train_text, cfg.seqlen)
    with torch.random.fork_rng(devices=[]):  # LoRA's initialisation follows the seed, not the caller's RNG
        torch.manual_seed(cfg.seed)
        params, adapters = _trainable(model, cfg, names)
    ggpo = GGPO(adapters, cfg.ggpo_alpha, cfg.ggpo_beta, cfg.seed) if cfg.ggpo else None
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    fingerprint = {"config": cfg.to_dict(), "modules": names, "windows": len(windows)}
    st = {"step": 0, "position": 0, "elapsed": 0.0, "evals": [], "best": None, "best_step": None,
          "best_state": None, "bad": 0, "ppl_before": None, "losses": [], "resumed_at": None}
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise LlmromError(f"--resume: no checkpoint at {ckpt}; run without --resume to start afresh")
        saved = torch.load(ckpt, weights_only=False)
        if saved["fingerprint"] != fingerprint:
            raise LlmromError(f"--resume: the checkpoint in {checkpoint_dir} was made with other settings or data; "
                              "repeat the original options, or drop --resume to start afresh")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved["params"][n])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        if ggpo is not None:
            ggpo.load_state_dict(saved["ggpo"])
        st = saved["state"]
        st["resumed_at"] = st["step"]
        log.info("resuming from step %d of %d", st["step"], cfg.steps)

    def evaluate():
        return math.exp(mean_nll(model, eval_windows, desc="held-out perplexity"))

    if eval_windows is not None and st["ppl_before"] is None:
        st.update(ppl_before=evaluate(), best_step=0, best_state={n: p.detach().clone() for n, p in params.items()})
        st["best"] = st["ppl_before"]
        log.info("held-out perplexity before healing: %.3f", st["ppl_before"])
    t0 = time.perf_counter() - st["elapsed"]
    bar = tqdm(total=cfg.steps, initial=st["step"], desc=f"heal ({cfg.mode}{'+ggpo' if ggpo else ''})",
               disable=not progress)
    stopped_early = False
    while st["step"] < cfg.steps:
        if ggpo is not None:
            ggpo.perturb()
        total = 0.0
        for _ in range(cfg.grad_accum):
            ids = batch_at(windows, st["position"], cfg.batch_size, cfg.seed)
            st["position"] += 1
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise NonFiniteError(f"non-finite training loss at step {st['step'] + 1}; lower --lr (now "
                                     f"{cfg.learning_rate:g}) or check the --data text")
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
        if ggpo is not None:
            ggpo.collect()
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        st["step"] += 1
        st["losses"].append(total)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{sched.get_last_lr()[0]:.2g}")
        if eval_windows is not None and (st["step"] % cfg.eval_every == 0 or st["step"] == cfg.steps):
            ppl = evaluate()
            st["evals"].append({"step": st["step"], "perplexity": ppl})
            bar.write(f"step {st['step']}: held-out perplexity {ppl:.3f} (best {min(ppl, st['best']):.3f})")
            if ppl < st["best"]:
                st.update(best=ppl, best_step=st["step"], bad=0,
                          best_state={n: p.detach().clone() for n, p in params.items()})
            else:
                st["bad"] += 1
            if st["bad"] >= cfg.patience:
                stopped_early = True
        st["elapsed"] = time.perf_counter() - t0
        if ckpt is not None and cfg.checkpoint_every and st["step"] % cfg.checkpoint_every == 0 \
                and not stopped_early and st["step"] < cfg.steps:
            _save_checkpoint(ckpt.parent, {
                "fingerprint": fingerprint, "state": st, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                "ggpo": ggpo.state_dict() if ggpo is not None else None,
                "params": {n: p.detach().clone() for n, p in params.items()}})
        if on_step is not None:
            on_step(st["step"])
        if stopped_early:
            log.info("held-out perplexity did not improve for %d evaluations; stopping at step %d",
                     cfg.patience, st["step"])
            break
    bar.close()
    if eval_windows is not None and st["best_step"] != st["step"]:
        if st["best_step"] == 0:
            log.warning("healing never beat the input's held-out perplexity %.3f: the output keeps the input "
                        "weights; lower --lr or change --data", st["ppl_before"])
        with torch.no_grad():  # keep the best evaluated weights (step 0: the input model)
            for n, p in params.items():
                p.copy_(st["best_state"][n])
    if ggpo is not None:
        ggpo.release()
    if adapters is not None:
        merge_adapters(model, adapters)
    for p in model.parameters():
        p.requires_grad_(False)
    if count_params(model) != params_before:
        raise AssertionError(f"healing changed the parameter count {params_before} -> {count_params(model)}")
    record = {
        "mode": cfg.mode + ("+ggpo" if cfg.ggpo else ""), "config": cfg.to_dict(),
        "modules": len(names), "trainable_parameters": sum(p.numel() for p in params.values()),
        "parameters": params_before, "steps": st["step"], "planned_steps": cfg.steps,
        "tokens": st["step"] * cfg.tokens_per_step, "training_windows": len(windows),
        "stopped_early": stopped_early, "resumed_at_step": st["resumed_at"],
        "train_loss_first": st["losses"][0] if st["losses"] else None,
        "train_loss_last": st["losses"][-1] if st["losses"] else None,
        "train_seconds": st["elapsed"], "wall_seconds": time.perf_counter() - t_start,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if eval_windows is not None:
        record["evaluation"] = {"windows": len(eval_windows), "seqlen": eval_windows.shape[1],
                                "perplexity_before": st["ppl_before"], "perplexity_after": st["best"],
                                "best_step": st["best_step"], "history": st["evals"]}
    return record
