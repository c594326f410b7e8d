"""Checkpoints that survive kills, full disks and preemption.

Writing: a checkpoint goes to a temporary file beside its final name, is fsynced and renamed into
place (a rename is atomic), and then a manifest `<name>.json` records its step, run id, config
hash, data fingerprint, library versions, size and sha256. `last.ckpt` is re-pointed only after
that (a hard link, or a copy where links are unsupported, renamed over the old one), so a kill
at any moment leaves every earlier checkpoint and `last.ckpt` whole. A failed write (a full
disk) removes its temporary file and raises a one-line CheckpointError.

When: every train.ckpt_every steps, at the end of training, and after SIGTERM or SIGUSR1
(preemption: the signal only sets a flag). The file is written when its step ends, where
Lightning's own ModelCheckpoint saves (the loop state Lightning's resume expects), under a
staged name; it is committed (renamed, manifest, last.ckpt) once that step's logging and
validation are done and flushed to the loggers, so a resumed run's logs continue with no step
missing or repeated. After a preemption signal the commit is followed by Preempted.

Resuming: the newest `step*.ckpt` that matches its manifest is used; damaged ones are skipped,
each with a one-line reason naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from bytelm.checkpoint import CheckpointError, manifest_path, verify_manifest
from bytelm.training.metrics import HostCopy

MANIFEST_KEY = "bytelm_manifest"  # the manifest is also stored inside the checkpoint
STAGED_SUFFIX = ".staged"  # written, not yet committed
_STEP_FILE = re.compile(r"^step(\d+)\.ckpt$")


def step_file(step: int) -> str:
    return f"step{step:07d}.ckpt"


def library_versions() -> dict:
    try:
        bytelm_version = importlib.metadata.version("bytelm")
    except importlib.metadata.PackageNotFoundError:
        bytelm_version = "source"
    # plain str: torch.__version__ is a str subclass that weights_only loading refuses
    return {"bytelm": bytelm_version, "python": platform.python_version(),
            "torch": str(torch.__version__), "lightning": str(L.__version__)}


# ---- durable writes -----------------------------------------------------------------------

def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_tmp_files(directory: Path) -> None:
    """Temporary and uncommitted files a killed run left behind (never read; they take space)."""
    for pattern in (".*.tmp-*", f"*{STAGED_SUFFIX}", f"*{STAGED_SUFFIX}.json"):
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a part."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _HashingFile:
    """What torch.save writes through this is hashed and counted on its way to the file."""

    def __init__(self, file):
        self.file, self.sha256, self.bytes = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic and given a manifest (see the module doc)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = _tmp_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                out = _HashingFile(f)
                torch.save(checkpoint, out)
                f.flush()
                os.fsync(f.fileno())
            manifest = {**checkpoint.get(MANIFEST_KEY, {}), "bytes": out.bytes,
                        "sha256": out.sha256.hexdigest()}
            manifest_path(path).unlink(missing_ok=True)  # must not vouch for the new bytes
            os.replace(tmp, path)
            atomic_write(manifest_path(path), (json.dumps(manifest, indent=2) + "\n").encode())
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            cause = _os_error(e)
            if cause is None:
                raise
            reason = f"{cause.strerror} (errno {cause.errno})" if cause.strerror else str(cause)
            hint = "; free some space and resume" if cause.errno == errno.ENOSPC else ""
            shown = path.with_name(path.name.removesuffix(STAGED_SUFFIX))
            raise CheckpointError(f"cannot write checkpoint {shown}: {reason}; the checkpoints "
                                  f"before it are intact{hint}") from None


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e`: torch's zip writer re-raises a failed write as a RuntimeError."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def point_last_at(ckpt: Path) -> Path:
    """Make `last.ckpt` (and its manifest) the same file as `ckpt`, atomically."""
    last = ckpt.with_name("last.ckpt")
    for src, dst in ((ckpt, last), (manifest_path(ckpt), manifest_path(last))):
        tmp = _tmp_path(dst)
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)  # no copy: both names share the (never rewritten) file
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    _fsync_dir(last.parent)
    return last


# ---- reading back -------------------------------------------------------------------------

def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def read_checkpoint(path: Path) -> dict:
    """The checkpoint dict (tensors memory-mapped: cheap); CheckpointError if unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # torch raises many types for truncated or corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {_reason(e)}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no state_dict)")
    return ckpt


