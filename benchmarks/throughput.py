"""Training throughput of byte models on one GPU: bytes/s, MFU and peak memory.

Trains (forward + backward + fused AdamW, bf16 autocast; eager, or with --cuda-graph the forward
and backward replayed from CUDA graphs) a byte Mamba and a byte Transformer of about the same
parameter count for a fixed number of steps at several contexts, with the same bytes per step,
and prints one markdown table. When mamba_ssm is importable, its
MambaLMHeadModel of the Mamba's shape gets a row too (the table says why when it is skipped).

    python benchmarks/throughput.py                       # ~90M models, contexts 2K / 8K / 32K
    python benchmarks/throughput.py --sizes 90m,350m --steps 10 --out results/throughput.md
    python benchmarks/throughput.py --contexts 8192 --mamba2   # also a Mamba-2 (SSD) row

MFU = training FLOPs by formula (3 x LM.flops_per_token: every matmul, attention's causal
quadratic term, the scan's element-wise work) x bytes / time / 989e12 (H100/H200 dense bf16
datasheet peak). Lightning's flop counter cannot see Triton kernels, hence the formula.
A model that does not fit takes the same bytes per step in halved micro-batches with gradient
accumulation, shown as `batch (micro x accum)`.

SM MHz and W: the GPU's mean SM clock and power draw over the timed steps (nvidia-smi's
clocks.sm and power.draw, sampled every 100 ms from before the first timed step; power.draw
is itself a ~1 s average on recent GPUs; blank without nvidia-smi). A step near the enforced
power limit runs at lower clocks: on the H200 (700 W) the 90M Mamba's 8K step does
(benchmarks/NOTES.md, seventeenth session), and its time moves with the clock from step to step.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bytelm.models.lm import LM, ModelConfig  # noqa: E402
from bytelm.training.cuda_graph import GraphedLoss  # noqa: E402

PEAK_FLOPS = 989e12
# name -> (mamba shape, transformer shape); PERF.md's peers: mamba_ssm 768 x 24, GPT 768 x 12.
SIZES = {
    "90m": (dict(d_model=768, n_layer=24, layer_pattern="M"),
            dict(d_model=768, n_layer=12, layer_pattern="AF", n_head=12, d_ff=2048)),
    "350m": (dict(d_model=1024, n_layer=52, layer_pattern="M"),
             dict(d_model=1024, n_layer=27, layer_pattern="AF", n_head=16, d_ff=2816)),
}
# --mamba2: a Mamba-2 (SSD mixers, state 64, heads of 64) of about the Mamba's parameters
MAMBA2 = {"90m": dict(d_model=768, n_layer=24, layer_pattern="S", d_state=64),
          "350m": dict(d_model=1024, n_layer=54, layer_pattern="S", d_state=64)}
CONTEXTS = {2048: 32, 8192: 8, 32768: 2}  # context -> batch: 65,536 bytes per step


class PeerLM(torch.nn.Module):
    """mamba_ssm's MambaLMHeadModel of our Mamba's shape (byte vocabulary), returning logits;
    its FLOPs are counted with our formula for the same shape."""

    def __init__(self, model_kw: dict):
        super().__init__()
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        self.model = MambaLMHeadModel(MambaConfig(d_model=model_kw["d_model"],
                                                  n_layer=model_kw["n_layer"], vocab_size=256))
        # our model of the same shape, for the FLOP formula only: kept on the CPU, outside the
        # module tree (so neither the optimizer nor the memory figures see it)
        self._ours_flops = LM(ModelConfig(**model_kw, scan_backend="ref")).flops_per_token

    def forward(self, ids):
        return self.model(ids).logits

    def flops_per_token(self, seq_len):
        return self._ours_flops(seq_len)

    def num_params(self):
        return sum(p.numel() for p in self.model.parameters())


def peer_missing() -> str | None:
    """Why mamba_ssm's model cannot be benchmarked here, or None when it can."""
    try:
        import mamba_ssm.models.mixer_seq_simple  # noqa: F401
    except Exception as e:  # ImportError, or its CUDA extensions failing to load
        return f"{type(e).__name__}: {e}"
    return None


