"""The run report written as llmrom_report.json: one builder for in-memory and streaming runs."""

from .. import __version__
from ..data.textdata import tokens_sha256
from ..eval.evaluate import environment


def build_report(config, plan_info, tokens, before, after, records, wall_seconds, peak_rss):
    """The run report written as llmrom_report.json (one place for in-memory and streaming runs)."""
    return {
        "llmrom_version": __version__,
        "config": config.to_dict(),
        "plan": plan_info,
        "calibration_tokens": int(tokens.numel()),
        "calibration_tokens_sha256": tokens_sha256(tokens),  # compare runs: same text, tokenizer and windows
        "totals": {
            "parameters_before": before["parameters"], "parameters_after": after["parameters"],
            "kept_fraction": after["parameters"] / before["parameters"],
            "macs_per_token_before": before["macs_per_token"], "macs_per_token_after": after["macs_per_token"],
            "wall_seconds": wall_seconds, "peak_rss_bytes": peak_rss,
            "modules_factorized": sum(r.rank is not None for r in records),
            "modules_kept_dense": sum(r.rank is None for r in records),
        },
        "environment": environment(),
        "modules": [r.to_dict() for r in records],
    }
