"""Configs: every shipped YAML loads, overrides are typed, mistakes are one-line errors."""

import re
from pathlib import Path

import pytest

from bytelm.config import (ConfigError, RunConfig, build_config, dump_yaml, help_text, load_yaml,
                           parse_overrides)
from bytelm.models.lm import LM

CONFIG_DIR = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert {str(p.relative_to(CONFIG_DIR)) for p in CONFIGS} >= {
        "default.yaml", "mamba-tiny-shakespeare.yaml", "mamba-20m.yaml", "mamba-125m.yaml",
        "hybrid-3to1-20m.yaml", "hybrid-7to1-20m.yaml", "matched/byte-mamba.yaml",
        "matched/byte-transformer.yaml", "matched/byte-hybrid-3to1.yaml",
        "matched/bpe-transformer.yaml", "matched/bpe-mamba.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_config_loads_and_builds_its_model(path):
    import torch

    cfg = build_config(load_yaml(path))
    assert isinstance(cfg, RunConfig)
    with torch.device("meta"):  # no memory, no time: only shapes
        model = LM(cfg.model)
    assert model.num_params() > 0


def test_named_parameter_counts():
    import torch

    expected = {"mamba-tiny-shakespeare.yaml": 11.57e6, "mamba-20m.yaml": 20e6,
                "mamba-125m.yaml": 125e6, "hybrid-3to1-20m.yaml": 18.54e6,
                "hybrid-7to1-20m.yaml": 19.98e6, "mamba-mlp-20m.yaml": 20.69e6,
                "mamba2-20m.yaml": 19.98e6}
    for name, count in expected.items():
        cfg = build_config(load_yaml(CONFIG_DIR / name))
        with torch.device("meta"):
            n = LM(cfg.model).num_params()
        assert abs(n - count) / count < 0.03, (name, n)


def test_overrides_are_typed_and_merged():
    cfg = build_config({"model": {"d_model": 64}},
                       parse_overrides(["--model.n_layer", "3", "--data", "tinyshakespeare",
                                        "--optim.lr=1e-3", "--trainer.max_steps", "7",
                                        "--seed", "7", "--train.loggers", "csv,tensorboard"]))
    assert (cfg.model.d_model, cfg.model.n_layer, cfg.data.source) == (64, 3, "tinyshakespeare")
    assert cfg.optim.lr == 1e-3 and cfg.seed == 7 and cfg.trainer["max_steps"] == 7
    assert cfg.train.loggers == ["csv", "tensorboard"]
    assert cfg.data.val_bytes == 262144  # untouched defaults survive


@pytest.mark.parametrize("args, message", [
    (["--model.d_modle", "3"], "unknown config key 'model.d_modle' (did you mean model.d_model?)"),
    (["--model.d_model", "big"], "model.d_model: expected an integer, got 'big'"),
    (["--train.compile", "maybe"], "train.compile: expected true or false"),
    (["--trainer.max_stepz", "3"], "unknown config key 'trainer.max_stepz'"),
    (["--data.seq_len", "0"], "data.seq_len must be positive"),
    (["--model.scan_backend", "cuda"], "model.scan_backend: unknown backend 'cuda'"),
    (["--model.d_model"], "option --model.d_model needs a value"),
])
def test_mistakes_are_one_line_errors(args, message):
    with pytest.raises(ConfigError) as err:
        build_config(parse_overrides(args))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_yaml_round_trip_and_missing_file(tmp_path):
    cfg = build_config(parse_overrides(["--model.d_model", "96"]))
    dump_yaml(cfg, tmp_path / "c.yaml")
    assert build_config(load_yaml(tmp_path / "c.yaml")) == cfg
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")


def test_help_lists_every_option():
    text = help_text()
    for key in ("--data.source", "--model.d_model", "--optim.lr", "--train.eval_every", "--seed"):
        assert key in text


def test_string_options_keep_the_text_as_typed():
    cfg = build_config(parse_overrides(["--name", "007", "--train.sample_prompt", "0755",
                                        "--model.dt_rank", "null", "--trainer.max_steps", "5"]))
    assert (cfg.name, cfg.train.sample_prompt, cfg.model.dt_rank) == ("007", "0755", None)
    assert cfg.trainer["max_steps"] == 5
    assert build_config(parse_overrides(["--name", "2024-01-01"])).name == "2024-01-01"


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "seed must be in [0, 2**32)"),
    (["--model.expand", "0"], "model.expand must be positive"),
    (["--model.d_conv", "0"], "model.d_conv must be positive"),
])
def test_out_of_range_values_are_one_line_errors(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(parse_overrides(args))


def test_empty_trainer_section_keeps_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("name: y\ntrainer:\n  # max_steps: 3\n")
    assert build_config(load_yaml(tmp_path / "c.yaml")).trainer["max_steps"] == 1000