class GpuTelemetry:
    """A GPU's readings sampled by `nvidia-smi -lms` while the block runs: by default the SM
    clock (MHz) and board power (W). `samples` holds a tuple a sample; `means` is their
    column means, or None where nvidia-smi is missing or said nothing.
    gpu: nvidia-smi's --id (an index, a UUID as GPU-..., or a PCI bus id); query: its
    --query-gpu fields (numeric ones)."""

    def __init__(self, gpu: str, period_ms: int = 100, query: str = "clocks.sm,power.draw"):
        self.cmd = ["nvidia-smi", f"--id={gpu}", f"--query-gpu={query}",
                    "--format=csv,noheader,nounits", f"-lms={period_ms}"]
        self.samples: list[tuple[float, ...]] = []
        self.proc = self.reader = None

    def __enter__(self):
        if shutil.which(self.cmd[0]):
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
            # nvidia-smi takes a while to start: let its first sample land before the block's
            # work, so the means cover all of it (at most 5 s)
            deadline = time.monotonic() + 5
            while not self.samples and self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                sample = tuple(float(v) for v in line.split(","))
            except ValueError:  # "[N/A]" or a message: not a sample
                continue
            self.samples.append(sample)

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # a wedged nvidia-smi must not hang the benchmark
                self.proc.kill()
                self.proc.wait()
            self.reader.join(timeout=5)
            self.proc.stdout.close()

    @property
    def means(self) -> tuple[float, ...] | None:
        if not self.samples:
            return None
        return tuple(sum(v) / len(self.samples) for v in zip(*self.samples))


def gpu_id() -> str:
    """nvidia-smi's name for the current CUDA device: its UUID (indices differ under
    CUDA_VISIBLE_DEVICES), else its index."""
    uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else str(torch.cuda.current_device())


