"""The issue-17 table from a study database of recipes/modern.yaml: held-out PPL per model, precision and method.

    python scripts/modern_table.py bench/results/modern_study_h200.db
"""

from __future__ import annotations

import json
import sqlite3
import sys

PRECISIONS = ["W8A8", "W4A8", "W4A4", "W4A16", "W4A16 g128", "W3A16", "W3A16 g128"]
METHODS = ["rtn", "gptq", "zq-global", "smoothquant+gptq", "awq+rtn", "awq+gptq", "rotate+rtn", "rotate+gptq"]


def main(db: str) -> None:
    con = sqlite3.connect(db)
    table: dict = {}
    fp16: dict = {}
    for spec_json, ppl_json in con.execute("select spec_json, ppl_json from runs where status='done'"):
        s, ppl = json.loads(spec_json), json.loads(ppl_json)["heldout"]
        t = s.get("transform", "none")
        method = s["method"] if t == "none" else f"{t}+{s['method']}"
        if method == "fp16":
            fp16[s["model"]] = ppl
            continue
        prec = f"W{s.get('wbits', 16)}A{s.get('abits', 16)}" + (f" g{s['wgroup']}" if s.get("wgroup") else "")
        table[(s["model"], prec, method)] = ppl
    models = sorted(fp16, key=lambda m: (m.split("-")[1], "2m" not in m))
    for model in models:
        print(f"\n{model}: FP16 held-out PPL {fp16[model]:.3f}; cells: PPL (best of the row in bold)\n")
        present = [m for m in METHODS if any((model, p, m) in table for p in PRECISIONS)]
        print("| precision | " + " | ".join(present) + " |")
        print("|---|" + "---:|" * len(present))
        for p in PRECISIONS:
            row = {m: table.get((model, p, m)) for m in present}
            best = min((v for v in row.values() if v is not None), default=None)
            cells = ["" if v is None else (f"**{v:.2f}**" if v == best else f"{v:.2f}") for v in row.values()]
            print(f"| {p} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
