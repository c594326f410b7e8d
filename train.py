"""Train a byte-level Mamba language model.

    python train.py                                   # configs/default.yaml: stdlib corpus, CPU-sized
    python train.py --config configs/mamba-tiny-shakespeare.yaml
    python train.py --model.d_model 512 --trainer.max_steps 2000 --data tinyshakespeare --seed 7
    python train.py --resume runs/default --trainer.max_steps 4000   # continue a run
    python train.py --trainer.devices 8 --trainer.strategy ddp      # 8 GPUs (or fsdp: sharded)
    scripts/torchrun.sh / sbatch scripts/slurm.sbatch               # several nodes: docs/distributed.md
    python train.py --help                            # every option

Runs live in runs/<name>/: config.yaml (the resolved config), checkpoints/ (step<N>.ckpt every
train.ckpt_every steps and at the end, each with a manifest step<N>.ckpt.json; last.ckpt is the
newest), logs/metrics.csv, samples.txt. Checkpoints are written atomically; --resume continues
from the newest intact one, exactly where it was (parameters, optimizer, data order, logs).
SIGTERM or SIGUSR1 (preemption) saves a checkpoint at the next step boundary and exits.

Exit status: 0 done; 1 stopped by a numerical fault (see train.on_nonfinite; a checkpoint is
saved); 2 bad input, or a checkpoint that could not be written (one line on stderr; nothing is
overwritten); 128+N preempted by signal N (143: SIGTERM): a checkpoint is saved, --resume it.
These handlers replace Lightning's SLURM auto-requeue: under SLURM (sbatch --signal=USR1@120),
requeue from the batch script on an exit status above 128 and start it with --resume auto
(scripts/slurm.sbatch does).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
AUTO = "auto"  # --resume auto


def parse_args(argv: list[str]):
    """Split off the run-level flags; everything else is a config override."""
    opts = {"config": None, "resume": None, "overwrite": False, "help": False}
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            opts["help"] = True
        elif arg == "--overwrite":
            opts["overwrite"] = True
        elif arg.split("=")[0] in ("--config", "--resume"):
            key = arg.split("=")[0][2:]
            if "=" in arg:
                opts[key] = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                opts[key] = argv[i + 1]
                i += 1
            else:
                opts[key] = ""
            if not opts[key]:
                print(f"error: --{key} needs a value", file=sys.stderr)
                raise SystemExit(2)
        else:
            rest.append(arg)
        i += 1
    return opts, rest


def resolve_config(opts, overrides):
    from bytelm.config import ConfigError, build_config, load_yaml, parse_overrides

    override_tree = parse_overrides(overrides)
    if opts["resume"]:
        run_dir = Path(opts["resume"])
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there, so it is not a run directory")
        base = load_yaml(saved)
        if opts["config"]:
            raise ConfigError("--resume continues a run with its saved config; drop --config")
        if opts["overwrite"]:
            raise ConfigError(f"--resume continues {run_dir} and --overwrite would delete it; "
                              f"pass one of them")
        cfg = build_config(base, override_tree)
        if cfg.name != base.get("name", cfg.name):
            raise ConfigError(f"--resume {run_dir} continues the run named {base['name']!r}; "
                              f"drop --name (or start a new run without --resume)")
        return cfg, run_dir
    base = load_yaml(opts["config"] or DEFAULT_CONFIG)
    cfg = build_config(base, override_tree)
    return cfg, Path(cfg.train.out_dir) / cfg.name


def resolve_auto_resume(opts, overrides) -> dict:
    """--resume auto: continue the run the config names if it has a checkpoint, else start it
    (replacing a run directory without checkpoints: it holds nothing to continue). One command
    line for the first start and every restart of a requeued job."""
    if opts["resume"] != AUTO:
        return opts
    from bytelm.config import ConfigError, to_dict
    from bytelm.training.checkpointing import step_checkpoints

    if opts["overwrite"]:
        raise ConfigError("--resume auto continues a run that has a checkpoint and --overwrite "
                          "would delete it; pass one of them")
    fresh = {**opts, "resume": None}
    cfg, run_dir = resolve_config(fresh, overrides)
    if not step_checkpoints(run_dir / "checkpoints"):
        if not is_launched_rank():
            print(f"--resume auto: no checkpoint in {run_dir}; starting the run")
        return {**fresh, "overwrite": (run_dir / "config.yaml").is_file()}
    resumed = {**opts, "resume": str(run_dir), "config": None}
    saved, _ = resolve_config(resumed, overrides)
    changed = first_difference(to_dict(saved), to_dict(cfg))
    if changed and not is_launched_rank():
        print(f"warning: --resume auto continues {run_dir} with its saved config; {changed} "
              f"differs in the config given and is not applied (a new run needs a new --name)",
              file=sys.stderr)
    return resumed


def first_difference(saved: dict, given: dict, prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two config trees."""
    for key in sorted(saved.keys() | given.keys()):
        a, b = saved.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}"
    return None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def is_launched_rank() -> bool:
    """A process a distributed launcher started for rank > 0: rank 0 owns the run directory."""
    return any(os.environ.get(k, "0") != "0"
               for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start a run where another run (or anything else) lives; writes nothing."""
    from bytelm.config import ConfigError

    if (run_dir / "config.yaml").exists():
        if not overwrite:
            raise ConfigError(f"run directory {run_dir} already holds a run; pass --resume {run_dir} "
                              f"to continue it, --overwrite to replace it, or --name to start another")
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"{run_dir} exists and is not a run directory (no config.yaml); refusing "
                          f"to write there: choose another --name or --train.out_dir")


def find_checkpoint(run_dir: Path):
    """(the newest intact checkpoint, its manifest); a warning line for each damaged newer one."""
    from bytelm.training.checkpointing import find_resume_checkpoint

    path, manifest, skipped = find_resume_checkpoint(run_dir / "checkpoints")
    for problem in skipped if not is_launched_rank() else []:
        print(f"warning: {problem}; resuming from {path.name} instead", file=sys.stderr)
    return path, manifest


def check_resumable(path: Path, cfg, task, data_fingerprint: str | None) -> None:
    """The checkpoint must fit this model: a one-line CheckpointError naming what differs."""
    from bytelm.checkpoint import CheckpointError
    from bytelm.config import to_dict
    from bytelm.training.checkpointing import MANIFEST_KEY, read_checkpoint

    ckpt = read_checkpoint(path)
    trained, now = (ckpt.get("bytelm_config") or {}).get("model", {}), to_dict(cfg)["model"]
    for key in sorted(trained.keys() & now.keys()):
        if trained[key] != now[key] and not key.endswith("backend"):  # kernels may change
            raise CheckpointError(f"model.{key} is {now[key]!r} but {path} was trained with "
                                  f"{trained[key]!r}; a resumed run keeps its architecture (drop "
                                  f"the override, or start a new run with --name)")
    state, expected = ckpt["state_dict"], task.state_dict()
    for name in sorted(state.keys() | expected.keys()):
        a, b = state.get(name), expected.get(name)
        if a is None or b is None or a.shape != b.shape:
            shape = lambda t: "absent" if t is None else tuple(t.shape)  # noqa: E731
            raise CheckpointError(f"{path} does not fit this model: {name} is {shape(a)} there "
                                  f"and {shape(b)} here")
    saved = ckpt.get(MANIFEST_KEY, {}).get("data_fingerprint")
    if saved and data_fingerprint and saved != data_fingerprint and not is_launched_rank():
        print(f"warning: the corpus changed since {path} was saved (data fingerprint {saved} "
              f"-> {data_fingerprint}): the resumed run reads different data", file=sys.stderr)
    split = (ckpt.get("bytelm_config") or {}).get("data", {}).get("val_fraction")
    if split is not None and split != cfg.data.val_fraction and not is_launched_rank():
        print(f"warning: data.val_fraction is {cfg.data.val_fraction} but {path} was trained with "
              f"{split}: the resumed run trains on a different split, and part of its "
              f"validation text may have been trained on", file=sys.stderr)


def start_run_dir(run_dir: Path, cfg, overwrite: bool) -> None:
    """Everything is checked by now: replace an old run if asked, write the config."""
    import yaml

    from bytelm.config import ConfigError, to_dict
    from bytelm.training.checkpointing import atomic_write, remove_stale_tmp_files

    try:
        if overwrite and (run_dir / "config.yaml").exists():
            shutil.rmtree(run_dir)
        for directory in (run_dir, run_dir / "checkpoints", run_dir / "logs"):
            directory.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp_files(directory)
        config = yaml.safe_dump(to_dict(cfg), sort_keys=False)
        atomic_write(run_dir / "config.yaml", config.encode())
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {run_dir}: {e.strerror or e}") from None


def check_corpus_fits(dm) -> None:
    """Draw the first training and validation batches now: a corpus too short for one window is
    a one-line DataError before anything is written, not a traceback from inside the loop."""
    next(iter(dm.train_dataloader()))
    next(iter(dm.val_dataloader()))


def build_trainer(cfg, run_dir: Path, sample_prompt: bytes, manifest: dict,
                  resume_step: int | None = None, signals=None, bytes_per_token: float = 1.0):
    import lightning as L
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import Timer
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from bytelm.config import ConfigError
    from bytelm.training.callbacks import SampleText, ValidateLastStep
    from bytelm.training.checkpointing import AtomicCheckpointIO, StepCheckpoints
    from bytelm.training.csv_log import ResumableCSVLogger
    from bytelm.training.distributed import GlobalBatch, cluster_plugins, make_strategy
    from bytelm.training.faults import NumericalGuard
    from bytelm.training.metrics import ProgressBar, StepTimer

    loggers = [ResumableCSVLogger(run_dir, resume_step)]  # its file is opened after start_run_dir
    if "tensorboard" in cfg.train.loggers:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard"))
    if "wandb" in cfg.train.loggers:
        os.environ.setdefault("WANDB_MODE", "offline")  # offline unless the user chose a mode
        # Lightning logs every metric against trainer/global_step; a resumed run keeps its id.
        loggers.append(WandbLogger(project=cfg.train.wandb_project, name=cfg.name,
                                   save_dir=str(run_dir), id=manifest["run_id"], resume="allow"))

    targs = dict(cfg.trainer)
    on_gpu = torch.cuda.is_available() and targs.get("accelerator", "auto") in ("auto", "gpu", "cuda")
    targs.setdefault("precision", "bf16-mixed" if on_gpu else "32-true")
    accumulate = targs.get("accumulate_grad_batches", 1)
    targs.setdefault("val_check_interval", cfg.train.eval_every * accumulate)
    targs.setdefault("check_val_every_n_epoch", None)
    targs.setdefault("log_every_n_steps", 10)
    targs.setdefault("num_sanity_val_steps", 0)
    targs["enable_checkpointing"] = False  # StepCheckpoints saves instead
    targs["strategy"] = make_strategy(targs.get("strategy", "auto"))
    callbacks = [
        StepCheckpoints(run_dir / "checkpoints", cfg.train.ckpt_every, manifest, signals),
        NumericalGuard(cfg.train.on_nonfinite, cfg.train.max_skips_in_row, cfg.train.max_skips,
                       cfg.train.spike_factor),
        *([ProgressBar()] if targs.get("enable_progress_bar", True) else []),
        GlobalBatch(cfg.data.batch_size, cfg.data.seq_len, bytes_per_token),
        SampleText(run_dir, sample_prompt, cfg.train.sample_bytes, cfg.train.sample_temperature,
                   cfg.seed),
        ValidateLastStep(cfg.train.eval_every),
        # Lightning would append the Timer for max_time after StepTimer
        *([Timer(duration=targs.pop("max_time"), interval="step")]
          if targs.get("max_time") is not None else []),
        StepTimer(bytes_per_token),  # last: writes the step's row once the others decided
    ]
    try:
        trainer = L.Trainer(default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks,
                            plugins=[AtomicCheckpointIO(), *cluster_plugins()], **targs)
    except (MisconfigurationException, ValueError) as e:  # devices, nodes, precision, ...
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"trainer: {first_line}") from None
    if cfg.train.cuda_graph:
        check_cuda_graph(cfg, trainer)
    return trainer


def check_cuda_graph(cfg, trainer) -> None:
    """train.cuda_graph's limits, as one-line errors before anything is written."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from bytelm.config import ConfigError

    if cfg.train.compile:
        raise ConfigError("train.cuda_graph and train.compile: choose one (a compiled model is "
                          "not captured)")
    if not isinstance(trainer.strategy, SingleDeviceStrategy):
        raise ConfigError(f"train.cuda_graph needs one device and no DDP / FSDP (they reduce "
                          f"gradients in autograd hooks that the graph skips); got trainer.strategy "
                          f"{cfg.trainer.get('strategy', 'auto')} on {trainer.world_size} "
                          f"device(s)")
    device = trainer.strategy.root_device
    if device.type != "cuda":
        raise ConfigError(f"train.cuda_graph needs a CUDA GPU; the trainer runs on {device}")


def main(argv: list[str] | None = None) -> int:
    opts, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if opts["help"]:
        from bytelm.config import help_text

        print(__doc__)
        print("Options (YAML keys; on the command line as --section.key VALUE):")
        print("  --config PATH        YAML config (default configs/default.yaml)")
        print("  --resume RUN_DIR     continue runs/<name> from its newest intact checkpoint")
        print("  --resume auto        continue the run the config names if it has a checkpoint,\n"
              "                       else start it (for requeued jobs: one command line)")
        print("  --overwrite          replace an existing run directory of the same name")
        print("  --data SRC           shorthand for --data.source SRC")
        print(help_text())
        print("\n  --trainer.KEY VALUE  any lightning.Trainer argument (max_steps, accelerator, devices,\n"
              "                       strategy, precision, accumulate_grad_batches, gradient_clip_val, ...)\n"
              "                       strategy: auto, ddp or fsdp (docs/distributed.md)")
        return 0

    from bytelm.checkpoint import CheckpointError
    from bytelm.config import ConfigError
    from bytelm.data.sources import DataError
    from bytelm.training.checkpointing import Preempted

    try:
        return train(opts, overrides)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {e.strerror} while writing {e.filename or 'the run'}; the last checkpoint "
              f"is intact: free some space and --resume", file=sys.stderr)
        return 2


