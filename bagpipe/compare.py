"""`bagpipe compare RUN_A RUN_B`: are two runs the same training, bit for bit?"""

from __future__ import annotations

import os

from bagpipe.rundir import read_metrics, read_summary


def compare_runs(run_a: str, run_b: str) -> tuple[bool, str]:
    """(identical, explanation). Names the first iteration whose digests differ."""
    for run in (run_a, run_b):
        for name in ("metrics.jsonl", "summary.json"):
            if not os.path.exists(os.path.join(run, name)):
                return False, f"{run}: no {name} (did the run finish?)"
    metrics_a, metrics_b = read_metrics(run_a), read_metrics(run_b)
    by_iter_a = {m["iter"]: m for m in metrics_a if "digest" in m}
    by_iter_b = {m["iter"]: m for m in metrics_b if "digest" in m}
    for i in sorted(set(by_iter_a) | set(by_iter_b)):
        a, b = by_iter_a.get(i), by_iter_b.get(i)
        if a is None or b is None:
            missing = run_a if a is None else run_b
            return False, f"iteration {i}: missing in {missing}"
        if a["digest"] != b["digest"]:
            return False, (
                f"first difference at iteration {i}: digest {a['digest']} vs {b['digest']} "
                f"(loss {a.get('loss')!r} vs {b.get('loss')!r})"
            )
    da, db = read_summary(run_a).get("digest"), read_summary(run_b).get("digest")
    if da != db:
        return False, f"per-iteration digests agree over {len(by_iter_a)} iterations, final digests differ: {da} vs {db}"
    return True, f"identical: {len(by_iter_a)} iterations and the final digest {da}"
