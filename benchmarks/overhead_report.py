"""benchmarks/overhead.py, part 5: one result row per (config, mode), and the printed tables."""

from __future__ import annotations

import statistics

from overhead_attribution import estimate_ratio
from overhead_models import LABELS, METHODS, Spec
from overhead_timing import PARTS, median_ms


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summarize(spec: Spec, t: dict, mem: dict | None, peak_flops: float | None) -> dict:
    w = spec.warmup
    sft, lisa = t["times_s"]["sft"][w:], t["times_s"]["lisa"][w:]
    med = {"sft": median_ms(sft), "lisa": median_ms(lisa)}
    mean = {"sft": 1000 * statistics.fmean(sft), "lisa": 1000 * statistics.fmean(lisa)}
    switches = [s for s in t["switch_steps"] if s >= w]
    switch_ms = [1000 * t["times_s"]["lisa"][s] for s in switches]
    tokens = spec.batch * spec.seq_len
    row = {"config": spec.config, "mode": spec.mode, "params": t["params"], "trainable_params": t["trainable_params"],
           "batch": spec.batch, "seq_len": spec.seq_len, "measured_steps": len(lisa), "k1": spec.k1, "k2": spec.k2,
           "median_ms": med, "mean_ms": mean, "time_ratio": med["lisa"] / med["sft"],
           "mean_time_ratio": mean["lisa"] / mean["sft"],
           "paired_time_ratio": statistics.median(x / y for x, y in zip(lisa, sft)),
           "est_time_ratio": estimate_ratio(t["attribution"], med["sft"], spec),
           "switch_steps_measured": switches,
           "lisa_switch_step_ms": switch_ms,
           "tokens_per_s": {m: tokens / (med[m] / 1000) for m in METHODS},
           "trainable_bytes": t["trainable_bytes"], "anchor_bytes": t["anchor_bytes"],
           "attribution_ms": t["attribution"], "segments_ms": t["segments"]}
    if peak_flops:
        row["peak_flops"] = peak_flops
        row["mfu"] = {m: 6 * t["params"] * row["tokens_per_s"][m] / peak_flops for m in METHODS}
    if mem:
        row["peak_mem_bytes"] = {m: mem[m]["peak_bytes"] for m in METHODS}
        row["extra_mem_bytes"] = mem["lisa"]["peak_bytes"] - mem["sft"]["peak_bytes"]
        row["mem_meter"] = mem["sft"]["meter"]
        if "rss_peak_bytes" in mem["sft"]:
            row["rss_peak_bytes"] = {m: mem[m]["rss_peak_bytes"] for m in METHODS}
            row["extra_rss_bytes"] = mem["lisa"]["rss_peak_bytes"] - mem["sft"]["rss_peak_bytes"]
        row["mem_child_anchor_bytes"] = mem["lisa"]["anchor_bytes"]
    return row


def _label(r: dict) -> str:
    return f"{LABELS.get(r['config'], r['config']):<12}{r['mode']:<6}"


def _opt(x, fmt: str, width: int) -> str:
    return f"{x:>{width}{fmt}}" if x is not None else f"{'-':>{width}}"


