#!/usr/bin/env python
"""Collect what benchmarks/gpu_all.sh measured in OUTDIR into OUTDIR/perf.json and OUTDIR/perf.md.

    python benchmarks/perf_report.py OUTDIR

Reads whatever the parts left (env.json, parts.jsonl, steps.json, attention.json, kernels.json,
scale.json, tests.log); a part that failed or ran out of time shows as such, and the others still report.
Also adds the attention bytes model per training step (every block of Swin-B and Swin-L), which
needs no measurement. Writes no number that is not in those files or computed from them.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from attention_bytes import fused_attention_bytes, swin_block_shapes, timm_attention_bytes, total  # noqa: E402

TARGET = 1.25  # the whole Swin-B step vs stock timm + torch.compile, same GPU, same run


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _parts(out: Path) -> List[Dict]:
    rows = []
    p = out / "parts.jsonl"
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _tests(out: Path) -> Optional[Dict]:
    log = out / "tests.log"
    if not log.exists():
        return None
    counts: Dict[str, int] = {}
    failed = []
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", line)
        if m and "::" in line:
            counts[m.group(1).lower()] = counts.get(m.group(1).lower(), 0) + 1
            if m.group(1) in ("FAILED", "ERROR"):
                failed.append(line.strip()[:200])
    summary = [ln for ln in log.read_text(errors="replace").splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    return dict(counts=counts, failed=failed[:20], summary=summary[-1].strip("= ") if summary else None)


def bytes_per_step(batch: int = 128) -> List[Dict]:
    """The attention bytes model summed over every block of a training step (bf16 autocast)."""
    from simmim_fast import load_config
    rows = []
    for model in ("swin_b", "swin_l"):
        m = load_config(ROOT / "configs" / f"{model}.json").model
        shapes = swin_block_shapes(m.img_size, m.patch_size, m.embed_dim, m.depths, m.num_heads, m.window_size,
                                   batch)
        timm = sum(total(timm_attention_bytes(s)) for _, _, s in shapes)
        fused = sum(total(fused_attention_bytes(s)) for _, _, s in shapes)
        rows.append(dict(model=model, batch=batch, blocks=len(shapes), timm_eager_bytes=timm, fused_bytes=fused,
                         ratio=round(timm / fused, 2)))
    return rows


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _bench_table(rows: List[Dict], eager_names, compiled_names, bytes_label) -> List[str]:
    by_case: Dict[str, List[Dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    lines = [f"| case | variant | ms (median) | {bytes_label} | GB/s | x eager | x compiled | status |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for case, rs in by_case.items():
        def base(names):
            for n in names:
                for r in rs:
                    if r["variant"] == n and r.get("time_s"):
                        return r["time_s"]
            return None
        eager, compiled = base(eager_names), base(compiled_names)
        for r in sorted(rs, key=lambda r: r.get("order", 99)):
            t = r.get("time_s")
            b = r.get("min_bytes")
            lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                case, r["variant"], _fmt(t and t * 1e3, ".4f"), _fmt(b and b / 1e6, ",.1f"),
                _fmt(b and t and b / t / 1e9, ",.0f"), _fmt(eager and t and eager / t, ".2f"),
                _fmt(compiled and t and compiled / t, ".2f"), r.get("status", "ok" if t else "not measured")))
    return lines


def scale_table(scale: Optional[Dict]) -> List[str]:
    """benchmarks/bench_scale.py's rows: the planner's prediction for one GPU beside the measured step."""
    meta = (scale or {}).get("meta", {})
    lines = [f"Planned for 1 GPU of {meta.get('gpu_memory_gb', '?')} GB ({meta.get('gpu_memory_from', '?')}; "
             f"GB = 2^30 bytes); {meta.get('engine', '')}; "
             f"DeepSpeed {'installed' if meta.get('deepspeed') else 'not installed'}; "
             f"{'compiled' if meta.get('compiled') else 'eager'}; {meta.get('warmup', '?')} warm-up + "
             f"{meta.get('steps', '?')} timed steps per choice. Predicted allocated = the planner's per-GPU figure "
             "less its fragmentation and reserved allowances; measured = torch.cuda.max_memory_allocated over the "
             "choice; reserved: max_memory_reserved against the per-GPU figure less the reserved allowance.", "",
             "| model | ZeRO | offload | checkpointing | micro batch | planner | predicted GB per GPU | "
             "predicted allocated GB | peak allocated GiB | measured / predicted | peak reserved GiB | "
             "reserved / predicted | img/s | ms/step | CPU ms/step | status |",
             "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in (scale or {}).get("results", []):
        ckpt = r.get("activation_checkpointing")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r.get("model"), r.get("zero_stage", "-"), r.get("offload", "-"),
            "-" if ckpt is None else ("every block" if ckpt else "off"), r.get("micro_batch", "-"),
            "recommended" if r.get("recommended") else ("-" if ckpt is None else "alternative"),
            _fmt(r.get("predicted_per_gpu_gb"), ".2f"), _fmt(r.get("predicted_allocated_gb"), ".2f"),
            _fmt(r.get("peak_alloc_gib"), ".2f"), _fmt(r.get("ratio_alloc"), ".3f"),
            _fmt(r.get("peak_reserved_gib"), ".2f"), _fmt(r.get("ratio_reserved"), ".3f"),
            _fmt(r.get("img_per_s"), ",.1f"), _fmt(r.get("step_ms"), ".1f"), _fmt(r.get("cpu_step_ms"), ".1f"),
            r.get("status", "pending")))
    if not (scale or {}).get("results"):
        lines.append("| - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | not run |")
    return lines


def build(out: Path) -> Dict:
    report = dict(env=_load(out / "env.json") or {}, parts=_parts(out), steps=_load(out / "steps.json"),
                  attention=_load(out / "attention.json"), kernels=_load(out / "kernels.json"), tests=_tests(out),
                  scale=_load(out / "scale.json"),
                  attention_bytes_per_step=bytes_per_step())
    steps = (report["steps"] or {}).get("results", [])
    ratios = [r.get("ratio_to_stock_compiled") for r in steps if r.get("model") == "swin_b"
              and r.get("variant") in ("ours", "ours_fused") and r.get("ratio_to_stock_compiled")]
    report["target"] = dict(what=f"Swin-B whole step, ours (default or fused attention) >= {TARGET}x stock timm "
                                 "compiled, same GPU, same run",
                            best_ratio=max(ratios) if ratios else None,
                            met=(max(ratios) >= TARGET) if ratios else None)
    return report


def markdown(report: Dict) -> str:
    env = report["env"]
    L = ["# simmim-fast performance run", ""]
    L.append(f"- device: {env.get('device', '?')}" + (f" ({env['gpu_memory']})" if env.get("gpu_memory") else ""))
    L.append(f"- date: {env.get('date', '?')}")
    L.append("- versions: " + ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "cuda", "triton", "timm")
                                       if env.get(k)))
    if env.get("tiny"):
        L.append("- **SIMMIM_BENCH_TINY=1: a CPU smoke run at tiny sizes; its timings mean nothing**")
    L.append(f"- command: `{env.get('command', 'bash benchmarks/gpu_all.sh OUT')}`")
    L += ["", "## Parts", "", "| part | status | seconds | limit s |", "|---|---|---:|---:|"]
    for p in report["parts"]:
        L.append(f"| {p.get('part')} | {p.get('status')} | {p.get('seconds', '-')} | {p.get('limit_s', '-')} |")

    steps = report["steps"] or {}
    meta = steps.get("meta", {})
    L += ["", "## Whole SimMIM training step", "",
          f"{meta.get('engine', 'engine.mode=torch, synthetic data')}; batch {meta.get('batch', '?')}, "
          f"{meta.get('precision', '?')}, compile backend {meta.get('compile_backend', '?')}; img/s from the median "
          "of windows of 5 timed steps after the warm-up; peak memory over the timed steps.", "",
          "| model | variant | img/s | x stock compiled | ms/step | peak GiB | warm-up s | status |",
          "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in steps.get("results", []):
        L.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["model"], r["variant"], _fmt(r.get("img_per_s"), ",.1f"), _fmt(r.get("ratio_to_stock_compiled"), ".3f"),
            _fmt(r.get("step_ms"), ".2f"), _fmt(r.get("peak_mem_gib"), ".2f"), _fmt(r.get("warmup_s"), ".1f"),
            r.get("status")))
    if not steps:
        L.append("| - | - | - | - | - | - | - | not run |")
    t = report["target"]
    verdict = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
    L += ["", f"Target: {t['what']}: **{verdict}**" + (f" (best x{t['best_ratio']:.3f})" if t["best_ratio"] else "")]

    att = (report["attention"] or {}).get("results", [])
    L += ["", "## Swin window attention, one block, forward + backward", "",
          "timm_eager / timm_compiled: timm's `SwinTransformerBlock._attn`; fused / fused_compiled: qkv Linear -> "
          "`window_attention` -> proj Linear. MB: the bytes model (benchmarks/attention_bytes.py; none for "
          "compiled timm, whose fusions it does not model); GB/s = those bytes / time.", ""]
    L += _bench_table(att, ("timm_eager",), ("timm_compiled",), "MB (model)") if att else ["not run"]
    L += ["", "### Attention bytes model per training step (every block, forward + backward, bf16 autocast)", "",
          "| model | blocks | batch | timm eager GB | fused GB | timm / fused |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["attention_bytes_per_step"]:
        L.append(f"| {r['model']} | {r['blocks']} | {r['batch']} | {r['timm_eager_bytes'] / 1e9:,.1f} | "
                 f"{r['fused_bytes'] / 1e9:,.1f} | {r['ratio']:.2f} |")

    ker = (report["kernels"] or {}).get("results", [])
    L += ["", "## Fused SimMIM kernels (mask-token substitution, masked L1), forward + backward", "",
          "MB: each input read once, each output written once.", ""]
    L += _bench_table(ker, ("reference",), ("compiled_ref",), "MB (min)") if ker else ["not run"]

    if report.get("scale") is not None or any(p.get("part") == "scale" for p in report["parts"]):
        L += ["", "## Large-model pretraining: the memory planner's choice vs the measured step (`scale`)", ""]
        L += scale_table(report.get("scale"))

    tests = report["tests"]
    L += ["", "## GPU tests", ""]
    if tests:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(tests["counts"].items())) or "no test finished"
        L.append(f"{counts} (pytest: {tests['summary'] or 'no summary line: cut short by its time limit?'}); "
                 "log: tests.log")
        L += [f"- {f}" for f in tests["failed"]]
    else:
        L.append("not run")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(args[0])
    report = build(out)
    (out / "perf.json").write_text(json.dumps(report, indent=1))
    (out / "perf.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
