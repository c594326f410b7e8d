"""Sample a continuation of a prompt, streamed to stdout as it is generated.

    python -m eval.generate --ckpt runs/default --prompt "def main(" --max-bytes 400
    python -m eval.generate --ckpt runs/default --prompt "import " --temperature 0 # greedy
    python -m eval.generate --ckpt runs/big --prompt "The " --top-p 0.9 --seed 3 --device cuda

One prefill over the prompt, then one step per new id: Mamba carries its recurrent state
(O(1) work per byte), Transformers their KV cache. On CUDA a model without attention replays
each step from a CUDA graph (--no-cuda-graph: launch each step eagerly; the reported seconds
include the graph's capture). The JSON summary (text, bytes, speed) goes to stderr and to --out.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from bytelm.models.cuda_graph import decode_step, use_graph
from bytelm.models.lm import sample_next
from eval.common import (EvalError, Parser, add_common_args, autocast, load, n_symbols,
                         run_cli)


class TextStream:
    """Writes ids out as text as they come. Ids that end in an incomplete UTF-8 character (a
    multi-byte character split across byte ids or BPE tokens) wait for the rest of it."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.pending: list[int] = []
        self.text, self.n_bytes, self.n_ids = "", 0, 0

    def push(self, token: int):
        self.pending.append(token)
        self.n_ids += 1
        piece = self.tokenizer.decode(self.pending)
        if not piece.endswith("\ufffd") or len(self.pending) >= 8:  # 8: give up on invalid UTF-8
            self.flush()

    def flush(self):
        piece = self.tokenizer.decode(self.pending)
        self.out.write(piece)
        self.out.flush()
        self.text += piece
        self.n_bytes += len(piece.encode())
        self.pending = []


@torch.no_grad()
def generate(loaded, prompt: str, max_bytes: int, temperature: float, top_p: float, seed: int,
             out=None, cuda_graph: bool | None = None) -> dict:
    out = out or sys.stdout
    ids = loaded.tokenizer.encode(prompt)
    if not ids:
        raise EvalError("--prompt is empty; give at least one character to continue")
    device = loaded.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stream = TextStream(loaded.tokenizer, out)
    start = time.perf_counter()
    with autocast(device):
        # max_bytes - 1 steps at most (fewer for a BPE model, whose ids hold several bytes)
        graph = use_graph(cuda_graph, loaded.model, device, max_bytes - 1)
        logits, state = loaded.model.prefill(torch.tensor([ids], device=device))
        step = None
        while True:
            token = sample_next(logits, temperature, top_p, generator, n_symbols(loaded.tokenizer))
            stream.push(int(token))
            if stream.n_bytes + len(stream.pending) >= max_bytes:  # a pending id is >= 1 byte
                break
            step = step or decode_step(loaded.model, state, token, graph)
            logits = step(token)
    stream.flush()
    out.write("\n")
    seconds = time.perf_counter() - start
    return {"checkpoint": str(loaded.ckpt_path), "step": loaded.step, "prompt": prompt,
            "text": stream.text, "bytes": stream.n_bytes, "tokens": stream.n_ids,
            "temperature": temperature, "top_p": top_p, "seed": seed, "seconds": round(seconds, 3),
            "bytes_per_second": round(stream.n_bytes / seconds, 1), "device": str(device)}


def main(argv) -> int:
    parser = Parser(prog="python -m eval.generate", description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-bytes", type=int, default=256,
                        help="bytes to generate (default 256)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling mass (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="launch every step eagerly, not from a CUDA graph")
    args = parser.parse_args(argv)
    if args.max_bytes < 1:
        raise EvalError(f"--max-bytes must be positive, got {args.max_bytes}")
    if args.temperature < 0:
        raise EvalError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise EvalError(f"--top-p must be in (0, 1], got {args.top_p}")

    loaded = load(args.ckpt, args.device)
    result = generate(loaded, args.prompt, args.max_bytes, args.temperature, args.top_p, args.seed,
                      cuda_graph=False if args.no_cuda_graph else None)
    text = json.dumps(result, indent=2)
    print(text, file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
