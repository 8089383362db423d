#!/usr/bin/env python3
"""Token files of the testbed family: the base corpus plus the extra packages, with the shipped tokenizer.

Reads   BUILD/corpus_{train,heldout}.txt            (build_corpus.py)
        BUILD/corpus_extra_{train,heldout}.txt      (build_corpus.py --family)
        TOKENIZER (default ptqlab/testbed/opt: the shipped tokenizer, vocab 8192, unchanged)
Writes  BUILD/family/train.bin.xz     base train tokens, then the extra train tokens (uint16, xz)
        BUILD/family/heldout.bin      the base held-out tokens: exactly the shipped models' held-out set,
                                      used for early stopping and for comparing every size
        BUILD/family/heldout_extra.bin  held-out documents of the extra packages (reported, not used
                                      for model selection)
        BUILD/family/tokens_meta.json, BUILD/family/tokenizer/

The base token streams are checked against scripts/testbed/logs/tokens_meta.json (sha256), so the
family's training set provably contains the corpus the shipped ~7M models were trained on.

The family's token files travel to the GPU with every device call, whose payload is capped
(64 MiB with the repository); --max-train-tokens cuts the extra train text (whole documents, in
their shuffled order) to fit. The train stream is xz-compressed (train.py reads .xz).

Usage:
  python scripts/testbed/tokenize_family.py --build scripts/testbed/build
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tokenizer import encode_docs, read_documents, sha256_file  # noqa: E402


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=Path("scripts/testbed/build"))
    ap.add_argument("--tokenizer", type=Path, default=Path("ptqlab/testbed/opt"))
    ap.add_argument("--base-meta", type=Path, default=Path("scripts/testbed/logs/tokens_meta.json"))
    ap.add_argument("--max-train-tokens", type=int, default=0, help="cap on the family train stream (0 = all)")
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer

    b: Path = args.build
    out = b / "family"
    tmp = b / "family.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    bos = tok.token_to_id("</s>")
    base_meta = json.loads(args.base_meta.read_text())

    streams: dict[str, np.ndarray] = {}
    for name, src in (("train.bin", "corpus_train.txt"), ("heldout.bin", "corpus_heldout.txt")):
        arr = encode_docs(tok, read_documents(b / src), bos)
        want = base_meta["files"][name]["sha256"]
        got = sha256_bytes(arr.tobytes())
        if got != want:
            raise SystemExit(f"base {name} tokenizes to sha256 {got}, the shipped models' was {want}: "
                             "rebuild the base corpus with --pin scripts/testbed/logs/corpus_manifest.json")
        streams[name] = arr
        print(f"base {name}: {arr.size} tokens, sha256 matches the shipped models' token file", flush=True)

    x_train_docs = read_documents(b / "corpus_extra_train.txt")
    x_train = encode_docs(tok, x_train_docs, bos)
    n_extra_docs = len(x_train_docs)
    if args.max_train_tokens:
        room = args.max_train_tokens - streams["train.bin"].size
        if room < x_train.size:
            # cut at a document boundary (every document starts with </s>)
            starts = np.flatnonzero(x_train == bos)
            cut = int(starts[starts <= room].max()) if (starts <= room).any() else 0
            n_extra_docs = int((starts < cut).sum())
            x_train = x_train[:cut]
    x_held = encode_docs(tok, read_documents(b / "corpus_extra_heldout.txt"), bos)

    train = np.concatenate([streams["train.bin"], x_train])
    raw = train.tobytes()
    (tmp / "train.bin.xz").write_bytes(lzma.compress(raw, preset=6))
    streams["heldout.bin"].tofile(tmp / "heldout.bin")
    x_held.tofile(tmp / "heldout_extra.bin")
    shutil.copytree(args.tokenizer, tmp / "tokenizer",
                    ignore=lambda d, names: [n for n in names if not n.startswith("tokenizer")])

    meta = {
        "vocab_size": tok.get_vocab_size(), "dtype": "uint16", "bos_id": bos, "eos_id": bos,
        "pad_id": tok.token_to_id("<pad>"), "unk_id": tok.token_to_id("<unk>"),
        "layout": "every document preceded by </s>; paragraphs joined by newline",
        "tokenizer_json_sha256": sha256_file(args.tokenizer / "tokenizer.json"),
        "files": {
            "train.bin": {"tokens": int(train.size), "sha256": sha256_bytes(raw), "stored_as": "train.bin.xz",
                          "xz_bytes": (tmp / "train.bin.xz").stat().st_size,
                          "base_tokens": int(streams["train.bin"].size), "extra_tokens": int(x_train.size),
                          "extra_documents": n_extra_docs, "extra_documents_available": len(x_train_docs),
                          "max_train_tokens": args.max_train_tokens},
            "heldout.bin": {"tokens": int(streams["heldout.bin"].size),
                            "sha256": sha256_file(tmp / "heldout.bin"), "source": "corpus_heldout.txt (base)"},
            "heldout_extra.bin": {"tokens": int(x_held.size), "sha256": sha256_file(tmp / "heldout_extra.bin"),
                                  "source": "corpus_extra_heldout.txt"},
        },
    }
    (tmp / "tokens_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(json.dumps(meta["files"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
