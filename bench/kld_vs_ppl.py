"""Does KL divergence to FP16 rank methods and precisions as perplexity does? (issue 21; run on one GPU)

    OUT=results python bench/kld_vs_ppl.py                # the testbed family, ~5 minutes on one H200
    python bench/kld_vs_ppl.py --smoke --device cpu       # the CPU path: one tiny config, seconds

On every testbed model present (testbed-opt, testbed-bloom, their -2m members, and the ~25M/~60M members
when $PTQLAB_TESTBED_CACHE holds them), a grid of methods (fp16, rtn, gptq, zq-global, gptq +LoRC8) x
precisions (W8A8, W4A16 g128, W4A8, W3A16 g128) with ``--metrics ppl,kld`` on the in-domain held-out text.
Writes ``$OUT/kld_vs_ppl.jsonl`` (one ``ptqlab run`` record per line) and ``$OUT/kld_vs_ppl.md``: per model,
the configurations ranked by dPPL and by mean KLD, Kendall's tau between the two rankings, and every pair of
configurations the two metrics order differently (a discordant pair), largest disagreements first.
The larger members are skipped once ``--budget-s`` is spent (default 270 s), so the run stays near 5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from itertools import combinations
from pathlib import Path

from ptqlab import QuantConfig, QuantSpec
from ptqlab.experiment import ModelSession, RunSpec, run
from ptqlab.testbed import family_member

MODELS = ("testbed-opt-2m", "testbed-bloom-2m", "testbed-opt", "testbed-bloom", "testbed-opt-25m",
          "testbed-bloom-25m", "testbed-opt-60m", "testbed-bloom-60m")
PRECISIONS = {"W8A8": (QuantSpec(8), QuantSpec(8)), "W4A16 g128": (QuantSpec(4, True, 128), QuantSpec()),
              "W4A8": (QuantSpec(4, True, 128), QuantSpec(8)), "W3A16 g128": (QuantSpec(3, True, 128), QuantSpec())}
METHODS = {"rtn": {"method": "rtn"}, "gptq": {"method": "gptq"}, "zq-global": {"method": "zq-global"},
           "gptq +LoRC8": {"method": "gptq", "lorc_rank": 8}}


def configs() -> list[tuple[str, QuantConfig]]:
    out = [("fp16", QuantConfig("fp16"))]
    for p, (w, a) in PRECISIONS.items():
        for m, kw in METHODS.items():
            out.append((f"{m} {p}", QuantConfig(weight=w, act=a, **kw)))
    return out


def available(name: str) -> bool:
    member = family_member(name)
    return member is not None and (member.path() / "config.json").is_file()


def kendall(pairs_a: list[float], pairs_b: list[float]) -> float:
    """Kendall's tau-a of two score lists (no ties expected among measured floats)."""
    n = len(pairs_a)
    s = sum((1 if (pairs_a[i] - pairs_a[j]) * (pairs_b[i] - pairs_b[j]) > 0 else -1)
            for i, j in combinations(range(n), 2) if (pairs_a[i] - pairs_a[j]) * (pairs_b[i] - pairs_b[j]) != 0)
    return s / (n * (n - 1) / 2) if n > 1 else float("nan")


