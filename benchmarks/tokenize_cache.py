"""Tokenised-data cache: the time to get the demo's training sets tokenised, first run vs second run.

    python benchmarks/tokenize_cache.py [--rows N]

Uses the demo preset's data (user mix + alignment rows) and the tiny base's tokenizer, a fresh cache
folder, and prints the seconds of each run side by side and their ratio. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=None, help="user rows (default: the demo's n)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lisa_align.cli import preset_path
    from lisa_align.config import load_config
    from lisa_align.data.tokenized_cache import tokenize_rows_cached
    from lisa_align.models.tiny import build_tokenizer
    from lisa_align.pipeline import load_run_data

    cfg = load_config(preset_path("demo"), [f"data.n={args.rows}"] if args.rows else [])
    data = load_run_data(cfg)
    tok = build_tokenizer(cfg.seed)
    sets = {"user": data.user, "alignment": data.alignment}
    first, second = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            for out in (first, second):
                t0 = time.perf_counter()
                cached = [tokenize_rows_cached(r, tok, cfg.data.max_length, cache_dir=d)[1]["cached"]
                          for r in sets.values()]
                out.append(time.perf_counter() - t0)
                assert all(cached) == (out is second)
    f, s = sorted(first)[len(first) // 2], sorted(second)[len(second) // 2]
    n = sum(len(r) for r in sets.values())
    print(f"{'rows':>6} {'first run s':>12} {'second run s':>13} {'ratio':>7}")
    print(f"{n:>6} {f:>12.3f} {s:>13.3f} {f / s:>6.1f}x")
    print(json.dumps({"rows": n, "first_s": round(f, 4), "second_s": round(s, 4), "speedup": round(f / s, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
