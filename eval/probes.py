"""Character-level probes (count, spell, reverse, contains, index, insert, delete, substitute):
accuracy per task on probe-train words and on held-out words.

    python -m eval.probes --ckpt runs/default                  # words from the run's corpus
    python -m eval.probes --ckpt runs/default --words words.txt --tasks count spell --n 200

Words: --words FILE, else the run's data.probe_words, else the most frequent words of the
run's training corpus (the list training mixes probes from). Each answer is scored by exact
match of the greedy continuation up to its newline; tasks with a closed answer set (count
0-9, contains yes/no, index a-z) are also scored by ranking every candidate's likelihood, which
measures models never trained on the probe format. Fixed seeds: the same checkpoint and words
give the same numbers. JSON to stdout (and RUN_DIR/eval/probes.json), a table to stderr.
"""

from __future__ import annotations

import random
import time

from bytelm import probes
from eval.common import (EvalError, Parser, add_common_args, continuation_logprobs, emit,
                         format_table, greedy_answers, load, open_corpus, positive, run_cli)

SPLITS = ("held_out", "train")


def examples(words: list[str], task: str, n: int, seed: int) -> list[probes.ProbeExample]:
    """n examples of `task` over distinct words (all of them if fewer); each example's letters
    are drawn from (seed, task, word), so adding words never changes the others' examples."""
    chosen = random.Random(f"{seed}:{task}").sample(sorted(words), min(n, len(words)))
    return [probes.make_example(task, w, random.Random(f"{seed}:{task}:{w}")) for w in chosen]


def score(model, tokenizer, batch: list[probes.ProbeExample], batch_size: int, device) -> dict:
    """Exact-match accuracy, and likelihood-ranking accuracy for tasks with a closed answer set."""
    # Every id is at least a byte, so the answer's bytes bound the ids worth generating.
    limits = [len(ex.continuation.encode()) + 2 for ex in batch]  # +2: room for stray spaces
    outputs = greedy_answers(model, tokenizer, [ex.prompt for ex in batch], limits, batch_size,
                             device)
    result = {"n": len(batch),
              "exact": sum(map(probes.check, batch, outputs)) / len(batch),
              "samples": [{"prompt": ex.prompt, "answer": ex.answer, "output": out}
                          for ex, out in zip(batch[:3], outputs)]}
    choices = batch[0].choices
    if choices:
        pairs = [(ex.prompt, f" {c}\n") for ex in batch for c in choices]
        logps = continuation_logprobs(model, tokenizer, pairs, batch_size, device)
        hits = 0
        for i, ex in enumerate(batch):
            row = logps[i * len(choices):(i + 1) * len(choices)]
            hits += choices[max(range(len(choices)), key=row.__getitem__)] == ex.answer
        result["ranked"] = hits / len(batch)
    return result


def evaluate(model, tokenizer, words: list[str], tasks, n: int, seed: int, batch_size: int,
             device) -> dict:
    """{task: {"held_out": {...}, "train": {...}}} over the two halves of `words`."""
    halves = dict(zip(("train", "held_out"), probes.split_words(words)))
    results = {}
    for task in tasks:
        results[task] = {}
        for split in SPLITS:
            if halves[split]:
                batch = examples(halves[split], task, n, seed)
                results[task][split] = score(model, tokenizer, batch, batch_size, device)
    return results


def load_word_list(loaded, words_file: str | None) -> tuple[list[str], str]:
    if words_file or loaded.cfg.data.probe_words:
        path = words_file or loaded.cfg.data.probe_words
        return probes.load_words(path), path
    corpus, source = open_corpus(loaded.cfg, None)
    return probes.corpus_words(corpus), f"corpus:{source}"


def main(argv) -> int:
    parser = Parser(prog="python -m eval.probes", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--words", help="word list, one word a line (default: as in training)")
    parser.add_argument("--tasks", nargs="+", default=list(probes.TASK_NAMES),
                        help=f"any of {' '.join(probes.TASK_NAMES)} (default all)")
    parser.add_argument("--n", type=positive, default=100,
                        help="examples per task on each half of the words (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the examples (default 0)")
    parser.add_argument("--batch-size", type=positive, default=32, help="prompts per forward")
    args = parser.parse_args(argv)
    for task in args.tasks:
        if task not in probes.TASKS:
            raise EvalError(f"--tasks: unknown task {task!r} ({', '.join(probes.TASK_NAMES)})")

    loaded = load(args.ckpt, args.device)
    words, words_source = load_word_list(loaded, args.words)
    start = time.perf_counter()
    results = evaluate(loaded.model, loaded.tokenizer, words, args.tasks, args.n, args.seed,
                       args.batch_size, loaded.device)
    train_words, held_out_words = probes.split_words(words)
    result = {"checkpoint": str(loaded.ckpt_path), "step": loaded.step, "words": words_source,
              "n_words": {"train": len(train_words), "held_out": len(held_out_words)},
              "n": args.n, "seed": args.seed, "tasks": results,
              "seconds": round(time.perf_counter() - start, 3), "device": str(loaded.device)}
    emit(result, table(results), "probes", args.out, loaded.run_dir)
    return 0


def table(results: dict) -> str:
    def cell(r, key):
        return f"{r[key]:.3f}" if r and key in r else "-"

    rows = [[task, cell(r.get("held_out"), "exact"), cell(r.get("held_out"), "ranked"),
             cell(r.get("train"), "exact"), cell(r.get("train"), "ranked")]
            for task, r in results.items()]
    return format_table(rows, ["task", "held-out exact", "held-out ranked", "train exact",
                               "train ranked"])


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
