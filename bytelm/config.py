"""Run configuration: small typed dataclasses, YAML files and dotted command-line overrides.

Every key in a YAML file or on the command line must name a field; a wrong key or a value of
the wrong type is a one-line ConfigError naming it. `trainer` is passed through to Lightning's
Trainer and is checked against its signature instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bytelm import codec
from bytelm.models.lm import ModelConfig


class ConfigError(ValueError):
    """A user mistake in a config file or on the command line."""


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    kw = {"metadata": {"help": text}}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, **kw)
    return field(default=default, **kw)


@dataclass
class DataConfig:
    source: str = _help("corpus: stdlib | tinyshakespeare | enwik8 | text8 | hf:NAME[:CONFIG] | a "
                        "file, directory or glob", "stdlib")
    text_column: str = _help("text field of .jsonl/.parquet/HF sources", "text")
    val_fraction: float = _help("fraction of the corpus held out for validation", 0.1)
    prepared_dir: str | None = _help("where prepared shards go (default: data_cache/<source>)", None)
    tokenizer: str = _help("bytes (the byte model) | bpe (a byte-level BPE trained on the training "
                           "split: the tokenized baseline)", "bytes")
    bpe_vocab_size: int = _help("vocabulary of the BPE, the 256 single-byte tokens included", 4096)
    seq_len: int = _help("context per training window: bytes, or tokens with data.tokenizer bpe",
                         256)
    batch_size: int = _help("windows per micro-batch (per device)", 16)
    val_bytes: int | None = _help("bytes scored by each periodic validation (None: whole split)",
                                  262144)
    probe_fraction: float = _help("share of training rows replaced by character-probe examples "
                                  "over probe-train words (bytelm.probes; 0: off)", 0.0)
    probe_words: str | None = _help("word list for probes, one a line (default: the most "
                                    "frequent words of the training corpus)", None)


@dataclass
class OptimConfig:
    lr: float = _help("peak learning rate", 2e-3)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak (cosine)", 0.1)
    warmup_steps: int = _help("linear warmup, in optimizer steps", 50)
    decay_steps: int | None = _help("length of the cosine schedule in optimizer steps "
                                    "(None: trainer.max_steps)", None)
    weight_decay: float = _help("AdamW weight decay (never on norms, biases, A_log, D)", 0.1)
    beta1: float = _help("AdamW beta1", 0.9)
    beta2: float = _help("AdamW beta2", 0.95)
    eps: float = _help("AdamW epsilon", 1e-8)
    fused: bool | None = _help("fused AdamW, one kernel for all parameters (None: on CUDA, unless "
                               "an fp16 grad scaler must unscale before clipping)", None)


@dataclass
class TrainConfig:
    out_dir: str = _help("runs go to OUT_DIR/NAME", "runs")
    eval_every: int = _help("validate every N optimizer steps (and always at the end)", 200)
    ckpt_every: int = _help("checkpoint every N optimizer steps (and at the end)", 200)
    loggers: list[str] = _help("any of csv, wandb, tensorboard (csv is always on)",
                               factory=lambda: ["csv"])
    wandb_project: str = _help("W&B project (offline unless WANDB_MODE is set)", "bytelm")
    compile: bool = _help("torch.compile the model", False)
    cuda_graph: bool = _help("replay each training step's forward and backward from CUDA graphs "
                             "(one CUDA GPU, not with compile; a batch of another shape runs "
                             "eagerly)", False)
    sample_bytes: int = _help("bytes generated after each validation", 256)
    sample_prompt: str | None = _help("prompt of the sample (default: the start of the val split)",
                                      None)
    sample_temperature: float = _help("temperature of the sample", 0.8)
    on_nonfinite: str = _help("a NaN/inf loss or gradient: skip (drop that step's update, count "
                              "it) or stop (checkpoint and exit)", "skip")
    max_skips_in_row: int = _help("stop after this many skipped steps in a row", 5)
    max_skips: int = _help("stop after this many skipped steps in all", 100)
    spike_factor: float = _help("warn about and count a loss above this multiple of its running "
                                "mean (0: off)", 3.0)


@dataclass
class RunConfig:
    name: str = _help("run name: the run lives in train.out_dir/NAME", "default")
    seed: int = _help("seed of initialisation and data order", 1337)
    data: DataConfig = _help("data", factory=DataConfig)
    model: ModelConfig = _help("model", factory=ModelConfig)
    optim: OptimConfig = _help("optimizer and schedule", factory=OptimConfig)
    train: TrainConfig = _help("loop, logging, checkpoints", factory=TrainConfig)
    trainer: dict = _help("passed to lightning.Trainer (max_steps, accelerator, devices, ...)",
                          factory=lambda: {"max_steps": 1000})


SHORTCUTS = {"data": "data.source"}  # --data X means --data.source X


# ---- type checking ------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Return `value` as type `tp` or raise a ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _fields(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _trainer_keys() -> set[str]:
    from lightning.pytorch import Trainer

    return set(inspect.signature(Trainer.__init__).parameters) - {"self"}


class CliValue:
    """A command-line value: its text and its YAML reading. A string option takes the text
    as typed (YAML would turn --name 007 into 7 and --name 0123 into 83)."""

    def __init__(self, raw: str, parsed):
        self.raw, self.parsed = raw, parsed

    def __repr__(self):
        return repr(self.raw)


def _takes_text(tp) -> bool:
    return tp is str or str in typing.get_args(tp)


def _cli_value(value, tp):
    if not isinstance(value, CliValue):
        return value
    if _takes_text(tp) and not (value.parsed is None and type(None) in typing.get_args(tp)):
        return value.raw
    return value.parsed


def _plain(value):
    """Command-line values inside a passed-through mapping, read as YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.parsed if isinstance(value, CliValue) else value


