"""Bits per byte on clean text and under character noise: random case, upper case, character
drop, character repeat, adjacent swap.

    python -m eval.robustness --ckpt runs/default
    python -m eval.robustness --ckpt runs/default --data tinyshakespeare --rate 0.1 --seed 1

Each perturbation is seeded and applied to the text of the split's first --max-bytes bytes;
bits per byte is measured on the perturbed text itself (its own UTF-8 bytes), so a model that
copes with noise scores close to its clean number. JSON to stdout (and
RUN_DIR/eval/robustness.json), a table to stderr.
"""

from __future__ import annotations

import random
import time

from eval.common import (EvalError, Parser, add_common_args, emit, format_table, load,
                         open_corpus, positive, read_split, run_cli, text_bpb)


def _case_of_same_length(c: str, upper: bool) -> str:
    changed = c.upper() if upper else c.lower()
    return changed if len(changed) == 1 else c  # 'ß'.upper() == 'SS' would change the length


def random_case(text: str, rate: float, rng: random.Random) -> str:
    """Every character upper or lower case at random (rate does not apply)."""
    return "".join(_case_of_same_length(c, rng.random() < 0.5) for c in text)


def upper_case(text: str, rate: float, rng: random.Random) -> str:
    return "".join(_case_of_same_length(c, True) for c in text)


def drop(text: str, rate: float, rng: random.Random) -> str:
    """Each character deleted with probability rate."""
    return "".join(c for c in text if rng.random() >= rate)


def repeat(text: str, rate: float, rng: random.Random) -> str:
    """Each character doubled with probability rate."""
    return "".join(c * 2 if rng.random() < rate else c for c in text)


def swap(text: str, rate: float, rng: random.Random) -> str:
    """Neighbouring characters exchanged with probability rate (swapped pairs never overlap)."""
    chars, i = list(text), 0
    while i < len(chars) - 1:
        if rng.random() < rate:
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
            i += 1
        i += 1
    return "".join(chars)


PERTURBATIONS = {"random_case": random_case, "upper_case": upper_case, "drop": drop,
                 "repeat": repeat, "swap": swap}


def perturb(text: str, name: str, rate: float, seed: int) -> str:
    """The same (text, name, rate, seed) always gives the same result."""
    return PERTURBATIONS[name](text, rate, random.Random(f"{seed}:{name}"))


def evaluate(loaded, text: str, names, rate: float, seed: int, batch_size: int) -> dict:
    def bpb(t):
        return text_bpb(loaded.model, loaded.tokenizer, t, loaded.cfg.data.seq_len, batch_size,
                        loaded.device)

    clean = bpb(text)
    result = {"clean": clean, "perturbations": {}}
    for name in names:
        scores = bpb(perturb(text, name, rate, seed))
        result["perturbations"][name] = {**scores, "delta": scores["bpb"] - clean["bpb"]}
    return result


def main(argv) -> int:
    parser = Parser(prog="python -m eval.robustness", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--data", help="a source or a prepared directory (default: the run's own)")
    parser.add_argument("--split", default="val", help="split to read (default val)")
    parser.add_argument("--max-bytes", type=positive, default=262144,
                        help="bytes of the split to perturb and score (default 262144)")
    parser.add_argument("--perturbations", nargs="+", default=list(PERTURBATIONS),
                        help=f"any of {' '.join(PERTURBATIONS)} (default all)")
    parser.add_argument("--rate", type=float, default=0.05,
                        help="per-character probability of drop, repeat and swap (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--batch-size", type=positive, help="windows per forward "
                        "(default: the run's data.batch_size)")
    args = parser.parse_args(argv)
    for name in args.perturbations:
        if name not in PERTURBATIONS:
            raise EvalError(f"--perturbations: unknown perturbation {name!r} "
                            f"({', '.join(PERTURBATIONS)})")
    if not 0 <= args.rate <= 1:
        raise EvalError(f"--rate must be in [0, 1], got {args.rate}")

    loaded = load(args.ckpt, args.device)
    corpus, source = open_corpus(loaded.cfg, args.data)
    text = read_split(corpus, args.split, args.max_bytes).decode("utf-8", errors="replace")
    start = time.perf_counter()
    scores = evaluate(loaded, text, args.perturbations, args.rate, args.seed,
                      args.batch_size or loaded.cfg.data.batch_size)
    result = {"checkpoint": str(loaded.ckpt_path), "step": loaded.step, "data": source,
              "split": args.split, "max_bytes": args.max_bytes, "rate": args.rate,
              "seed": args.seed, **scores, "seconds": round(time.perf_counter() - start, 3),
              "device": str(loaded.device)}
    rows = [["clean", f"{scores['clean']['bpb']:.4f}", "", f"{scores['clean']['bytes']:,}"]]
    rows += [[name, f"{r['bpb']:.4f}", f"{r['delta']:+.4f}", f"{r['bytes']:,}"]
             for name, r in scores["perturbations"].items()]
    emit(result, format_table(rows, ["text", "bits/byte", "vs clean", "bytes"]), "robustness",
         args.out, loaded.run_dir)
    return 0


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
