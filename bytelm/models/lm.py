"""One language model for every backbone: embedding, a stack of pre-norm residual blocks read
from a layer pattern, final RMSNorm, tied LM head. Imports nothing from Lightning.

    layer_pattern "M"  x n_layer  -> Mamba (the byte Mamba of mamba_ssm)
    layer_pattern "S"  x n_layer  -> Mamba-2 (SSD mixers; d_state 64-128, head_dim 64)
    layer_pattern "MF" x n_layer  -> Mamba with a SwiGLU MLP after every mixer
    layer_pattern "AF" x n_layer  -> Transformer (pre-norm, RoPE, SwiGLU)
    layer_pattern "MMMA" / "MMMMMMMA" -> hybrids with one attention layer in 4 / in 8

Every block is x + mixer(norm(x)), so existing Mamba checkpoints (layers.i.norm, layers.i.mixer)
load unchanged. As in mamba_ssm, the add is done by the next norm: blocks pass (hidden, residual)
= (their mixer's output, the stream before it), and each norm (norm_f too) computes
residual + hidden and normalises it in one fused pass. The stream is fp32 (fp64 for an fp64
model), also when the weights are bf16 (bf16-true), as mamba_ssm's residual_in_fp32; with fp32
weights (fp32 or *-mixed training) the maths is unchanged and the plain-PyTorch path reproduces
the unfused blocks bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bytelm import codec
from bytelm.modules.attention import Attention, KVCache
from bytelm.modules.mamba import MambaMixer, MambaState
from bytelm.modules.mamba2 import Mamba2Mixer, Mamba2State
from bytelm.modules.mlp import SwiGLU, swiglu_hidden
from bytelm.modules.norm import RMSNorm

LAYER_KINDS = {"M": "Mamba mixer", "S": "Mamba-2 (SSD) mixer", "A": "attention", "F": "SwiGLU MLP"}
_LETTERS = "M Mamba mixer, S Mamba-2 mixer, A attention, F MLP"


def _opt(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    d_model: int = _opt(256, "width of the residual stream")
    n_layer: int = _opt(4, "how many times layer_pattern repeats")
    layer_pattern: str = _opt("M", "one letter per pre-norm residual block: M Mamba mixer, "
                                   "S Mamba-2 (SSD) mixer, A attention, F SwiGLU MLP "
                                   "(e.g. M, S, MF, AF, MMMA)")
    d_state: int = _opt(16, "Mamba: SSM state size per channel (Mamba-2: per head row; 64-128)")
    d_conv: int = _opt(4, "Mamba: width of the causal depthwise conv")
    expand: int = _opt(2, "Mamba: inner width / d_model")
    dt_rank: int | None = _opt(None, "Mamba: rank of the dt projection (None: ceil(d_model/16))")
    dt_min: float = _opt(0.001, "Mamba: smallest initial dt")
    dt_max: float = _opt(0.1, "Mamba: largest initial dt")
    dt_init_floor: float = _opt(1e-4, "Mamba: floor of the initial dt")
    head_dim: int = _opt(64, "Mamba-2: channels per SSD head (heads = expand * d_model / head_dim)")
    n_groups: int = _opt(1, "Mamba-2: groups of heads sharing B and C")
    scan_backend: str = _opt("auto", "kernels (scan, conv1d, RMSNorm, RoPE, SwiGLU): auto | ref | "
                                     "naive | triton")
    n_head: int = _opt(4, "attention heads (head_dim = d_model / n_head)")
    rope_theta: float = _opt(10000.0, "RoPE base")
    d_ff: int | None = _opt(None, "SwiGLU hidden size (None: 8/3 d_model rounded up to 32)")
    vocab_size: int = _opt(codec.VOCAB_SIZE, "ids the model predicts (set from data.tokenizer)")
    pad_vocab_multiple: int = _opt(8, "embedding rows are rounded up to this multiple")
    norm_eps: float = _opt(1e-5, "RMSNorm epsilon")
    dropout: float = _opt(0.0, "dropout on the embeddings and every block's output in training "
                               "(nanoGPT's 10.7M Shakespeare model uses 0.2)")

    @property
    def blocks(self) -> str:
        """The residual blocks, bottom to top: layer_pattern repeated n_layer times."""
        return self.layer_pattern * self.n_layer

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def norm_backend(self) -> str:
        """RMSNorm, RoPE and SwiGLU follow scan_backend (the naive scan's reference is their
        ref)."""
        return "ref" if self.scan_backend == "naive" else self.scan_backend

    @property
    def mlp_hidden(self) -> int:
        return self.d_ff or swiglu_hidden(self.d_model)

    def check(self):
        """Raise a one-line ValueError for a pattern or shape the model cannot be built from."""
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_pattern:
            raise ValueError(f"model.layer_pattern is empty (letters: {_LETTERS})")
        for letter in self.layer_pattern:
            if letter not in LAYER_KINDS:
                raise ValueError(f"model.layer_pattern: unknown layer {letter!r} in "
                                 f"{self.layer_pattern!r} ({_LETTERS})")
        if "S" in self.layer_pattern:
            inner = self.expand * self.d_model
            if self.head_dim <= 0 or inner % self.head_dim:
                raise ValueError(f"model.head_dim {self.head_dim} must divide the Mamba-2 inner "
                                 f"width expand x d_model = {inner}")
            if self.n_groups <= 0 or (inner // self.head_dim) % self.n_groups:
                raise ValueError(f"model.n_groups {self.n_groups} must divide the Mamba-2 heads "
                                 f"({inner // self.head_dim})")
        if "A" in self.layer_pattern:
            if self.n_head <= 0 or self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
                raise ValueError(f"model.n_head {self.n_head} must split d_model {self.d_model} "
                                 f"into heads of even size (RoPE rotates pairs)")


class Block(nn.Module):
    """x + mixer(norm(x)), where the mixer is a Mamba mixer ("M"), a Mamba-2 mixer ("S"),
    attention ("A") or an MLP ("F").

    Takes and returns (hidden, residual): x = residual + hidden is formed by this block's norm
    (residual None: x = hidden, the embeddings), and the block returns its mixer's output
    beside x, for the next norm to add."""

    def __init__(self, kind: str, cfg: ModelConfig):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_backend)
        self.drop = nn.Dropout(cfg.dropout)
        if kind == "M":
            self.mixer = MambaMixer(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv,
                                    expand=cfg.expand, dt_rank=cfg.dt_rank, dt_min=cfg.dt_min,
                                    dt_max=cfg.dt_max, dt_init_floor=cfg.dt_init_floor,
                                    scan_backend=cfg.scan_backend)
        elif kind == "S":
            self.mixer = Mamba2Mixer(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv,
                                     expand=cfg.expand, head_dim=cfg.head_dim,
                                     n_groups=cfg.n_groups, dt_min=cfg.dt_min, dt_max=cfg.dt_max,
                                     dt_init_floor=cfg.dt_init_floor, norm_eps=cfg.norm_eps,
                                     scan_backend=cfg.scan_backend)
        elif kind == "A":
            self.mixer = Attention(cfg.d_model, cfg.n_head, cfg.rope_theta, cfg.norm_backend)
        else:
            self.mixer = SwiGLU(cfg.d_model, cfg.mlp_hidden, cfg.norm_backend)

    def forward(self, hidden, residual=None, return_state=False):
        """hidden, residual: (batch, length, d_model) -> hidden, residual [, state]."""
        normed, residual = self.norm.add_norm(hidden, residual)
        if not return_state:
            return self.drop(self.mixer(normed)), residual
        if self.kind == "F":
            return self.mixer(normed), residual, None
        out, state = self.mixer(normed, return_state=True)
        return out, residual, state

    def init_state(self, batch: int, device=None, dtype=None):
        return None if self.kind == "F" else self.mixer.init_state(batch, device, dtype)

    def step(self, hidden, residual, state):
        """hidden, residual: (batch, d_model) -> hidden, residual; `state` updated in place."""
        # y in the weights' dtype, not autocast's: Mamba's step keeps its conv output in its
        # input's dtype, as decoding always did
        normed, residual = self.norm.add_norm(hidden, residual, self.norm.weight.dtype)
        if self.kind == "F":
            return self.mixer(normed), residual
        return self.mixer.step(normed, state), residual

    def extra_flops_per_token(self, seq_len: int | None) -> int:
        """Forward FLOPs per token beyond the linear layers."""
        if self.kind in "MS":
            return self.mixer.flops_per_token()
        if self.kind == "A":
            if seq_len is None:
                raise ValueError("flops_per_token needs seq_len for a model with attention")
            return self.mixer.flops_per_token(seq_len)
        return 0


BlockState = MambaState | Mamba2State | KVCache | None


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(kind, cfg) for kind in cfg.blocks)
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_backend)
        self._init_weights()

    def _init_weights(self):
        """mamba_ssm's scheme: N(0, 0.02) embeddings, zero linear biases (except dt_proj's), and
        every block's out_proj (Mamba, attention or MLP) scaled by 1/sqrt(number of residual
        blocks) so the residual stream does not grow with depth (GPT-2's rule)."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                if not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
            if name.endswith("out_proj"):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                with torch.no_grad():
                    module.weight /= math.sqrt(len(self.layers))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (batch, length) int64 -> logits (batch, length, padded_vocab)."""
        hidden, residual = self.drop(self.embedding(input_ids)), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return F.linear(self.norm_f.add_norm(hidden, residual)[0], self.embedding.weight)

    # ---- incremental inference -----------------------------------------------------------
    def init_state(self, batch: int, device=None, dtype=None) -> list[BlockState]:
        """Empty per-block states: Mamba's recurrent state, attention's KV cache, None for MLPs."""
        return [layer.init_state(batch, device, dtype) for layer in self.layers]

    def prefill(self, input_ids: torch.Tensor):
        """Parallel forward over a prompt that also returns the per-block state after it.
        input_ids: (batch, length) -> logits of the last position (batch, vocab), states."""
        hidden, residual = self.embedding(input_ids), None
        states = []
        for layer in self.layers:
            hidden, residual, state = layer(hidden, residual, return_state=True)
            states.append(state)
        last = None if residual is None else residual[:, -1]
        return F.linear(self.norm_f.add_norm(hidden[:, -1], last)[0], self.embedding.weight), states

    def step(self, input_ids: torch.Tensor, states: list[BlockState]) -> torch.Tensor:
        """One id per sequence. input_ids: (batch,) -> logits (batch, vocab); states in place."""
        hidden, residual = self.embedding(input_ids), None
        for layer, state in zip(self.layers, states):
            hidden, residual = layer.step(hidden, residual, state)
        return F.linear(self.norm_f.add_norm(hidden, residual)[0], self.embedding.weight)

    # ---- accounting ----------------------------------------------------------------------
    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding.weight.numel() if exclude_embedding else n

    def matmul_flops_per_token(self) -> int:
        """2 FLOPs per multiply-add of every linear layer and the tied LM head (a lookup in
        the embedding is free)."""
        weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 2 * (weights + self.embedding.weight.numel())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward FLOPs per token (training: 3x) by formula, for windows of seq_len tokens:
        every matmul (matmul_flops_per_token), attention's scores and value sums counted causally
        (query t attends to t+1 keys: 2 * d_model * (seq_len+1) per attention block), and each
        Mamba mixer's conv and scan element-wise work. Norms, activations, softmax and RoPE are
        not counted. seq_len is needed only when there is attention."""
        extra = sum(layer.extra_flops_per_token(seq_len) for layer in self.layers)
        return self.matmul_flops_per_token() + extra

    def config_dict(self) -> dict:
        return asdict(self.cfg)


@torch.no_grad()
def generate(model: LM, prompt_ids: torch.Tensor, max_new_bytes: int, temperature: float = 1.0,
             top_p: float = 1.0, generator: torch.Generator | None = None, vocab_limit: int = 256,
             cuda_graph: bool | None = None):
    """Sample a continuation id by id from the incremental state (Mamba: O(1) per id; attention:
    a KV cache). prompt_ids: (batch, length >= 1). Yields (batch,) tensors of new ids: bytes, or
    tokens for a token model (then pass vocab_limit=tokenizer.vocab_size).
    cuda_graph: replay each step from a CUDA graph (bytelm.models.cuda_graph.decode_step;
    None: on CUDA, for models without attention, for long enough generations)."""
    from bytelm.models.cuda_graph import decode_step, use_graph

    graph = use_graph(cuda_graph, model, prompt_ids.device, max_new_bytes - 1)
    logits, states = model.prefill(prompt_ids)
    step = None
    for i in range(max_new_bytes):
        next_ids = sample_next(logits, temperature, top_p, generator, vocab_limit)
        yield next_ids
        if i == max_new_bytes - 1:
            break
        step = step or decode_step(model, states, next_ids, graph)
        logits = step(next_ids)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None, vocab_limit: int = 256) -> torch.Tensor:
    """Only ids below vocab_limit are sampled (bytes: 256, so specials and padding never are);
    temperature 0 is greedy."""
    logits = logits[:, :vocab_limit].float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
