"""Prepare a corpus for training.

    python -m data.prepare --data stdlib --out data/prepared/stdlib
    python -m data.prepare --data tinyshakespeare --out data/prepared/shakespeare
    python -m data.prepare --data corpus/ --out data/prepared/mine --val-fraction 0.05
    python -m data.prepare --data hf:roneneldan/TinyStories --out data/prepared/tinystories
    python -m data.prepare --data tinyshakespeare --out data/prepared/shakespeare --bpe-vocab 4096
        # also a byte-level BPE trained on the training split, both splits tokenized (bpe-4096/)
"""

from __future__ import annotations

import argparse
import sys
import time

from bytelm.data.prepare import prepare
from bytelm.data.sources import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="stdlib", help="stdlib (default), tinyshakespeare, enwik8, text8, "
                        "hf:NAME[:CONFIG][@SPLIT], or a file / directory / glob")  # fmt: skip
    parser.add_argument("--out", required=True, help="directory to write the prepared corpus to")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the corpus held out (default 0.1)")
    parser.add_argument("--text-column", default="text", help="text field of jsonl / parquet / hf rows")
    parser.add_argument("--overwrite", action="store_true", help="replace a different prepared corpus in --out")
    parser.add_argument("--bpe-vocab", type=int, help="also train a BPE of this vocabulary and tokenize (data.tokenizer bpe)")
    args = parser.parse_args(argv)

    start = time.monotonic()
    try:
        meta = prepare(
            args.data, args.out, val_fraction=args.val_fraction, text_column=args.text_column, overwrite=args.overwrite
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, info in meta["splits"].items():
        print(f"{split}: {info['bytes']:,} bytes, {info['documents']:,} documents, {len(info['shards'])} shard(s)")
    print(f"{meta['split_rule']} split ({meta['split_note']}); {time.monotonic() - start:.1f}s -> {args.out}")
    if args.bpe_vocab is not None:
        from bytelm.data.bpe import TokenCorpus, ensure_tokenized

        try:
            tokens = TokenCorpus(ensure_tokenized(args.out, args.bpe_vocab))
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for split in ("train", "val"):
            print(f"bpe-{args.bpe_vocab} {split}: {tokens.split_tokens(split):,} tokens, "
                  f"{tokens.bytes_per_token(split):.3f} bytes/token")
        print(f"-> {tokens.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
