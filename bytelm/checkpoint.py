"""Load a trained model back from a training checkpoint, without Lightning."""

from __future__ import annotations

from pathlib import Path

import torch

from bytelm import codec
from bytelm.config import RunConfig, build_config
from bytelm.models.mamba_lm import MambaLM


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not one of ours (one-line message)."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A .ckpt file, or a run directory (its checkpoints/last.ckpt)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> tuple[RunConfig, MambaLM, dict]:
    """Returns (config, model in eval mode, the raw checkpoint dict)."""
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'corrupt file'}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "bytelm_config" not in ckpt:
        raise CheckpointError(f"{path} is not a bytelm training checkpoint (no state_dict/config)")
    cfg = build_config(ckpt["bytelm_config"])
    model = MambaLM(cfg.model)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
             if k.startswith("model.")}
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}  # torch.compile'd runs
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return cfg, model.eval(), ckpt


class ByteTokenizer:
    """The identity 'tokenizer' of byte models, with the interface token models also offer."""

    is_bytes = True
    vocab_size = codec.VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return codec.encode(text)

    def decode(self, ids) -> str:
        return codec.decode(ids)


def load_tokenizer(cfg: RunConfig, checkpoint_path: str | Path | None = None) -> ByteTokenizer:
    """The tokenizer a model was trained with (bytes for every byte-level model)."""
    return ByteTokenizer()
