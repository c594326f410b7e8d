"""End to end through train.py on a tiny local corpus: loss falls, outputs land in the run
directory, resume continues exactly, and user mistakes are one-line errors."""

import csv
import math
from pathlib import Path

import pytest
import torch

import train

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n"
        + "Pack my box with five dozen liquor jugs. " * 40 + "\n") * 6


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def tiny_args(tmp_path, corpus, name, steps, *extra):
    return ["--data", str(corpus), "--name", name,
            "--train.out_dir", str(tmp_path / "runs"),
            "--data.prepared_dir", str(tmp_path / "prepared"),
            "--data.seq_len", "32", "--data.batch_size", "8", "--data.val_bytes", "2048",
            "--model.d_model", "32", "--model.n_layer", "2", "--model.d_state", "4",
            "--optim.lr", "1e-2", "--optim.warmup_steps", "5",
            "--train.eval_every", "10", "--train.ckpt_every", "10", "--train.sample_bytes", "16",
            "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            *extra]


def read_metric(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


def test_training_loss_falls_and_run_dir_is_complete(tmp_path, corpus, capsys):
    assert train.main(tiny_args(tmp_path, corpus, "smoke", 60)) == 0
    run = tmp_path / "runs" / "smoke"
    loss = read_metric(run, "train/loss")
    first, last = loss[min(loss)], loss[max(loss)]
    assert first > 4.0 and last < 0.6 * first, loss
    val = read_metric(run, "val/bpb")
    assert max(val) == 59 and val[59] < 0.6 * val[min(val)]
    assert (run / "config.yaml").is_file() and (run / "samples.txt").read_text().strip()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "checkpoints" / "step0000060.ckpt").is_file()
    out = capsys.readouterr().out
    assert "bits per byte" in out and "sample:" in out


def test_resume_continues_exactly(tmp_path, corpus):
    schedule = ["--optim.decay_steps", "20"]
    assert train.main(tiny_args(tmp_path, corpus, "whole", 20, *schedule)) == 0
    assert train.main(tiny_args(tmp_path, corpus, "split", 10, *schedule)) == 0
    run = tmp_path / "runs" / "split"
    assert train.main(["--resume", str(run), "--trainer.max_steps", "20"]) == 0
    whole = read_metric(tmp_path / "runs" / "whole", "train/loss")
    split = read_metric(run, "train/loss")
    assert sorted(split) == sorted(whole)  # no step logged twice or missing
    for step in whole:
        assert split[step] == whole[step], step  # bitwise on CPU
    a = torch.load(tmp_path / "runs" / "whole" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 20
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_existing_run_dir_is_not_clobbered(tmp_path, corpus, capsys):
    assert train.main(tiny_args(tmp_path, corpus, "once", 2)) == 0
    assert train.main(tiny_args(tmp_path, corpus, "once", 2)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train.main(tiny_args(tmp_path, corpus, "once", 2, "--overwrite")) == 0


@pytest.mark.parametrize("extra, message", [
    (["--model.d_modle", "3"], "unknown config key 'model.d_modle'"),
    (["--data", "/no/such/corpus.txt"], "/no/such/corpus.txt"),
    (["--config", "/no/such.yaml"], "config file not found"),
])
def test_bad_input_is_a_one_line_error(tmp_path, corpus, capsys, extra, message):
    args = tiny_args(tmp_path, corpus, "bad", 2) + extra
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_help_documents_options(capsys):
    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--model.d_model" in out and "--trainer.KEY" in out and "--resume" in out


def test_lr_schedule_warmup_then_cosine():
    from bytelm.training.lm_module import lr_lambda

    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_biases_A_and_D():
    from bytelm.models.mamba_lm import MambaConfig, MambaLM
    from bytelm.training.lm_module import param_groups

    model = MambaLM(MambaConfig(d_model=16, n_layer=1, d_state=4))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]}
    assert no_decay_names == {"weight", "bias", "A_log", "D"}  # weight: the RMSNorm gains
    assert all(p.ndim == 2 or names[id(p)].endswith("conv1d.weight") for p in decay["params"])


def test_checkpoint_loads_without_lightning(tmp_path, corpus):
    from bytelm.checkpoint import CheckpointError, load_checkpoint

    assert train.main(tiny_args(tmp_path, corpus, "ck", 3)) == 0
    run = tmp_path / "runs" / "ck"
    cfg, model, raw = load_checkpoint(run)
    assert cfg.model.d_model == 32 and raw["global_step"] == 3
    logits = model(torch.randint(0, 256, (1, 8)))
    assert logits.shape == (1, 8, 264)
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*broken.ckpt"):
        load_checkpoint(tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing")
