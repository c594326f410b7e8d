"""What every eval command shares: loading a checkpoint onto a device, one-line CLI errors,
JSON output, and the batched scoring / greedy decoding that works for byte and token models
alike (only through the tokenizer interface: encode, decode, is_bytes, vocab_size)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


class EvalError(ValueError):
    """A user mistake on an eval command line (one-line message)."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are a one-line EvalError instead of usage + message."""

    def error(self, message):
        raise EvalError(message)


def add_common_args(parser: argparse.ArgumentParser, ckpt: bool = True):
    if ckpt:
        parser.add_argument("--ckpt", required=True, help="a .ckpt file or a run directory")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if present), cpu, cuda, cuda:N")
    parser.add_argument("--out", help="also write the JSON result to this file")


def run_cli(main, argv) -> int:
    """Run a command's main; a user mistake becomes 'error: ...' on stderr and exit code 2."""
    from bytelm.checkpoint import CheckpointError
    from bytelm.config import ConfigError
    from bytelm.data.sources import DataError

    try:
        return main(sys.argv[1:] if argv is None else argv)
    except (EvalError, CheckpointError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# ---- models -------------------------------------------------------------------------------

@dataclass
class Loaded:
    cfg: object  # RunConfig
    model: torch.nn.Module
    tokenizer: object
    ckpt_path: Path
    run_dir: Path | None  # the run the checkpoint belongs to, where results are saved
    step: int
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvalError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: CUDA is not available on this machine")
    return device


def load(ckpt: str | Path, device: str = "auto") -> Loaded:
    from bytelm.checkpoint import load_checkpoint, load_tokenizer, resolve_checkpoint

    path = resolve_checkpoint(ckpt)
    dev = resolve_device(device)
    cfg, model, raw = load_checkpoint(path)
    run_dir = path.parent.parent if (path.parent.parent / "config.yaml").is_file() else None
    return Loaded(cfg, model.to(dev), load_tokenizer(cfg, raw), path, run_dir,
                  int(raw.get("global_step", 0)), dev)


def autocast(device: torch.device):
    """bf16 on GPUs, as in training (bf16-mixed); full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def n_symbols(tokenizer) -> int:
    """Ids a model may emit: the 256 bytes (not the specials) or the token vocabulary."""
    return 256 if tokenizer.is_bytes else tokenizer.vocab_size


# ---- results ------------------------------------------------------------------------------

def emit(result: dict, table: str, name: str, out: str | None, run_dir: Path | None) -> None:
    """JSON to stdout, the table to stderr; the JSON also to --out and RUN_DIR/eval/NAME.json."""
    text = json.dumps(result, indent=2)
    print(text)
    print(table, file=sys.stderr)
    targets = [Path(out)] if out else []
    if run_dir is not None:
        targets.append(run_dir / "eval" / f"{name}.json")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")


def format_table(rows: list[list], header: list[str]) -> str:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


# ---- scoring ------------------------------------------------------------------------------

def tile(ids: np.ndarray, seq_len: int) -> Iterator[np.ndarray]:
    """Windows of seq_len+1 ids overlapping by one, whose targets cover ids[1:] exactly once
    (the tiling of bytelm.data.dataset.iter_eval_windows)."""
    for start in range(0, len(ids) - 1, seq_len):
        yield ids[start:start + seq_len + 1]


def batches(windows: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Stacks windows of equal length; a shorter (last) window starts a batch of its own."""
    rows: list[np.ndarray] = []
    for window in windows:
        if rows and (len(rows) == batch_size or len(window) != len(rows[0])):
            yield np.stack(rows)
            rows = []
        rows.append(np.asarray(window, dtype=np.int64))
    if rows:
        yield np.stack(rows)


@torch.no_grad()
def sum_nll(model, windows: Iterable[np.ndarray], batch_size: int, device) -> tuple[float, int]:
    """(summed next-id NLL in nats, ids scored) over windows; each window's first id is context."""
    total, count = 0.0, 0
    for batch in batches(windows, batch_size):
        ids = torch.from_numpy(batch).to(device)
        with autocast(ids.device):
            logits = model(ids[:, :-1])
        nll = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return total, count


def bytes_bpb(model, tokenizer, data: bytes, seq_len: int, batch_size: int, device) -> dict:
    """Bits per byte of raw `data`, tiled into seq_len windows: summed NLL / (ln 2 x bytes of
    the scored ids). The first id is only context, so its bytes are not counted; the bytes of
    each id come from the tokenizer (a BPE token can hold part of a UTF-8 character)."""
    ids = np.asarray(tokenizer.encode_bytes(data), dtype=np.int64)
    if len(ids) < 2:
        raise EvalError(f"text of {len(data)} bytes is too short to score (needs 2 ids)")
    nll, scored = sum_nll(model, tile(ids, seq_len), batch_size, device)
    n_bytes = int(np.asarray(tokenizer.token_bytes)[ids[1:]].sum())
    return {"bpb": nll / LN2 / n_bytes, "nll_nats": nll, "bytes": n_bytes, "tokens": scored}


def text_bpb(model, tokenizer, text: str, seq_len: int, batch_size: int, device) -> dict:
    """Bits per byte of `text` (its UTF-8 bytes), as bytes_bpb."""
    return bytes_bpb(model, tokenizer, text.encode("utf-8"), seq_len, batch_size, device)


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int,
                          device) -> list[float]:
    """log p(continuation | prompt) in nats for each (prompt, continuation). Rows are padded on
    the right, which a causal model never looks at."""
    encoded = [(tokenizer.encode(p), tokenizer.encode(c)) for p, c in pairs]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    scores = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs = [encoded[i][0] + encoded[i][1] for i in chunk]
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq)
        ids = ids.to(device)
        with autocast(ids.device):
            logits = model(ids[:, :-1])
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0].cpu()
        for row, i in enumerate(chunk):
            n_prompt, n_cont = len(encoded[i][0]), len(encoded[i][1])
            scores[i] = float(logp[row, n_prompt - 1:n_prompt - 1 + n_cont].sum())
    return scores


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_ids: list[int], batch_size: int,
                   device) -> list[str]:
    """Greedy continuation of each prompt up to its first newline or max_ids new ids.
    Prompts of the same length in ids are decoded together: prefill once, then one step per id
    (Mamba's recurrent state, a Transformer's KV cache)."""
    encoded = [tokenizer.encode(p) for p in prompts]
    vocab = n_symbols(tokenizer)
    answers = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        if not ids:
            raise EvalError(f"prompt {prompts[i]!r} encodes to no ids")
        by_length.setdefault(len(ids), []).append(i)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            new: list[list[int]] = [[] for _ in chunk]
            done = [False] * len(chunk)
            with autocast(ids.device):
                logits, state = model.prefill(ids)
                for _ in range(max(max_ids[i] for i in chunk)):
                    next_ids = logits[:, :vocab].float().argmax(-1)
                    for row, i in enumerate(chunk):
                        if not done[row]:
                            new[row].append(int(next_ids[row]))
                            done[row] = ("\n" in tokenizer.decode(new[row])
                                         or len(new[row]) >= max_ids[i])
                    if all(done):
                        break
                    logits = model.step(next_ids, state)
            for row, i in enumerate(chunk):
                answers[i] = tokenizer.decode(new[row]).split("\n")[0]
    return answers


