#!/usr/bin/env python3
"""Write the calibration text shipped with the testbed models (ptqlab/testbed/calibration.txt).

It is the first whole documents of the (already shuffled) training split corpus_train.txt,
up to --bytes, in the same format (one paragraph per line, documents separated by an empty
line). Training-distribution text, like C4's train split for the GPTQ paper's models; never
WikiText or PTB.

Usage:
  python scripts/testbed/make_calibration.py --build scripts/testbed/build --out ptqlab/testbed/calibration.txt
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=Path("scripts/testbed/build"))
    ap.add_argument("--out", type=Path, default=Path("ptqlab/testbed/calibration.txt"))
    ap.add_argument("--bytes", type=int, default=300_000)
    args = ap.parse_args(argv)

    docs = (args.build / "corpus_train.txt").read_text(encoding="utf-8").split("\n\n")
    chosen, size = [], 0
    for d in docs:
        d = d.strip("\n")
        if not d:
            continue
        chosen.append(d)
        size += len(d.encode()) + 2
        if size >= args.bytes:
            break
    text = "\n\n".join(chosen) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {len(text.encode())} bytes, {len(chosen)} documents, "
          f"sha256 {hashlib.sha256(text.encode()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
