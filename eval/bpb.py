"""Bits per byte of a checkpoint over a whole split, on the scale byte and token models share.

    python -m eval.bpb --ckpt runs/default                      # the run's own validation split
    python -m eval.bpb --ckpt runs/default/checkpoints/step0000200.ckpt --max-bytes 1000000
    python -m eval.bpb --ckpt runs/default --data tinyshakespeare --device cuda

Windows are the model's training seq_len, tiled so every byte after the first is scored once
(byte models stream the split from its memory map; token models tokenize it and divide the
summed NLL by ln 2 x its UTF-8 bytes). JSON to stdout (and RUN_DIR/eval/bpb.json), a table
to stderr.
"""

from __future__ import annotations

import time

from eval.common import (LN2, Parser, add_common_args, bytes_bpb, emit, format_table, load,
                         open_corpus, positive, read_split, run_cli, sum_nll)


def evaluate(loaded, corpus, split: str, max_bytes: int | None, batch_size: int) -> dict:
    from bytelm.data.dataset import iter_eval_windows

    seq_len = loaded.cfg.data.seq_len
    if loaded.tokenizer.is_bytes:
        windows = iter_eval_windows(corpus, split, seq_len, max_bytes=max_bytes)
        nll, scored = sum_nll(loaded.model, windows, batch_size, loaded.device)
        return {"bpb": nll / LN2 / scored, "nll_nats": nll, "bytes": scored, "tokens": scored}
    return bytes_bpb(loaded.model, loaded.tokenizer, read_split(corpus, split, max_bytes), seq_len,
                     batch_size, loaded.device)


def main(argv) -> int:
    parser = Parser(prog="python -m eval.bpb", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--data", help="a source (as in train.py) or a prepared directory "
                        "(default: the run's own corpus)")
    parser.add_argument("--split", default="val", help="split to score (default val)")
    parser.add_argument("--max-bytes", type=positive, help="score only the split's first N bytes")
    parser.add_argument("--batch-size", type=positive, help="windows per forward "
                        "(default: the run's data.batch_size)")
    args = parser.parse_args(argv)

    loaded = load(args.ckpt, args.device)
    corpus, source = open_corpus(loaded.cfg, args.data)
    start = time.perf_counter()
    scores = evaluate(loaded, corpus, args.split, args.max_bytes,
                      args.batch_size or loaded.cfg.data.batch_size)
    seconds = time.perf_counter() - start
    result = {"checkpoint": str(loaded.ckpt_path), "step": loaded.step, "data": source,
              "split": args.split, "max_bytes": args.max_bytes,
              "seq_len": loaded.cfg.data.seq_len, **scores, "seconds": round(seconds, 3),
              "bytes_per_second": round(scores["bytes"] / seconds, 1), "device": str(loaded.device)}
    table = format_table([[source, args.split, f"{scores['bpb']:.4f}", f"{scores['bytes']:,}",
                           f"{seconds:.1f}"]], ["data", "split", "bits/byte", "bytes", "seconds"])
    emit(result, table, "bpb", args.out, loaded.run_dir)
    return 0


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