def analyse(records: list[dict]) -> str:
    lines = ["# KLD vs PPL on the testbed family (heldout)", "",
             "dPPL: heldout PPL minus the model's FP16 heldout PPL; KLD: mean per-token KL(FP16 || quantized), "
             "nats. A discordant pair: two configurations that dPPL and KLD order differently.", ""]
    by_model: dict[str, list[dict]] = {}
    for r in records:
        by_model.setdefault(r["config"]["model"], []).append(r)
    for model, runs in by_model.items():
        base = next((r for r in runs if r["label"] == "fp16"), None)
        if base is None:
            continue
        quant = [r for r in runs if r is not base]
        dppl = [r["ppl"]["heldout"] - base["ppl"]["heldout"] for r in quant]
        kl = [r["kld"]["heldout"]["mean"] for r in quant]
        tau = kendall(dppl, kl)
        lines += [f"## {model} (FP16 heldout PPL {base['ppl']['heldout']:.3f}; Kendall tau {tau:.3f})", "",
                  "| config | dPPL | rank | KLD | rank | top-1 | p99 KL |", "|---|---:|---:|---:|---:|---:|---:|"]
        rank_p = {i: k + 1 for k, i in enumerate(sorted(range(len(quant)), key=dppl.__getitem__))}
        rank_k = {i: k + 1 for k, i in enumerate(sorted(range(len(quant)), key=kl.__getitem__))}
        for i in sorted(range(len(quant)), key=kl.__getitem__):
            r = quant[i]
            lines.append(f"| {r['label']} | {dppl[i]:+.3f} | {rank_p[i]} | {kl[i]:.4f} | {rank_k[i]} | "
                         f"{r['kld']['heldout']['top1']:.3f} | {r['kld']['heldout']['p99']:.3f} |")
        disagree = [(i, j) for i, j in combinations(range(len(quant)), 2)
                    if (dppl[i] - dppl[j]) * (kl[i] - kl[j]) < 0]
        # largest first: by the smaller of the two relative gaps, so both metrics disagree by a margin
        def margin(pair):
            i, j = pair
            return min(abs(dppl[i] - dppl[j]) / (abs(dppl[i]) + abs(dppl[j]) + 1e-12),
                       abs(kl[i] - kl[j]) / (kl[i] + kl[j] + 1e-12))

        disagree.sort(key=margin, reverse=True)
        lines += ["", f"{len(disagree)} discordant pairs of {len(quant) * (len(quant) - 1) // 2}"
                  + (", largest first:" if disagree else ""), ""]
        for i, j in disagree[:10]:
            better_ppl, worse_ppl = (i, j) if dppl[i] < dppl[j] else (j, i)
            lines.append(f"- {quant[better_ppl]['label']} has the lower dPPL ({dppl[better_ppl]:+.3f} vs "
                         f"{dppl[worse_ppl]:+.3f}) but the higher KLD ({kl[better_ppl]:.4f} vs {kl[worse_ppl]:.4f}) "
                         f"than {quant[worse_ppl]['label']}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder (default: $OUT, else .)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--budget-s", type=float, default=270.0, help="start no new model after this many seconds")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--max-eval-windows", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="testbed-opt-2m, fp16 and rtn W4A16 on 2 windows (CPU)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    models = ["testbed-opt-2m"] if a.smoke else [m for m in a.models.split(",") if available(m)]
    grid = configs()
    if a.smoke:
        grid = [grid[0], next(c for c in grid if c[0] == "rtn W4A16 g128")]
    windows = 2 if a.smoke else a.max_eval_windows
    nsamples = 4 if a.smoke else a.nsamples
    start = time.perf_counter()
    jsonl = out / "kld_vs_ppl.jsonl"
    jsonl.write_text("")
    records = []
    for model in models:
        if time.perf_counter() - start > a.budget_s:
            print(f"budget spent: skipping {model}", file=sys.stderr)
            continue
        session = ModelSession(model, a.device, progress=False)
        for label, config in grid:
            spec = RunSpec(model=model, config=config, eval=("heldout",), seqlen=512, calib="testbed", nsamples=nsamples,
                           max_eval_windows=windows, metrics=("ppl", "kld"))
            record = run(spec, session, progress=False)
            record["label"] = label
            records.append(record)
            with open(jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            kl = record["kld"]["heldout"]
            print(f"{model:20s} {label:22s} ppl {record['ppl']['heldout']:9.3f} kld {kl['mean']:.4f} "
                  f"top1 {kl['top1']:.3f} ({record['time_s']:.1f} s, elapsed {time.perf_counter() - start:.0f} s)",
                  flush=True)
        del session
    (out / "kld_vs_ppl.md").write_text(analyse(records), encoding="utf-8")
    print(f"{len(records)} records in {jsonl}; analysis in {out / 'kld_vs_ppl.md'} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
