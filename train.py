"""Train a byte-level Mamba language model.

    python train.py                                   # configs/default.yaml: stdlib corpus, CPU-sized
    python train.py --config configs/mamba-tiny-shakespeare.yaml
    python train.py --model.d_model 512 --trainer.max_steps 2000 --data tinyshakespeare --seed 7
    python train.py --resume runs/default --trainer.max_steps 4000   # continue a run
    python train.py --help                            # every option

Runs live in runs/<name>/: config.yaml (the resolved config), checkpoints/ (last.ckpt, every
train.ckpt_every steps and at the end), logs/metrics.csv, samples.txt.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


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
                raise SystemExit(f"error: --{key} needs a value")
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
        cfg = build_config(base, override_tree)
        return cfg, run_dir
    base = load_yaml(opts["config"] or DEFAULT_CONFIG)
    cfg = build_config(base, override_tree)
    return cfg, Path(cfg.train.out_dir) / cfg.name


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Returns the checkpoint to resume from, if any. Never clobbers another run silently."""
    from bytelm.config import ConfigError

    if resume:
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ConfigError(f"--resume {run_dir}: no checkpoints/last.ckpt to resume from")
        return last
    if (run_dir / "config.yaml").exists():
        if not overwrite:
            raise ConfigError(f"run directory {run_dir} already holds a run; pass --resume {run_dir} "
                              f"to continue it, --overwrite to replace it, or --name to start another")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def checkpoint_step(ckpt: Path) -> int:
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def build_trainer(cfg, run_dir: Path, sample_prompt: bytes, resume_step: int | None = None):
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, ThroughputMonitor
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from bytelm.training.callbacks import SampleText
    from bytelm.training.csv_log import make_csv_logger

    loggers = [make_csv_logger(run_dir, resume_step)]
    if "tensorboard" in cfg.train.loggers:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard"))
    if "wandb" in cfg.train.loggers:
        import os

        os.environ.setdefault("WANDB_MODE", "offline")  # offline unless the user chose a mode
        loggers.append(WandbLogger(project=cfg.train.wandb_project, name=cfg.name,
                                   save_dir=str(run_dir), id=f"{cfg.name}-{cfg.seed}",
                                   resume="allow"))

    targs = dict(cfg.trainer)
    on_gpu = torch.cuda.is_available() and targs.get("accelerator", "auto") in ("auto", "gpu", "cuda")
    targs.setdefault("precision", "bf16-mixed" if on_gpu else "32-true")
    accumulate = targs.get("accumulate_grad_batches", 1)
    targs.setdefault("val_check_interval", cfg.train.eval_every * accumulate)
    targs.setdefault("check_val_every_n_epoch", None)
    targs.setdefault("log_every_n_steps", 10)
    targs.setdefault("num_sanity_val_steps", 0)
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{step:07d}",
                        auto_insert_metric_name=False, every_n_train_steps=cfg.train.ckpt_every,
                        save_top_k=-1, save_last=True),
        *([RichProgressBar()] if targs.get("enable_progress_bar", True) else []),
        ThroughputMonitor(batch_size_fn=lambda b: b.shape[0], length_fn=lambda b: b.shape[1] - 1),
        SampleText(run_dir, sample_prompt, cfg.train.sample_bytes, cfg.train.sample_temperature,
                   cfg.seed),
    ]
    return L.Trainer(default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks, **targs)


def main(argv: list[str] | None = None) -> int:
    opts, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if opts["help"]:
        from bytelm.config import help_text

        print(__doc__)
        print("Options (YAML keys; on the command line as --section.key VALUE):")
        print("  --config PATH        YAML config (default configs/default.yaml)")
        print("  --resume RUN_DIR     continue runs/<name> from checkpoints/last.ckpt")
        print("  --overwrite          replace an existing run directory of the same name")
        print("  --data SRC           shorthand for --data.source SRC")
        print(help_text())
        print("\n  --trainer.KEY VALUE  any lightning.Trainer argument (max_steps, accelerator, devices,\n"
              "                       strategy, precision, accumulate_grad_batches, gradient_clip_val, ...)")
        return 0

    from bytelm.config import ConfigError
    from bytelm.data.sources import DataError

    try:
        return train(opts, overrides)
    except (ConfigError, DataError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(opts, overrides) -> int:
    cfg, run_dir = resolve_config(opts, overrides)
    ckpt = prepare_run_dir(run_dir, bool(opts["resume"]), opts["overwrite"])

    import lightning as L

    from bytelm.config import dump_yaml, to_dict
    from bytelm.training.cpu import keep_freed_memory_for_reuse
    from bytelm.training.datamodule import ByteDataModule
    from bytelm.training.lm_module import LMTask

    dump_yaml(cfg, run_dir / "config.yaml")
    keep_freed_memory_for_reuse()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = ByteDataModule(cfg.data, cfg.seed)
    dm.prepare_data()
    dm.setup()
    prompt = (cfg.train.sample_prompt.encode() if cfg.train.sample_prompt is not None
              else dm.val_head(64))
    task = LMTask(cfg.model, cfg.optim, cfg.data.seq_len, compile=cfg.train.compile,
                  run_config=to_dict(cfg))
    trainer = build_trainer(cfg, run_dir, prompt, checkpoint_step(ckpt) if ckpt else None)
    trainer.fit(task, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    if trainer.global_step % cfg.train.eval_every != 0:
        trainer.validate(task, datamodule=dm, verbose=False)  # always score the final model
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("val/")}
        sample = next((c.last_sample for c in trainer.callbacks if hasattr(c, "last_sample")), None)
        print(f"\nrun: {run_dir}  steps: {trainer.global_step}  params: {task.model.num_params():,}")
        if "val/bpb" in metrics:
            print(f"validation: {metrics['val/bpb']:.4f} bits per byte "
                  f"({metrics['val/loss']:.4f} nats) over {int(metrics['val/bytes']):,} bytes")
        if sample is not None:
            print(f"sample:\n{prompt.decode('utf-8', errors='replace')}{sample}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