# ---- data ---------------------------------------------------------------------------------

def open_corpus(cfg, data: str | None):
    """The prepared corpus to evaluate on: --data (a prepared directory, or a source prepared
    like the run's own data) or, by default, the run's own corpus. Returns (corpus, source)."""
    from bytelm.data.dataset import PreparedCorpus
    from bytelm.data.prepare import META_FILE, ensure_prepared
    from bytelm.training.datamodule import default_prepared_dir

    if data is not None and (Path(data) / META_FILE).is_file():
        return PreparedCorpus(data), data
    source = data or cfg.data.source
    directory = ((cfg.data.prepared_dir if data is None else None)
                 or default_prepared_dir(source, cfg.data.val_fraction))
    ensure_prepared(source, directory, val_fraction=cfg.data.val_fraction,
                    text_column=cfg.data.text_column)
    return PreparedCorpus(directory), source


def read_split(corpus, split: str, max_bytes: int | None) -> bytes:
    """The first max_bytes bytes of a split (all of it when None)."""
    parts, left = [], corpus.split_bytes(split) if max_bytes is None else max_bytes
    for shard in corpus.shards(split):
        if left <= 0:
            break
        parts.append(bytes(shard[:left]))
        left -= len(parts[-1])
    return b"".join(parts)


def positive(value: str) -> int:
    """argparse type of counts that must be >= 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n
