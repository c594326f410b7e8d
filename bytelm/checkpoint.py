"""Load a trained model back from a training checkpoint, without Lightning."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from bytelm.config import RunConfig, build_config
from bytelm.models.lm import LM
from bytelm.tokenizer import BPETokenizer, ByteTokenizer


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


def manifest_path(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + ".json")


def verify_manifest(path: Path) -> dict | None:
    """The manifest training writes beside a checkpoint, checked against the file's size and
    sha256 (None for checkpoints from before manifests); CheckpointError names what is wrong."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
        size, sha256 = manifest["bytes"], manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the manifest {mpath}: {type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]}") from None
    actual = path.stat().st_size
    if actual != size:
        raise CheckpointError(f"checkpoint {path} has {actual} bytes but its manifest says {size} "
                              f"(truncated or overwritten)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != sha256:
        raise CheckpointError(f"checkpoint {path} does not match the sha256 in its manifest "
                              f"(the file is corrupt)")
    return manifest


def load_checkpoint(path: str | Path, map_location="cpu") -> tuple[RunConfig, LM, dict]:
    """Returns (config, model in eval mode, the raw checkpoint dict); any backbone."""
    path = resolve_checkpoint(path)
    verify_manifest(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'corrupt file'}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "bytelm_config" not in ckpt:
        raise CheckpointError(f"{path} is not a bytelm training checkpoint (no state_dict/config)")
    cfg = build_config(ckpt["bytelm_config"])
    model = LM(cfg.model)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
             if k.startswith("model.")}
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}  # torch.compile'd runs
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return cfg, model.eval(), ckpt


def load_tokenizer(cfg: RunConfig, checkpoint_path: str | Path | dict | None = None
                   ) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a model was trained with: bytes for byte models; for token models the BPE
    stored in the checkpoint (a path, or the dict load_checkpoint returned), else the one beside
    the prepared data (<prepared_dir>/bpe-<vocab>/tokenizer.json)."""
    if cfg.data.tokenizer == "bytes":
        return ByteTokenizer()
    if checkpoint_path is not None:
        ckpt = checkpoint_path
        if not isinstance(ckpt, dict):
            path = resolve_checkpoint(checkpoint_path)
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            except Exception as e:
                raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}") from None
        if ckpt.get("bytelm_tokenizer"):
            return BPETokenizer.from_json(ckpt["bytelm_tokenizer"])
    from bytelm.data.bpe import TOKENIZER_FILE, token_dir
    from bytelm.training.datamodule import default_prepared_dir

    prepared = cfg.data.prepared_dir or default_prepared_dir(cfg.data.source, cfg.data.val_fraction)
    path = token_dir(prepared, cfg.data.bpe_vocab_size) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"token model without its tokenizer: none in the checkpoint and no {path}")
    return BPETokenizer.from_file(path)
