"""The model card (README.md) of a saved folder, in the Hugging Face convention, built with huggingface_hub.

YAML header: `base_model` (when the source is known by a hub id), `library_name: transformers`,
`pipeline_tag: text-generation`, tags. Body: what was done, the plan, a ranks summary, bytes, the quality
and speed measured so far (from the report), and how to load the folder.
"""

from collections import Counter

from huggingface_hub import ModelCard, ModelCardData

CARD_NAME = "README.md"


def base_model_id(source):
    """The hub id of the source model, if it has one: a packaged model's, or a hub-id-shaped name."""
    from .packaged import ALIASES, PACKAGED_MODELS
    name = str((source or {}).get("model") or "")
    key = ALIASES.get(name.lower(), name.lower())
    if key in PACKAGED_MODELS:
        return PACKAGED_MODELS[key].hub_id
    parts = name.split("/")
    return name if len(parts) == 2 and all(parts) and not name.startswith((".", "~")) else None


def _ranks_summary(modules):
    """One line per kind of linear (the last name part): how many factorized, the ranks' range."""
    kinds = {}
    for m in modules:
        kind = m["name"].rsplit(".", 1)[-1]
        kinds.setdefault(kind, []).append(m["rank"])
    lines = ["| linear | factorized | kept dense | ranks |", "|---|---:|---:|---|"]
    for kind, ranks in sorted(kinds.items()):
        got = [r for r in ranks if r is not None]
        span = f"{min(got)}-{max(got)}" if got else "-"
        lines.append(f"| {kind} | {len(got)} | {len(ranks) - len(got)} | {span} |")
    return "\n".join(lines)


def model_card(report, dense_export=False, folder_bytes=None):
    """The card's text for a folder described by `report` (llmrom_report.json)."""
    source = report.get("source", {})
    t, cfg, plan = report["totals"], report.get("config", {}), report.get("plan", {})
    data = ModelCardData(base_model=base_model_id(source), library_name="transformers",
                         pipeline_tag="text-generation",
                         tags=["llmrom", "compressed", "low-rank", "reduced-order-model"])
    kept = t["kept_fraction"]
    lines = [f"# {source.get('model', 'model')} compressed by llmrom to {kept:.1%} of its parameters", "",
             "Compressed without training by [llmrom](https://arxiv.org/abs/2312.07046) (reduced-order modelling of "
             "each linear layer's output features): every compressed linear is two thin linears whose product keeps "
             "the top principal directions of its outputs on the calibration text.", "",
             "| | before | after |", "|---|---:|---:|",
             f"| parameters | {t['parameters_before']:,} | {t['parameters_after']:,} |",
             f"| MACs per token | {t['macs_per_token_before']:,} | {t['macs_per_token_after']:,} |"]
    if folder_bytes:
        lines.append(f"| bytes on disk ({report.get('saved_dtype', 'float32')}) | | {folder_bytes:,} |")
    ev = report.get("evaluation")
    if ev:
        lines.append(f"| perplexity, {ev['source']} ({ev['windows']} x {ev['seqlen']} tokens) "
                     f"| {ev['perplexity_before']:.3f} | {ev['perplexity_after']:.3f} |")
    lines += ["", "## Plan", "",
              f"- policy: {plan.get('policy', '-')}"
              + (f", last {plan['last_blocks']} blocks at module budget {plan['module_budget']:.4f}"
                 if plan.get("last_blocks") else ""),
              f"- method: {cfg.get('method')}, factors {cfg.get('factors')}, centred {cfg.get('centered')}, "
              f"sequential {cfg.get('sequential')}",
              f"- calibration: {cfg.get('calib')}, {cfg.get('nsamples')} windows x {cfg.get('seqlen')} tokens, "
              f"seed {cfg.get('seed')} (token ids SHA-256 {report.get('calibration_tokens_sha256', '-')[:16]})"]
    if plan.get("embedding"):
        lines.append(f"- token embedding: rank {plan['embedding']['rank']}")
    kinds = Counter(m["rank"] is not None for m in report.get("modules", []))
    lines += [f"- {kinds[True]} linears factorized, {kinds[False]} kept dense", "", _ranks_summary(report["modules"])
              if report.get("modules") else "", ""]
    lines += ["## How to load", ""]
    if dense_export:
        lines += ["Merged weights in the original architecture (no llmrom needed):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("FOLDER")', "```"]
    else:
        lines += ["With plain transformers (the folder carries its modeling file; llmrom need not be installed):",
                  "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("FOLDER", trust_remote_code=True)',
                  'tokenizer = AutoTokenizer.from_pretrained("FOLDER")', "```", "", "Or with llmrom:", "",
                  "```python", "import llmrom", 'model, tokenizer = llmrom.load("FOLDER")', "```"]
    lines += ["", "Every decision (rank, explained variance, calibration error per module) is in "
                  "`llmrom_report.json`; `llmrom eval FOLDER` measures quality, bytes and speed against the source."]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def write_card(folder, report, dense_export=False):
    """Write README.md into `folder` (its weights already written, so their bytes are known)."""
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    card = ModelCard(model_card(report, dense_export, size))
    card.save(folder / CARD_NAME)