def train(opts, overrides) -> int:
    opts = resolve_auto_resume(opts, overrides)
    cfg, run_dir = resolve_config(opts, overrides)
    owner = not is_launched_rank()
    resume_from, resumed = None, {}
    if opts["resume"]:
        resume_from, resumed = find_checkpoint(run_dir)
    elif owner:
        check_new_run_dir(run_dir, opts["overwrite"])

    import uuid

    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from bytelm.config import config_hash, to_dict
    from bytelm.training.checkpointing import (Preempted, PreemptionSignals, StepCheckpoints,
                                               library_versions)
    from bytelm.training.cpu import keep_freed_memory_for_reuse
    from bytelm.training.datamodule import ByteDataModule
    from bytelm.training.faults import NumericalGuard
    from bytelm.training.lm_module import LMTask

    signals = PreemptionSignals()  # from here on a preemption is remembered, not fatal
    signals.install()
    try:
        keep_freed_memory_for_reuse()
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = ByteDataModule(cfg.data, cfg.seed)
        dm.prepare_data()
        dm.setup()
        check_corpus_fits(dm)
        prompt = (cfg.train.sample_prompt.encode() if cfg.train.sample_prompt is not None
                  else dm.val_head(64))
        task = LMTask(cfg.model, cfg.optim, cfg.data.seq_len, compile=cfg.train.compile,
                      run_config=to_dict(cfg), tokenizer=dm.tokenizer,
                      cuda_graph=cfg.train.cuda_graph)
        fingerprint = getattr(dm.corpus, "meta", {}).get("fingerprint")
        if resume_from is not None:
            check_resumable(resume_from, cfg, task, fingerprint)
        if signals.received is not None:  # while the data was being prepared: nothing to save
            raise Preempted(signals.received, f"preempted by {signal_name(signals.received)} "
                                              f"before training started; nothing was written")
        if resume_from is None:  # a W&B id of its own, also after --overwrite
            run_id = f"{cfg.name}-{uuid.uuid4().hex[:8]}"
        else:  # the name-seed id of checkpoints from before manifests
            run_id = resumed.get("run_id") or f"{cfg.name}-{cfg.seed}"
        manifest = {"run_id": run_id, "config_hash": config_hash(cfg),
                    "data_fingerprint": fingerprint, "versions": library_versions()}
        trainer = build_trainer(cfg, run_dir, prompt, manifest, resumed.get("step"), signals,
                                dm.bytes_per_token)  # checks the trainer options; writes nothing
        if owner:  # every check passed: only now is anything in the run directory touched
            start_run_dir(run_dir, cfg, overwrite=opts["overwrite"])
        trainer.logger.experiment  # noqa: B018 -- trims a resumed run's metrics.csv now
        checkpoints = next(c for c in trainer.callbacks if isinstance(c, StepCheckpoints))
        try:
            trainer.fit(task, datamodule=dm, ckpt_path=str(resume_from) if resume_from else None)
        except SIGTERMException:  # raised by Lightning's handler before ours took over
            saved = checkpoints.last_path
            raise Preempted(signal.SIGTERM, f"preempted by SIGTERM at step {trainer.global_step}: "
                                            f"{f'saved {saved}' if saved else 'no new checkpoint'}"
                                            f"; continue with python train.py --resume {run_dir}"
                            ) from None
        saved = checkpoints.last_path
        guard = next(c for c in trainer.callbacks if isinstance(c, NumericalGuard))
        if guard.stop_reason:
            print(f"error: {guard.stop_reason}; saved {saved} (continue with --resume {run_dir})",
                  file=sys.stderr)
            return 1
        if signals.received is not None:
            raise Preempted(signals.received, f"preempted by {signal_name(signals.received)} "
                                              f"after the last step: saved {saved}")
        if trainer.is_global_zero:
            print_summary(trainer, task, dm, run_dir, prompt)
        return 0
    finally:
        signals.restore()


def print_summary(trainer, task, dm, run_dir: Path, prompt: bytes) -> None:
    metrics = {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("val/")}
    sample = next((c.last_sample for c in trainer.callbacks if hasattr(c, "last_sample")), None)
    print(f"\nrun: {run_dir}  steps: {trainer.global_step}  params: {task.model.num_params():,}"
          f"  training FLOPs/byte: {3 * task.flops_per_token / dm.bytes_per_token:.3g}")
    if "val/bpb" in metrics:
        print(f"validation: {metrics['val/bpb']:.4f} bits per byte "
              f"({metrics['val/loss']:.4f} nats) over {int(metrics['val/bytes']):,} bytes")
    if sample is not None:
        print(f"sample:\n{prompt.decode('utf-8', errors='replace')}{sample}")


if __name__ == "__main__":
    sys.exit(main())
