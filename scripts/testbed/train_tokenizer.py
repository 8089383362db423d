#!/usr/bin/env python3
"""Train the testbed's byte-level BPE tokenizer and tokenize the corpus.

Reads   BUILD/corpus_train.txt, BUILD/corpus_heldout.txt  (from build_corpus.py)
Writes  BUILD/tokenizer/        Hugging Face tokenizer (tokenizer.json, tokenizer_config.json, ...)
        BUILD/train.bin         uint16 token ids, raw little-endian (numpy.fromfile(..., dtype=uint16))
        BUILD/heldout.bin
        BUILD/tokens_meta.json  counts, sha256, special token ids

Token stream layout: every document is preceded by "</s>" (id 1, which is bos = eos, as
in OPT), i.e. "</s> doc1 </s> doc2 ...". Paragraphs inside a document are joined by "\\n".

Usage:
  python scripts/testbed/train_tokenizer.py --build scripts/testbed/build
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SPECIAL = ["<pad>", "</s>", "<unk>"]   # ids 0, 1, 2


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_documents(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [d.strip("\n") for d in text.split("\n\n") if d.strip()]


def train_tokenizer(train_txt: Path, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = read_documents(train_txt)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    bos = tok.token_to_id("</s>")
    # like OPT: prepend "</s>" to every encoded text
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos)]
    )
    return tok


def save_hf(tok: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    # keep tokenizer_config.json loadable by any transformers 4.x/5.x: name the generic fast class
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def encode_docs(tok: Tokenizer, docs: list[str], bos: int) -> np.ndarray:
    ids: list[int] = []
    step = 256
    for i in range(0, len(docs), step):
        for enc in tok.encode_batch(docs[i:i + step], add_special_tokens=False):
            ids.append(bos)
            ids.extend(enc.ids)
    arr = np.asarray(ids, dtype=np.int64)
    assert arr.max() < 65536
    return arr.astype(np.uint16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=Path("scripts/testbed/build"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--model-max-length", type=int, default=512)
    args = ap.parse_args(argv)

    b: Path = args.build
    train_txt, held_txt = b / "corpus_train.txt", b / "corpus_heldout.txt"
    tok = train_tokenizer(train_txt, args.vocab_size)
    assert tok.get_vocab_size() == args.vocab_size, tok.get_vocab_size()
    for i, s in enumerate(SPECIAL):
        assert tok.token_to_id(s) == i
    save_hf(tok, b / "tokenizer", args.model_max_length)
    print(f"tokenizer: vocab {tok.get_vocab_size()} saved to {b / 'tokenizer'}", flush=True)

    bos = tok.token_to_id("</s>")
    meta = {"vocab_size": tok.get_vocab_size(), "dtype": "uint16", "bos_id": bos, "eos_id": bos,
            "pad_id": tok.token_to_id("<pad>"), "unk_id": tok.token_to_id("<unk>"),
            "layout": "every document preceded by </s>; paragraphs joined by newline", "files": {}}
    for name, src in (("train.bin", train_txt), ("heldout.bin", held_txt)):
        docs = read_documents(src)
        arr = encode_docs(tok, ["\n".join(d.split("\n")) for d in docs], bos)
        path = b / name
        arr.tofile(path)
        nbytes = src.stat().st_size
        meta["files"][name] = {"tokens": int(arr.size), "documents": len(docs), "source": src.name,
                               "source_bytes": nbytes, "bytes_per_token": round(nbytes / arr.size, 4),
                               "sha256": sha256_file(path)}
        print(f"{name}: {arr.size} tokens from {len(docs)} documents ({nbytes / arr.size:.3f} bytes/token)",
              flush=True)
    meta["tokenizer_json_sha256"] = sha256_file(b / "tokenizer" / "tokenizer.json")
    (b / "tokens_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
