"""Why a Transformer's decode step can be slow: SDPA's backends at one query against a KV cache.

Decoding changes the key length every step. This times the ~90M byte Transformer's batch-1
step after a prompt, with SDPA allowed each set of backends in turn (Attention.step reads
`bytelm.modules.attention.DECODE_BACKENDS`). CUDA only:

    python benchmarks/decode_attention.py [--prompt-bytes 8192] [--steps 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bytelm.modules.attention as attention  # noqa: E402
from bytelm.models.lm import LM, ModelConfig  # noqa: E402

CHOICES = {
    "all four (cuDNN, flash, memory-efficient, math)": [SDPBackend.CUDNN_ATTENTION,
                                                        SDPBackend.FLASH_ATTENTION,
                                                        SDPBackend.EFFICIENT_ATTENTION,
                                                        SDPBackend.MATH],
    "no cuDNN (bytelm's choice)": list(attention.DECODE_BACKENDS),
    "flash only": [SDPBackend.FLASH_ATTENTION],
    "math only": [SDPBackend.MATH],
}


@torch.no_grad()
def ms_per_step(model: LM, prompt_bytes: int, steps: int) -> float:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, states = model.prefill(torch.randint(0, 256, (1, prompt_bytes), device="cuda"))
        ids = logits[:, :256].argmax(-1)
        for _ in range(4):  # warm-up
            ids = model.step(ids, states)[:, :256].argmax(-1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            ids = model.step(ids, states)[:, :256].argmax(-1)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-bytes", type=int, default=8192)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: decode_attention.py needs a CUDA GPU")
    torch.manual_seed(0)
    model = LM(ModelConfig(d_model=768, n_layer=12, layer_pattern="AF", n_head=12,
                           d_ff=2048)).cuda().eval()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch 1, "
          f"{args.prompt_bytes}-byte prompt\n")
    print("| SDPA backends allowed | ms per step |\n| --- | --- |")
    chosen = attention.DECODE_BACKENDS
    try:
        for name, backends in CHOICES.items():
            attention.DECODE_BACKENDS = backends
            try:
                print(f"| {name} | {ms_per_step(model, args.prompt_bytes, args.steps):.2f} |")
            except RuntimeError as e:  # a backend that cannot take these inputs
                print(f"| {name} | failed: {str(e).splitlines()[0][:80]} |")
    finally:
        attention.DECODE_BACKENDS = chosen


if __name__ == "__main__":
    main()
