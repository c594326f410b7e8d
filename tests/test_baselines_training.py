"""End to end through train.py for the baselines: a Transformer, a hybrid and a BPE model learn
a tiny corpus, log their FLOPs, and load back (with their tokenizer) from the checkpoint."""

import csv
import json
from pathlib import Path

import pytest
import torch

import train

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n"
        + "Pack my box with five dozen liquor jugs. " * 40 + "\n") * 6


def run(tmp_path, name, steps, *extra):
    (tmp_path / "corpus.txt").write_text(TEXT)
    args = ["--data", str(tmp_path / "corpus.txt"), "--name", name,
            "--train.out_dir", str(tmp_path / "runs"),
            "--data.prepared_dir", str(tmp_path / "prepared"),
            "--data.seq_len", "32", "--data.batch_size", "8", "--data.val_bytes", "2048",
            "--model.d_model", "32", "--model.n_layer", "2", "--model.d_state", "4",
            "--model.n_head", "4", "--optim.lr", "1e-2", "--optim.warmup_steps", "5",
            "--train.eval_every", "100", "--train.ckpt_every", "100", "--train.sample_bytes", "16",
            "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            *extra]
    assert train.main(args) == 0
    return tmp_path / "runs" / name


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def column(rows, key) -> dict[int, float]:
    return {int(r["step"]): r[key] for r in rows if key in r}


@pytest.mark.parametrize("pattern", ["AF", "MMAF"], ids=["transformer", "hybrid"])
def test_byte_backbones_learn(tmp_path, pattern):
    rows = metrics(run(tmp_path, pattern, 30, "--model.layer_pattern", pattern))
    loss = column(rows, "train/loss")
    assert loss[min(loss)] > 4.0 and loss[max(loss)] < 0.6 * loss[min(loss)], loss
    assert column(rows, "train/bpb")[29] == pytest.approx(loss[29] / 0.6931471805599453, rel=1e-5)


def test_bpe_model_learns_and_reports_bits_per_byte(tmp_path):
    from bytelm.checkpoint import load_checkpoint, load_tokenizer
    from bytelm.models.lm import LM

    run_dir = run(tmp_path, "bpe", 30, "--model.layer_pattern", "AF", "--data.tokenizer", "bpe",
                  "--data.bpe_vocab_size", "300", "--data.seq_len", "12")
    rows = metrics(run_dir)
    loss = column(rows, "train/loss")
    assert loss[min(loss)] > 5.0 and loss[max(loss)] < 0.6 * loss[min(loss)], loss

    # FLOPs: per byte once, cumulative per optimizer step, both from the formula.
    cfg, model, ckpt = load_checkpoint(run_dir)
    assert isinstance(model, LM) and cfg.model.vocab_size == 300
    per_step = 3 * model.flops_per_token(12) * 12 * 8
    assert column(rows, "train/flops")[29] == pytest.approx(30 * per_step)
    meta = json.loads((tmp_path / "prepared" / "bpe-300" / "meta.json").read_text())
    bytes_per_token = meta["splits"]["train"]["bytes_per_token"]
    assert column(rows, "train/flops_per_byte")[0] == pytest.approx(
        3 * model.flops_per_token(12) / bytes_per_token)

    # Validation is in bits per byte (about val_bytes of text), plus per-token perplexity.
    val = [r for r in rows if "val/bpb" in r][-1]
    assert 1500 < val["val/bytes"] <= 2048 and val["val/tokens"] < val["val/bytes"] / 2
    assert val["val/bpb"] == pytest.approx(val["val/loss"] * val["val/tokens"]
                                           / (val["val/bytes"] * 0.6931471805599453), rel=1e-5)
    assert val["val/token_ppl"] == pytest.approx(2.718281828459045 ** val["val/loss"], rel=1e-4)

    # The tokenizer travels in the checkpoint: it works with the prepared data gone.
    import shutil

    shutil.rmtree(tmp_path / "prepared")
    tok = load_tokenizer(cfg, run_dir / "checkpoints" / "last.ckpt")
    assert load_tokenizer(cfg, ckpt).to_json() == tok.to_json()
    ids = tok.encode("The quick brown fox")
    assert tok.decode(ids) == "The quick brown fox" and len(ids) < 10
    with torch.no_grad():
        assert model(torch.tensor([ids])).shape == (1, len(ids), 304)