def verify_checkpoint(path: Path) -> dict:
    """The manifest of an intact checkpoint, or a CheckpointError naming the file and why."""
    manifest = verify_manifest(path)
    if manifest is None:  # written before manifests existed: loading it is the check we have
        ckpt = read_checkpoint(path)
        manifest = {**ckpt.get(MANIFEST_KEY, {}), "step": ckpt.get("global_step")}
    return manifest


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Every committed step<N>.ckpt in ckpt_dir, newest first (intact or not)."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("step*.ckpt")
             if (m := _STEP_FILE.match(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def find_resume_checkpoint(ckpt_dir: Path) -> tuple[Path, dict, list[str]]:
    """(newest intact checkpoint, its manifest, one line per newer checkpoint skipped and why)."""
    skipped = []
    for path in step_checkpoints(ckpt_dir):
        try:
            return path, verify_checkpoint(path), skipped
        except (CheckpointError, OSError) as e:
            skipped.append(str(e) if isinstance(e, CheckpointError) else f"{path}: {_reason(e)}")
    if skipped:
        more = f" (and {len(skipped) - 1} older ones)" if len(skipped) > 1 else ""
        raise CheckpointError(f"no usable checkpoint in {ckpt_dir}: {skipped[0]}{more}")
    raise CheckpointError(f"no checkpoint in {ckpt_dir} to resume from (the run ended before its "
                          f"first one); start it again with --overwrite")


# ---- preemption ---------------------------------------------------------------------------

class Preempted(Exception):
    """Raised at the step boundary after a preemption signal, once the checkpoint is saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def _all_reduce_max(value: int, device: torch.device) -> HostCopy:
    """Queue the maximum of `value` over ranks and its copy to the host. torch.full, not
    torch.tensor: the latter would wait for the GPU."""
    reduced = torch.full((1,), value, dtype=torch.int32, device=device)
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
    return HostCopy(reduced)


class PreemptionSignals:
    """SIGTERM and SIGUSR1 (what schedulers send before they kill a job) only set a flag here."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None))
                    if s is not None)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.received = self.received or signum

    def install(self) -> None:
        """(Re)install the handlers; Lightning installs its own SIGTERM handler when fit starts."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class StepCheckpoints(L.Callback):
    """Saves `step<N>.ckpt` every `every` optimizer steps, at the end, and on preemption.

    A checkpoint is written when its step ends (where Lightning's ModelCheckpoint saves: the
    state Lightning's resume expects) under a staged name, and committed (renamed, manifest,
    last.ckpt) once that step's logging and validation are done and flushed, at the next step's
    start or at the end of training. A kill in between leaves only the previous checkpoint.
    """

    def __init__(self, directory: Path, every: int, manifest: dict,
                 signals: PreemptionSignals | None = None):
        self.directory, self.every, self.manifest = Path(directory), every, manifest
        self.signals = signals
        self.saved_step: int | None = None
        self.last_path: Path | None = None
        self._staged: int | None = None
        self._preempted: int | None = None  # the signal, agreed by all ranks at a step's end
        self._agreeing = None  # several ranks: the all-reduce of this step's signals, unread

    def on_train_start(self, trainer, pl_module):
        self.saved_step = trainer.global_step  # 0, or the step this run resumed from: on disk
        if self.signals is not None:
            self.signals.install()  # replaces Lightning's handler, which raises mid-step
            # Over several ranks Lightning broadcasts what its SIGTERM handler saw at every
            # batch start and reads it back (.item(): the host waits for the GPU). With its
            # handler replaced that is always 0; the ranks agree on signals below instead.
            loop = trainer.fit_loop.epoch_loop
            if trainer.world_size > 1 and hasattr(loop, "_broadcast_sigterm_tensor"):
                loop._broadcast_sigterm_tensor = lambda: None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not the end of an optimizer step
        step = trainer.global_step
        self._preempted = self._agreed_signal(trainer)
        due = (step % self.every == 0 or self._preempted or trainer.should_stop
               or 0 < trainer.max_steps <= step)
        if due and step != self.saved_step:
            trainer.save_checkpoint(self._staged_path(step))
            self._staged = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._staged is not None:
            self._commit(trainer)
        if self._preempted and self.saved_step == trainer.global_step:
            signum = self._preempted  # also on a rank that was not signalled itself
            raise Preempted(signum, f"preempted by {signal.Signals(signum).name} at step "
                                    f"{self.saved_step}: saved {self.last_path}; continue with "
                                    f"python train.py --resume {self.directory.parent}")

    def on_train_end(self, trainer, pl_module):
        if self._staged is not None:
            self._commit(trainer)
        elif trainer.global_step != self.saved_step:  # stopped mid-interval by something else
            path = self.directory / step_file(trainer.global_step)
            trainer.save_checkpoint(path)
            self._point_last_at(trainer, path)

    def on_exception(self, trainer, pl_module, exception):
        # Lightning's own SIGTERM handler, active until on_train_start replaces it, ends the run
        # with this exception after the step (and its validation): keep what that step staged.
        if isinstance(exception, SIGTERMException) and self._staged is not None:
            self._commit(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[MANIFEST_KEY] = {"step": trainer.global_step, **self.manifest}

    def _staged_path(self, step: int) -> Path:
        return self.directory / (step_file(step) + STAGED_SUFFIX)

    def _commit(self, trainer) -> None:
        path = self.directory / step_file(self._staged)
        try:
            for logger in trainer.loggers:  # the rows of every step up to this checkpoint
                logger.save()
            if trainer.is_global_zero:
                staged = self._staged_path(self._staged)
                manifest_path(path).unlink(missing_ok=True)  # must not vouch for the new bytes
                os.replace(staged, path)
                os.replace(manifest_path(staged), manifest_path(path))
            self._point_last_at(trainer, path)
        except OSError as e:
            raise CheckpointError(f"cannot commit checkpoint {path}: {e.strerror or e}; the "
                                  f"checkpoints before it are intact") from None
        self._staged = None

    def _point_last_at(self, trainer, path: Path) -> None:
        if trainer.is_global_zero:
            point_last_at(path)
        self.saved_step, self.last_path = trainer.global_step, path

    def _agreed_signal(self, trainer) -> int | None:
        """The preemption signal this rank or any other received (they must stop at one step).
        Over several ranks: the maximum over ranks of what each had received by the previous
        step's end, all-reduced then and read now, when it is long done (reading it at once
        would make the host wait for the GPU at every step). A preemption thus checkpoints one
        step later than on one rank, the same step on every rank."""
        signum = (self.signals.received if self.signals is not None else None) or 0
        if trainer.world_size == 1:
            return signum or None
        agreed, self._agreeing = self._agreeing, _all_reduce_max(
            signum, trainer.strategy.root_device)
        return (agreed.tolist()[0] or None) if agreed is not None else None