def gpu_limits(gpu: str) -> str:
    """The enforced power limit and top SM clock as nvidia-smi reports them ('' without it)."""
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        out = subprocess.run(["nvidia-smi", f"--id={gpu}",
                              "--query-gpu=enforced.power.limit,clocks.max.sm",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        watts, mhz = (float(v) for v in out.strip().split(","))
    except (subprocess.TimeoutExpired, OSError, ValueError):
        return ""
    return f", power limit {watts:.0f} W, top SM clock {mhz:.0f} MHz"


def training_loss(model: torch.nn.Module, cuda_graph: bool):
    """ids (batch, length + 1) -> the next-byte cross entropy of the model's logits (call it
    under autocast); cuda_graph: its forward and backward replayed from CUDA graphs, as
    train.cuda_graph does."""
    def loss_of(ids):
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    return GraphedLoss(loss_of, model.parameters()) if cuda_graph else loss_of


def train_step(model_kw: dict, backend: str, accum: int = 1, peer: bool = False,
               cuda_graph: bool = False):
    """(model, optimizer, step): a model on the GPU (seeded), fused AdamW, and step(ids) for ids
    (batch, length + 1): one optimizer step over `accum` micro-batches under bf16 autocast,
    returning the loss. Arguments as `bench`'s."""
    torch.manual_seed(0)
    model = (PeerLM(model_kw) if peer else LM(ModelConfig(**model_kw, scan_backend=backend))).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    loss_of = training_loss(model, cuda_graph)

    def step(ids):
        loss = 0.0
        for micro in ids.chunk(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                micro_loss = loss_of(micro) / accum
            micro_loss.backward()
            loss = loss + micro_loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return model, opt, step


def bench(model_kw: dict, seq_len: int, batch: int, steps: int, warmup: int, backend: str,
          accum: int = 1, peer: bool = False, cuda_graph: bool = False):
    """One model at one context; each optimizer step takes `batch` windows in `accum`
    micro-batches (the same bytes per step when a whole batch does not fit). peer: mamba_ssm's
    model of the same shape instead of ours. cuda_graph: forward and backward as CUDA graphs
    (bytelm.training.cuda_graph.GraphedLoss), the optimizer eager."""
    model, opt, step = train_step(model_kw, backend, accum, peer, cuda_graph)
    data = torch.randint(0, 256, (steps + warmup, batch, seq_len + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    for i in range(warmup):
        step(data[i])
    torch.cuda.synchronize()
    with GpuTelemetry(gpu_id()) as telemetry:
        start = time.perf_counter()
        for i in range(steps):
            loss = step(data[warmup + i])
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
    bytes_per_s = batch * seq_len / seconds
    flops = 3 * model.flops_per_token(seq_len) * batch * seq_len
    result = dict(params=model.num_params(), ms=seconds * 1e3, bytes_per_s=bytes_per_s,
                  mfu=flops / seconds / PEAK_FLOPS, peak_gb=torch.cuda.max_memory_allocated() / 1e9,
                  loss=loss.item(), clock_watts=telemetry.means)
    del model, opt, data
    torch.cuda.empty_cache()
    return result


TABLE_HEADER = (
    "| size | batch x context | model | params | step ms | bytes/s | MFU | peak GB | bytes/s / Transformer's | SM MHz | W |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def telemetry_cells(means) -> str:
    """The SM MHz and W cells of a row (blank without samples)."""
    return " | " if means is None else f"{means[0]:.0f} | {means[1]:.0f}"


def table_row(size: str, batch: int, context: int, name: str, r: dict | None,
              base: float = float("nan")) -> str:
    """One TABLE_HEADER row: `bench`'s result r (None: out of memory at every micro-batch);
    base: the Transformer's bytes/s."""
    if r is None:
        return f"| {size} | {batch} x {context} | {name} | | OOM | | | | | | |"
    micro = f" ({batch // r['accum']} x {r['accum']})" if r["accum"] > 1 else ""
    return (f"| {size} | {batch}{micro} x {context} | {name} | {r['params'] / 1e6:.1f}M | "
            f"{r['ms']:.1f} | {r['bytes_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
            f"{r['peak_gb']:.1f} | {r['bytes_per_s'] / base:.2f} | {telemetry_cells(r['clock_watts'])} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="90m", help="comma list of " + ", ".join(SIZES))
    p.add_argument("--contexts", default="2048,8192,32768")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="triton", help="Mamba scan backend")
    p.add_argument("--cuda-graph", action="store_true",
                   help="every model's forward and backward replayed from CUDA graphs "
                        "(train.cuda_graph); the optimizer stays eager")
    p.add_argument("--out", help="also write the table to this markdown file")
    p.add_argument("--mamba2", action="store_true",
                   help="also a Mamba-2 (SSD) model of about the Mamba's parameter count")
    p.add_argument("--no-peer", action="store_true",
                   help="skip mamba_ssm's MambaLMHeadModel even when it is importable")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: benchmarks/throughput.py needs a CUDA GPU")

    import triton

    header = (f"GPU: {torch.cuda.get_device_name()}{gpu_limits(gpu_id())}, torch {torch.__version__}, triton "
              f"{triton.__version__}, bf16 autocast, fused AdamW, "
              f"{'CUDA-graphed forward + backward' if args.cuda_graph else 'eager'}, {args.steps} timed steps "
              f"after {args.warmup} warm-up; scan backend {args.backend}\n\n" + TABLE_HEADER)
    missing = "--no-peer" if args.no_peer else peer_missing()
    if missing:
        header = f"mamba_ssm's model skipped ({missing})\n\n" + header
    lines = [header]
    print(header, flush=True)
    for size in args.sizes.split(","):
        for context in (int(c) for c in args.contexts.split(",")):
            batch = CONTEXTS.get(context, max(1, 65536 // context))
            rows = {}
            models = [("Mamba", SIZES[size][0], False), ("Transformer", SIZES[size][1], False)]
            if args.mamba2:
                models.insert(1, ("Mamba-2", MAMBA2[size], False))
            if not missing:
                models.append(("mamba_ssm", SIZES[size][0], True))
            for name, kw, peer in models:
                rows[name] = None
                accum = 1
                while rows[name] is None and accum <= batch:  # halve the micro-batch on OOM
                    try:
                        rows[name] = bench(kw, context, batch, args.steps, args.warmup,
                                           args.backend, accum, peer=peer,
                                           cuda_graph=args.cuda_graph)
                        rows[name]["accum"] = accum
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        accum *= 2
            base = rows["Transformer"]["bytes_per_s"] if rows["Transformer"] else float("nan")
            for name, r in rows.items():
                line = table_row(size, batch, context, name, r, base)
                lines.append(line)
                print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
