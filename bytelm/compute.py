"""Compute accounting and compute-matched sizing of backbones.

Training FLOPs = 3 x forward FLOPs per id (LM.flops_per_token: every matmul, attention's causal
scores, the Mamba scan's element-wise work) x ids seen. An id is a byte for byte models and a
token of about bytes_per_token bytes for BPE models, so a run costs 3 * flops_per_token /
bytes_per_token FLOPs per byte of text. Two runs are compute-matched when they see the same
bytes of text (steps x batch x context in bytes) for the same training FLOPs: then every
backbone and tokenization spends the same FLOPs per byte. A BPE model may therefore be about
bytes_per_token times larger per id than a byte model of the same cost, and its context in
tokens is the byte context / bytes_per_token (the same text per window).

    python -m bytelm.compute --config configs/mamba-20m.yaml        # what a config costs
    python -m bytelm.compute --budget 4.03e16 --bytes 3.2768e8 --arch transformer
    python -m bytelm.compute --budget 4.03e16 --bytes 3.2768e8 --arch mamba --tokenizer bpe \\
        --bpe-vocab 4096 --bytes-per-token 3.36                     # the BPE Mamba of that budget
    python -m bytelm.compute --budget 1e18 --arch transformer --tokenizer bpe \\
        --bytes-per-token 4.2 --tokens-per-param 20                 # Chinchilla: picks the bytes too

Shapes: d_model in multiples of 64 (attention heads of 64), depth near 32 x d_model per residual
block (mamba-130m: 768 wide, 24 blocks; GPT-2 small: 768 wide, 12 x 2 blocks), the pair whose
FLOPs per byte is nearest the target.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace

import torch

from bytelm import codec
from bytelm.models.lm import LM, ModelConfig

ARCHS = {"mamba": "M", "mamba-mlp": "MF", "transformer": "AF", "hybrid-3to1": "MMMA",
         "hybrid-7to1": "MMMMMMMA"}
WIDTH_STEP = 64
HEAD_DIM = 64
WIDTH_PER_BLOCK = 32


def measure(cfg: ModelConfig, seq_len: int) -> tuple[int, int]:
    """(parameters, forward FLOPs per id) of a model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = LM(cfg)
    return model.num_params(), model.flops_per_token(seq_len)


@dataclass
class Plan:
    model: ModelConfig
    seq_len: int  # ids per window
    batch_size: int  # windows per optimizer step
    steps: int
    bytes_per_token: float  # 1 for byte models
    params: int
    flops_per_token: int  # forward

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    @property
    def text_bytes(self) -> float:
        return self.tokens * self.bytes_per_token

    @property
    def train_flops_per_byte(self) -> float:
        return 3 * self.flops_per_token / self.bytes_per_token

    @property
    def train_flops(self) -> float:
        return 3 * self.flops_per_token * self.tokens

    def overrides(self) -> list[str]:
        m = self.model
        args = ["--model.layer_pattern", m.layer_pattern, "--model.d_model", str(m.d_model),
                "--model.n_layer", str(m.n_layer)]
        if "A" in m.layer_pattern:
            args += ["--model.n_head", str(m.n_head)]
        return args + ["--data.seq_len", str(self.seq_len), "--data.batch_size",
                       str(self.batch_size), "--trainer.max_steps", str(self.steps)]

    def describe(self) -> str:
        m = self.model
        return "\n".join([
            f"layers {m.layer_pattern} x {m.n_layer}, d_model {m.d_model}"
            + (f", {m.n_head} heads" if "A" in m.layer_pattern else "")
            + f", vocab {m.vocab_size}: {self.params / 1e6:.2f}M parameters",
            f"forward {self.flops_per_token:.4g} FLOPs per id at {self.seq_len} ids of context; "
            f"training {self.train_flops_per_byte:.4g} FLOPs per byte "
            f"({self.bytes_per_token:.3f} bytes per id)",
            f"{self.steps} steps x {self.batch_size} x {self.seq_len} ids = {self.tokens:.4g} ids, "
            f"{self.text_bytes:.4g} bytes of text, {self.train_flops:.4g} training FLOPs",
        ])