def _build(cls, values: dict, prefix: str = ""):
    values = values.parsed if isinstance(values, CliValue) else values
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    types_ = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        where = prefix + key
        if key not in types_:
            raise _unknown(where, [prefix + k for k in types_])
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, where + ".")
        elif where == "trainer":
            value = _coerce(_plain(value), dict, where)
            bad = set(value) - _trainer_keys()
            if bad:
                k = sorted(bad)[0]
                raise _unknown(f"trainer.{k}", [f"trainer.{t}" for t in _trainer_keys()])
            kwargs[key] = value
        else:
            kwargs[key] = _coerce(_cli_value(value, tp), tp, where)
    return cls(**kwargs)


# ---- merging, loading, dumping ----------------------------------------------------------

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value):
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "trainer":
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and k == "trainer":
            out[k] = {**out.get(k, {}), **v}
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def parse_overrides(args: list[str]) -> dict:
    """['--model.d_model', '512', '--data=x', ...] -> nested dict of parsed YAML scalars."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}' (options look like --model.d_model 512)")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw = args[i + 1]
            i += 1
        else:
            raise ConfigError(f"option --{key} needs a value")
        key = SHORTCUTS.get(key, key).replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, CliValue(raw, value))
        i += 1
    return tree


def build_config(*layers: dict) -> RunConfig:
    """Merge layers of nested dicts over the defaults and type-check the result."""
    merged: dict = {}
    for layer in layers:
        merged = _merge(merged, layer)
    defaults = to_dict(RunConfig())
    merged_trainer = {**defaults["trainer"], **(merged.get("trainer") or {})}
    cfg = _build(RunConfig, {**merged, "trainer": merged_trainer})
    # The model predicts the ids of its tokenizer: derived, never set by hand.
    vocab = cfg.data.bpe_vocab_size if cfg.data.tokenizer == "bpe" else codec.VOCAB_SIZE
    if cfg.model.vocab_size not in (vocab, ModelConfig().vocab_size):
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} does not match data.tokenizer "
                          f"{cfg.data.tokenizer} ({vocab} ids); it is derived, drop it")
    cfg.model.vocab_size = vocab
    _check_values(cfg)
    return cfg


def _check_values(cfg: RunConfig):
    positive = {"data.seq_len": cfg.data.seq_len, "data.batch_size": cfg.data.batch_size,
                "model.d_model": cfg.model.d_model, "model.n_layer": cfg.model.n_layer,
                "model.d_state": cfg.model.d_state, "model.expand": cfg.model.expand,
                "model.d_conv": cfg.model.d_conv, "model.dt_rank": cfg.model.dt_rank or 1,
                "model.pad_vocab_multiple": cfg.model.pad_vocab_multiple,
                "train.eval_every": cfg.train.eval_every, "train.ckpt_every": cfg.train.ckpt_every}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {cfg.seed}")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if not 0 <= cfg.data.probe_fraction < 1:
        raise ConfigError(f"data.probe_fraction must be in [0, 1), got {cfg.data.probe_fraction}")
    if cfg.data.tokenizer not in ("bytes", "bpe"):
        raise ConfigError(f"data.tokenizer: unknown tokenizer {cfg.data.tokenizer!r} (bytes, bpe)")
    if cfg.data.tokenizer == "bpe" and cfg.data.bpe_vocab_size <= 256:
        raise ConfigError(f"data.bpe_vocab_size {cfg.data.bpe_vocab_size} is too small: a byte-level "
                          f"BPE needs more than its 256 single-byte tokens")
    try:
        cfg.model.check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {cfg.optim.lr}")
    for name in cfg.train.loggers:
        if name not in ("csv", "wandb", "tensorboard"):
            raise ConfigError(f"train.loggers: unknown logger {name!r} (csv, wandb, tensorboard)")
    if cfg.train.on_nonfinite not in ("skip", "stop"):
        raise ConfigError(f"train.on_nonfinite must be skip or stop, got {cfg.train.on_nonfinite!r}")
    for key in ("max_skips_in_row", "max_skips"):
        if getattr(cfg.train, key) <= 0:
            raise ConfigError(f"train.{key} must be positive, got {getattr(cfg.train, key)}")
    if cfg.train.spike_factor < 0:
        raise ConfigError(f"train.spike_factor must be 0 (off) or positive, got {cfg.train.spike_factor}")
    from bytelm.training.distributed import check_strategy

    check_strategy(cfg.trainer.get("strategy", "auto"))
    from bytelm.ops.selective_scan import BACKENDS

    if cfg.model.scan_backend not in BACKENDS:
        raise ConfigError(f"model.scan_backend: unknown backend {cfg.model.scan_backend!r} "
                          f"({', '.join(BACKENDS)})")


def dump_yaml(cfg: RunConfig, path: str | Path):
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def help_text() -> str:
    """Every option with its default and meaning, for --help."""
    lines = []

    def walk(cls, prefix):
        defaults = cls()
        for f in dataclasses.fields(cls):
            tp = _fields(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"\n  [{prefix}{f.name}] {f.metadata.get('help', '')}")
                walk(tp, prefix + f.name + ".")
                continue
            default = getattr(defaults, f.name)
            lines.append(f"  --{prefix}{f.name} ({_type_name(tp)}, default {default!r})"
                         f"  {f.metadata.get('help', '')}".rstrip())

    walk(RunConfig, "")
    return "\n".join(lines)
