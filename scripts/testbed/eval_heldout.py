#!/usr/bin/env python3
"""Held-out perplexity of a testbed model on corpus_heldout.txt (CPU is fine).

The held-out text is tokenized with the model's own tokenizer exactly as in training
(every document preceded by "</s>"), then cut into non-overlapping 512-token windows:
inputs ids[i*512:(i+1)*512], targets shifted by one, so each token is predicted once.

Usage:
  python scripts/testbed/eval_heldout.py ptqlab/testbed/opt --heldout scripts/testbed/build/corpus_heldout.txt
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--heldout", type=Path, default=Path("scripts/testbed/build/corpus_heldout.txt"))
    ap.add_argument("--check-bin", type=Path, default=None, help="compare the token ids with this heldout.bin")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=0, help="0 = all windows")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=getattr(torch, args.dtype)).eval()
    docs = [d for d in args.heldout.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    ids: list[int] = []
    for enc in tok([d.strip("\n") for d in docs])["input_ids"]:  # the tokenizer prepends </s>
        ids.extend(enc)
    ids_t = torch.tensor(ids, dtype=torch.long)
    same_as_bin = None
    if args.check_bin is not None:
        ref = np.fromfile(args.check_bin, dtype=np.uint16).astype(np.int64)
        same_as_bin = bool(ref.size == len(ids) and (ref == np.asarray(ids)).all())
    L = args.seq_len
    n_win = (ids_t.numel() - 1) // L
    if args.max_windows:
        n_win = min(n_win, args.max_windows)
    t0 = time.time()
    tot, cnt = 0.0, 0
    for i in range(0, n_win, args.batch):
        starts = torch.arange(i, min(n_win, i + args.batch)) * L
        w = ids_t[starts[:, None] + torch.arange(L + 1)[None, :]]
        logits = model(input_ids=w[:, :-1]).logits.float()
        tot += F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum").item()
        cnt += w[:, 1:].numel()
    loss = tot / cnt
    res = {"model": str(args.model), "architecture": model.config.architectures[0], "dtype": args.dtype,
           "heldout_tokens": len(ids), "windows": n_win, "predicted_tokens": cnt,
           "loss": round(loss, 5), "ppl": round(math.exp(loss), 3), "tokens_match_heldout_bin": same_as_bin,
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
