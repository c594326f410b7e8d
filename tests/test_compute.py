"""Compute-matched sizing: plans spend the budget on the asked bytes of text, and the shipped
matched family is matched in training FLOPs and in bytes of text."""

from pathlib import Path

import pytest

from bytelm import compute
from bytelm.config import build_config, load_yaml

MATCHED = Path(__file__).parent.parent / "configs" / "matched"


@pytest.mark.parametrize("arch, bytes_per_token", [("mamba", 1.0), ("transformer", 1.0),
                                                   ("hybrid-3to1", 1.0), ("transformer", 4.0)])
def test_plan_spends_the_budget_on_the_asked_text(arch, bytes_per_token):
    budget, text = 2e15, 2e8
    plan = compute.plan(budget, compute.ARCHS[arch], text_bytes=text, context_bytes=512,
                        batch_size=16, bytes_per_token=bytes_per_token,
                        vocab_size=4096 if bytes_per_token > 1 else 259)
    assert plan.seq_len == 512 / bytes_per_token
    assert plan.text_bytes == pytest.approx(text, rel=0.01)
    assert plan.train_flops == pytest.approx(budget, rel=0.05)  # shapes are discrete
    assert plan.model.d_model % 64 == 0 and plan.model.layer_pattern == compute.ARCHS[arch]


def test_chinchilla_plan_sees_tokens_per_param_ids():
    plan = compute.plan(1e16, "AF", tokens_per_param=20, context_bytes=256, batch_size=16)
    assert plan.tokens == pytest.approx(20 * plan.params, rel=0.05)
    assert plan.train_flops == pytest.approx(1e16, rel=0.01)


def test_matched_family_is_matched_in_flops_and_bytes():
    plans = {}
    for path in sorted(MATCHED.glob("*.yaml")):
        cfg = build_config(load_yaml(path))
        byte_context = 2048  # every member reads 2048 bytes of text per window
        plans[path.stem] = compute.config_plan(cfg, byte_context / cfg.data.seq_len)
    assert set(plans) == {"byte-mamba", "byte-transformer", "byte-hybrid-3to1", "bpe-transformer",
                          "bpe-mamba"}
    reference = plans["byte-mamba"]
    for name, plan in plans.items():
        assert plan.text_bytes == pytest.approx(reference.text_bytes, rel=0.002), name
        assert plan.train_flops == pytest.approx(reference.train_flops, rel=0.05), name


def test_cli_plans_reports_and_fails_in_one_line(capsys):
    assert compute.main(["--budget", "1e15", "--bytes", "1e8", "--arch", "mamba",
                         "--context-bytes", "256"]) == 0
    out = capsys.readouterr().out
    assert "training FLOPs" in out and "train.py --model.layer_pattern M" in out
    assert compute.main(["--config", str(MATCHED / "byte-mamba.yaml")]) == 0
    assert "4.163e+16 training FLOPs" in capsys.readouterr().out
    assert compute.main(["--budget", "1e15", "--tokenizer", "bpe"]) == 2
    assert "--bytes-per-token" in capsys.readouterr().err
    assert compute.main(["--budget", "1e15", "--arch", "MZ"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown layer 'Z'" in err and len(err.splitlines()) == 1