def print_table(rows: list[dict]) -> None:
    head = (f"{'config':<12}{'mode':<6}{'params':>9}{'SFT ms':>10}{'Lisa ms':>10}{'ratio':>8}{'paired':>8}"
            f"{'mean r':>8}{'est.':>7}"
            f"{'SFT peak':>11}{'Lisa peak':>11}{'extra':>11}{'anchor':>11}{'trainable':>11}{'extra/tr':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        peaks = r.get("peak_mem_bytes", {})
        extra = r.get("extra_mem_bytes")
        print(f"{_label(r)}{r['params'] / 1e6:>8.1f}M"
              f"{r['median_ms']['sft']:>10.1f}{r['median_ms']['lisa']:>10.1f}{r['time_ratio']:>8.3f}{r['paired_time_ratio']:>8.3f}"
              f"{r['mean_time_ratio']:>8.3f}{r['est_time_ratio']:>7.3f}{fmt_bytes(peaks.get('sft')):>11}{fmt_bytes(peaks.get('lisa')):>11}"
              f"{fmt_bytes(extra):>11}{fmt_bytes(r['anchor_bytes']):>11}{fmt_bytes(r['trainable_bytes']):>11}"
              + (f"{extra / r['trainable_bytes']:>9.2f}" if extra is not None else f"{'-':>9}"))
    print("\nms: median wall time per optimizer step over the measured steps; ratio = Lisa/SFT of the medians; paired:")
    print("median of Lisa/SFT over steps taken side by side; mean r: ratio of the means (these hold the switch and")
    print("logging steps); est.: 1 + Lisa's pieces (table below) / SFT's median, at K1/K2 = 100/900. peak: peak")
    print("memory above that before training (meter below); extra = Lisa peak - SFT peak; extra/tr: in copies of the")
    print("trainable weights (target: 1.00, +1%).")
    meters = {r["mem_meter"] for r in rows if "mem_meter" in r}
    if meters:
        print(f"memory meter: {'; '.join(sorted(meters))}.")
    if any("rss_peak_bytes" in r for r in rows):
        print("peak RSS above the RSS before training (coarser: it also holds the Python heap, the alignment rows")
        print("and allocator slack):")
        for r in rows:
            if "rss_peak_bytes" in r:
                print(f"  {_label(r)}SFT {fmt_bytes(r['rss_peak_bytes']['sft'])}, "
                      f"Lisa {fmt_bytes(r['rss_peak_bytes']['lisa'])}, extra {fmt_bytes(r['extra_rss_bytes'])}")
    print(f"\n{'config':<12}{'mode':<6}{'steps':>6}{'K1/K2':>8}{'switch ms':>16}{'tok/s SFT':>11}{'tok/s Lisa':>11}"
          f"{'MFU SFT':>9}{'MFU Lisa':>9}")
    for r in rows:
        sw = ",".join(f"{x:.0f}" for x in r["lisa_switch_step_ms"]) or "-"
        mfu = r.get("mfu")
        print(f"{_label(r)}{r['measured_steps']:>6}"
              f"{r['k1']:>4}/{r['k2']:<3}{sw:>16}{r['tokens_per_s']['sft']:>11.0f}{r['tokens_per_s']['lisa']:>11.0f}"
              + (f"{100 * mfu['sft']:>8.1f}%{100 * mfu['lisa']:>8.1f}%" if mfu else f"{'-':>9}{'-':>9}"))
    print("\nWhere Lisa's extra time goes (ms). proximal: add_pull_gradient on Lisa's own weights and anchor; switch:")
    print("drift + log record + anchor copy (both timed by calling the public functions after the run, median);")
    print("drift on logging steps (inside the steps, mean per call, calls); fetching a step's batches (median, SFT /")
    print("Lisa); the sum per step (amortized) vs Lisa - SFT (means). In-step cross-checks from the step parts:")
    print("prox@step = Lisa's tail - SFT's (medians); switch@step = Lisa's prep on switch steps - on the others.")
    print(f"{'config':<12}{'mode':<6}{'proximal':>10}{'drift@log':>14}{'switch':>14}{'fetch S/L':>14}"
          f"{'sum/step':>10}{'measured':>10}{'prox@step':>11}{'switch@step':>13}")
    for r in rows:
        a = r["attribution_ms"]
        diff = r["mean_ms"]["lisa"] - r["mean_ms"]["sft"]
        print(f"{_label(r)}{a['proximal_ms']:>10.2f}"
              f"{a['drift_log_ms']:>9.2f} ({a['drift_log_calls']}){a['switch_ms']:>9.2f} ({a['switch_calls']})"
              f"{a['fetch_sft_ms']:>7.2f}/{a['fetch_lisa_ms']:<6.2f}{a['per_step_ms']:>10.2f}{diff:>10.2f}"
              f"{_opt(a['proximal_instep_ms'], '.2f', 11)}{_opt(a['switch_instep_ms'], '.2f', 13)}")
    print("\nThe step in parts (median ms, SFT / Lisa): prep = training_step entry to the forward "
          "(Lisa's switch work);")
    print("tail = end of backward to training_step's exit (Lisa's proximal pass); on CUDA the parts are host times,")
    print("the step total is synchronized:")
    print(f"{'config':<12}{'mode':<6}" + "".join(f"{p:>18}" for p in PARTS))
    for r in rows:
        seg = r["segments_ms"]
        print(_label(r) + "".join(f"{seg['sft'].get(p, 0.0):>10.2f} /{seg['lisa'].get(p, 0.0):>6.2f}" for p in PARTS))
