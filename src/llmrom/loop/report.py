"""The run report written as llmrom_report.json: one builder for in-memory and streaming runs."""

from .. import __version__
from ..data.textdata import tokens_sha256
from ..eval.evaluate import environment


def build_report(config, plan_info, tokens, before, after, records, wall_seconds, peak_rss, seconds=None,
                 floor=None):
    """The run report written as llmrom_report.json (one place for in-memory and streaming runs).
    `seconds`: where the time went (time_split); `floor`: the loop's arithmetic floor (loop_floor)."""
    report = {
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
    if seconds is not None:
        report["seconds"] = seconds
    if floor is not None:
        report["floor"] = {**floor, "wall_over_floor": round(wall_seconds / floor["seconds"], 3) if floor["seconds"]
                           else None}
    return report


def time_split(timings):
    """Seconds per kind of work of the block loop; `forward` excludes the covariance updates made inside it."""
    split = {k: round(v, 3) for k, v in timings.items()}
    split["forward"] = round(timings.get("forward", 0.0) - timings.get("covariance", 0.0), 3)
    return split


def loop_floor(shapes, records, groups, n_tokens, flops_per_second, output_stats=True):
    """The arithmetic floor of the sequential loop for this run: FLOPs and seconds at `flops_per_second`.

    Per token, a block before the first compressed one is run once (dense); a compressed block once dense
    for its statistics, once compressed for its outputs, and each of its groups' Gram products x x^T
    (d^2 per token with d the group's shared input; a single linear with fewer outputs, streamed from its
    outputs, d_out^2). Planning, eigendecompositions and I/O are not in it: the floor is the loop's
    unavoidable arithmetic, so wall / floor says how far the whole run is from it.
    """
    by_block = {}
    for s in shapes:
        by_block.setdefault(s.block, {})[s.name.rsplit(f".{s.block}.", 1)[1]] = s
    after = {r.name: (r.params_after if r.rank is not None else None) for r in records}
    compressed = sorted({s.block for s in shapes if after.get(s.name) is not None})
    first = compressed[0] if compressed else None
    macs = 0
    for b, linears in by_block.items():
        dense = sum(s.dense_params for s in linears.values())
        if first is None or b < first:
            macs += dense
            continue
        macs += dense + sum(after.get(s.name) or s.dense_params for s in linears.values())
        for g in groups or [[n] for n in linears]:
            s = linears.get(g[0])
            if s is not None:
                d = s.d_out if output_stats and len(g) == 1 and s.d_out < s.d_in else s.d_in
                macs += d * d
    flops = 2 * macs * n_tokens
    return {"flop": flops, "gflop_per_second": round(flops_per_second / 1e9, 2),
            "seconds": round(flops / flops_per_second, 6),
            "counts": "per token: blocks before the first compressed one once; compressed blocks dense + "
                      "compressed + Gram products of each group's input"}


def time_line(report):
    """One line for the terminal: wall time, peak RSS, where the time went and how far from the floor."""
    t, sec, floor = report["totals"], report.get("seconds", {}), report.get("floor")
    parts = [f"wall time {t['wall_seconds']:.0f} s, peak RSS {t['peak_rss_bytes'] / 2**30:.2f} GiB"]
    if sec:
        loop = sec.get("loop", {})
        parts.append("plan {:.0f} s, loop {:.0f} s ({})".format(
            sec.get("plan", 0.0), loop.get("total", sum(loop.values())),
            ", ".join(f"{k} {v:.0f}" for k, v in loop.items() if k != "total")))
    if floor and floor.get("wall_over_floor"):
        parts.append(f"{floor['wall_over_floor']:.2f}x the loop's arithmetic floor ({floor['seconds']:.0f} s at "
                     f"{floor['gflop_per_second']:.0f} GFLOP/s)")
    return "; ".join(parts)