def _shape(base: ModelConfig, pattern: str, d_model: int, n_layer: int) -> ModelConfig:
    return replace(base, layer_pattern=pattern, d_model=d_model, n_layer=n_layer,
                   n_head=max(1, d_model // HEAD_DIM))


def _depth(d_model: int, pattern: str) -> int:
    return max(1, round(d_model / (WIDTH_PER_BLOCK * len(pattern))))


def choose_shape(pattern: str, seq_len: int, cost, target: float, base: ModelConfig,
                 max_width: int = 8192) -> ModelConfig:
    """The shape (d_model, n_layer) whose cost(params, flops_per_token) is nearest `target`
    (in ratio): widths on the 64 grid at the usual depth, then depths around the best width."""
    def ratio(cfg):
        return cost(*measure(cfg, seq_len)) / target

    best, best_err = None, math.inf
    for d_model in range(WIDTH_STEP, max_width + 1, WIDTH_STEP):
        cfg = _shape(base, pattern, d_model, _depth(d_model, pattern))
        r = ratio(cfg)
        if abs(math.log(r)) < best_err:
            best, best_err = cfg, abs(math.log(r))
        if r > 1:
            break  # the cost grows with the width: wider is only further off
    for d_model in range(best.d_model - 2 * WIDTH_STEP, best.d_model + 3 * WIDTH_STEP, WIDTH_STEP):
        depth = _depth(d_model, pattern)
        for n_layer in range(max(1, depth - 2), depth + 3):
            if d_model < WIDTH_STEP:
                continue
            cfg = _shape(base, pattern, d_model, n_layer)
            err = abs(math.log(ratio(cfg)))
            if err < best_err:
                best, best_err = cfg, err
    return best


def plan(budget: float, pattern: str, *, text_bytes: float | None = None,
         tokens_per_param: float = 20.0, context_bytes: int = 2048, batch_size: int = 32,
         bytes_per_token: float = 1.0, vocab_size: int = codec.VOCAB_SIZE,
         base: ModelConfig | None = None) -> Plan:
    """Size a model of `pattern` for `budget` training FLOPs. With text_bytes: the shape whose
    FLOPs per byte spends the budget on exactly that much text (a matched comparison); without:
    the shape that spends it on tokens_per_param ids per parameter (Chinchilla's rule)."""
    base = replace(base or ModelConfig(), vocab_size=vocab_size)
    seq_len = max(1, round(context_bytes / bytes_per_token))
    if text_bytes is not None:
        target = budget / text_bytes  # training FLOPs per byte
        model = choose_shape(pattern, seq_len, lambda n, f: 3 * f / bytes_per_token, target, base)
        tokens = text_bytes / bytes_per_token
    else:
        model = choose_shape(pattern, seq_len, lambda n, f: 3 * f * tokens_per_param * n, budget, base)
        tokens = budget / (3 * measure(model, seq_len)[1])
    params, flops = measure(model, seq_len)
    steps = max(1, round(tokens / (batch_size * seq_len)))
    return Plan(model, seq_len, batch_size, steps, bytes_per_token, params, flops)


def config_plan(cfg, bytes_per_token: float | None = None) -> Plan:
    """The Plan a RunConfig describes (its bytes_per_token: measured on its token corpus if it
    is prepared, else the one given)."""
    if cfg.data.tokenizer == "bytes":
        bytes_per_token = 1.0
    elif bytes_per_token is None:
        from bytelm.data.bpe import TokenCorpus, token_dir
        from bytelm.data.sources import DataError
        from bytelm.training.datamodule import default_prepared_dir

        prepared = cfg.data.prepared_dir or default_prepared_dir(cfg.data.source, cfg.data.val_fraction)
        try:
            bytes_per_token = TokenCorpus(token_dir(prepared, cfg.data.bpe_vocab_size)).bytes_per_token()
        except DataError:
            raise ValueError("a BPE config: pass --bytes-per-token (its token corpus is not "
                             "prepared yet)") from None
    params, flops = measure(cfg.model, cfg.data.seq_len)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1))
    devices = cfg.trainer.get("devices", 1)
    world = devices if isinstance(devices, int) and devices > 0 else 1
    return Plan(cfg.model, cfg.data.seq_len, cfg.data.batch_size * accumulate * world,
                int(cfg.trainer.get("max_steps", 0)), bytes_per_token, params, flops)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bytelm.compute",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="report what this config costs instead of planning")
    parser.add_argument("--budget", type=float, help="training FLOPs")
    parser.add_argument("--arch", default="transformer",
                        help=f"{', '.join(ARCHS)}, or a layer pattern such as MMMAF")
    parser.add_argument("--bytes", type=float, help="bytes of text to train on (a matched comparison)")
    parser.add_argument("--tokens-per-param", type=float, default=20.0,
                        help="without --bytes: ids per parameter (default 20, Chinchilla)")
    parser.add_argument("--tokenizer", choices=("bytes", "bpe"), default="bytes")
    parser.add_argument("--bpe-vocab", type=int, default=4096, help="BPE vocabulary (default 4096)")
    parser.add_argument("--bytes-per-token", type=float,
                        help="the corpus's measured bytes per BPE token (data.prepare --bpe-vocab prints it)")
    parser.add_argument("--context-bytes", type=int, default=2048,
                        help="text per window in bytes (BPE: seq_len = this / bytes per token)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per optimizer step")
    args = parser.parse_args(argv)
    try:
        if args.config:
            from bytelm.config import ConfigError, build_config, load_yaml

            try:
                result = config_plan(build_config(load_yaml(args.config)), args.bytes_per_token)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        else:
            if args.budget is None:
                raise ValueError("pass --budget FLOPS (or --config PATH)")
            bpe = args.tokenizer == "bpe"
            if bpe and args.bytes_per_token is None:
                raise ValueError("--tokenizer bpe needs --bytes-per-token (measure it: python -m "
                                 "data.prepare --data SRC --out DIR --bpe-vocab N)")
            pattern = ARCHS.get(args.arch, args.arch)
            result = plan(args.budget, pattern, text_bytes=args.bytes,
                          tokens_per_param=args.tokens_per_param, context_bytes=args.context_bytes,
                          batch_size=args.batch_size,
                          bytes_per_token=args.bytes_per_token if bpe else 1.0,
                          vocab_size=args.bpe_vocab if bpe else codec.VOCAB_SIZE)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.describe())
    if not args.config:
        tokenizer = (["--data.tokenizer", "bpe", "--data.bpe_vocab_size", str(args.bpe_vocab)]
                     if args.tokenizer == "bpe" else [])
        print("train.py " + " ".join(result.overrides() + tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
