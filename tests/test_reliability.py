"""Bad input is one line on stderr, exit status 2, and overwrites nothing; checkpoints say which
file is damaged and why; metrics.csv survives torn writes and resumes."""

import errno
import gzip
import json
import os
from pathlib import Path

import pytest
import torch

import train
from bytelm.checkpoint import CheckpointError, load_checkpoint
from bytelm.training.checkpointing import (AtomicCheckpointIO, find_resume_checkpoint,
                                           manifest_path, verify_checkpoint)
from bytelm.training.csv_log import make_csv_logger

TEXT = "Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump!\n" * 40


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def args(tmp_path: Path, name: str, data, *extra) -> list[str]:
    return ["--data", str(data), "--name", name, "--train.out_dir", str(tmp_path / "runs"),
            "--data.prepared_dir", str(tmp_path / "prepared" / name),
            "--data.seq_len", "16", "--data.batch_size", "2", "--data.val_bytes", "64",
            "--model.d_model", "16", "--model.n_layer", "1", "--model.d_state", "4",
            "--train.eval_every", "2", "--train.ckpt_every", "2", "--train.sample_bytes", "0",
            "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]


def one_line_error(capsys, argv) -> str:
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def bad_sources(tmp_path) -> dict[str, Path]:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "broken.txt.gz").write_bytes(b"this is not gzip")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cat.png").write_bytes(b"\x89PNG")
    (tmp_path / "short.txt").write_text("only a few bytes")
    return {name: tmp_path / file for name, file in [
        ("empty", "empty.txt"), ("unreadable", "broken.txt.gz"), ("no text", "images"),
        ("short", "short.txt")]}


@pytest.mark.parametrize("source, message", [
    ("empty", "is empty"),
    ("unreadable", "cannot read"),
    ("no text", "no text files"),
    ("short", "fewer than one window of seq_len+1=17"),
])
def test_bad_corpus_is_one_line_and_creates_no_run(tmp_path, capsys, bad_sources, source, message):
    assert message in one_line_error(capsys, args(tmp_path, "bad", bad_sources[source]))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, message", [
    (["--data.seq_len", "abc"], "data.seq_len: expected an integer, got 'abc'"),
    (["--train.on_nonfinite", "retry"], "train.on_nonfinite must be skip or stop, got 'retry'"),
    (["--train.max_skips", "0"], "train.max_skips must be positive, got 0"),
    (["--trainer.max_stepz", "3"], "unknown config key 'trainer.max_stepz'"),
])
def test_bad_options_are_one_line(tmp_path, capsys, corpus, extra, message):
    assert message in one_line_error(capsys, args(tmp_path, "bad", corpus, *extra))


def test_bad_config_file_is_one_line(tmp_path, capsys, corpus):
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  seqlen: 64\n")
    err = one_line_error(capsys, args(tmp_path, "bad", corpus, "--config", str(config)))
    assert "unknown config key 'data.seqlen' (did you mean data.seq_len?)" in err
    config.write_text("optim:\n  lr: fast\n")
    assert "optim.lr: expected a number, got 'fast'" in one_line_error(
        capsys, args(tmp_path, "bad", corpus, "--config", str(config)))


def test_existing_runs_and_other_directories_are_never_overwritten(tmp_path, capsys, corpus,
                                                                   bad_sources):
    assert train.main(args(tmp_path, "kept", corpus)) == 0
    run = tmp_path / "runs" / "kept"
    before = snapshot(run)
    capsys.readouterr()

    assert "already holds a run" in one_line_error(capsys, args(tmp_path, "kept", corpus))
    # --overwrite only replaces the run once everything else checked out
    assert "is empty" in one_line_error(
        capsys, args(tmp_path, "kept", bad_sources["empty"], "--overwrite"))
    # resuming with another architecture, or with contradictory flags
    err = one_line_error(capsys, ["--resume", str(run), "--model.d_model", "32"])
    assert err == (f"error: model.d_model is 32 but {run / 'checkpoints' / 'step0000002.ckpt'} "
                   f"was trained with 16; a resumed run keeps its architecture (drop the override, "
                   f"or start a new run with --name)")
    assert "--overwrite would delete it" in one_line_error(
        capsys, ["--resume", str(run), "--overwrite"])
    assert "continues the run named 'kept'" in one_line_error(
        capsys, ["--resume", str(run), "--name", "other"])
    assert snapshot(run) == before  # config.yaml, checkpoints and logs all untouched

    stranger = tmp_path / "runs" / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("not a run")
    for extra in ([], ["--overwrite"]):
        assert "is not a run directory" in one_line_error(
            capsys, args(tmp_path, "stranger", corpus, *extra))
    assert (stranger / "notes.txt").read_text() == "not a run"


def test_resuming_with_another_split_warns(tmp_path, capsys, corpus):
    assert train.main(args(tmp_path, "split", corpus)) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "split"
    assert train.main(["--resume", str(run), "--trainer.max_steps", "3",
                       "--data.val_fraction", "0.3"]) == 0
    assert "data.val_fraction is 0.3 but" in capsys.readouterr().err


def test_resume_needs_an_intact_checkpoint(tmp_path, capsys, corpus):
    assert "no config.yaml there" in one_line_error(capsys, ["--resume", str(tmp_path / "none")])
    assert train.main(args(tmp_path, "run", corpus)) == 0
    ckpts = tmp_path / "runs" / "run" / "checkpoints"
    capsys.readouterr()
    assert load_checkpoint(ckpts.parent)[0].name == "run"
    (ckpts / "step0000002.ckpt").write_bytes(b"garbage")  # last.ckpt is the same file
    with pytest.raises(CheckpointError, match="has 7 bytes but its manifest says"):
        load_checkpoint(ckpts.parent)  # evaluation refuses it too
    err = one_line_error(capsys, ["--resume", str(ckpts.parent)])
    assert err.startswith(f"error: no usable checkpoint in {ckpts}: checkpoint "
                          f"{ckpts / 'step0000002.ckpt'} has 7 bytes but its manifest says")
    for path in ckpts.iterdir():
        path.unlink()
    assert "to resume from (the run ended before its first one)" in one_line_error(
        capsys, ["--resume", str(ckpts.parent)])


def test_incompatible_weights_are_named(tmp_path, capsys, corpus):
    """A checkpoint whose tensors do not fit, even though its config says they should."""
    assert train.main(args(tmp_path, "run", corpus)) == 0
    ckpt = tmp_path / "runs" / "run" / "checkpoints" / "step0000002.ckpt"
    state = torch.load(ckpt, weights_only=False)
    name = next(iter(state["state_dict"]))
    state["state_dict"][name] = torch.zeros(3)
    AtomicCheckpointIO().save_checkpoint(state, ckpt)
    capsys.readouterr()
    err = one_line_error(capsys, ["--resume", str(ckpt.parents[1])])
    assert err.startswith(f"error: {ckpt} does not fit this model: {name} is (3,) there and ")


# ---- checkpoint files -------------------------------------------------------------------------

def test_checkpoint_write_is_atomic_with_a_manifest(tmp_path):
    path = tmp_path / "step0000005.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "global_step": 5,
                        "bytelm_manifest": {"step": 5, "run_id": "x"}}, path)
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["step"] == 5 and manifest["run_id"] == "x"
    assert manifest["bytes"] == path.stat().st_size and len(manifest["sha256"]) == 64
    assert verify_checkpoint(path) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".json"]

    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle this")

    with pytest.raises(TypeError):  # not an OSError: raised as it is, the old file kept
        io.save_checkpoint({"state_dict": {}, "bad": Unpicklable()}, path)
    assert verify_checkpoint(path) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".json"]


def test_damaged_checkpoints_name_the_file_and_the_reason(tmp_path):
    path = tmp_path / "step0000001.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(100)}}, path)
    manifest_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"cannot read the manifest {path}.json: "
                                              f"JSONDecodeError"):
        verify_checkpoint(path)
    manifest_path(path).unlink()  # a checkpoint from before manifests: it must at least load
    assert verify_checkpoint(path)["step"] is None
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"^cannot read checkpoint {path}: "):
        verify_checkpoint(path)


def test_resume_picks_the_newest_intact_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    for step in (2, 4, 10):
        io.save_checkpoint({"state_dict": {}, "bytelm_manifest": {"step": step}},
                           tmp_path / f"step{step:07d}.ckpt")
    (tmp_path / ".step0000012.ckpt.tmp-99").write_bytes(b"half a checkpoint")  # a killed save
    (tmp_path / "step0000010.ckpt").write_bytes(b"x")
    path, manifest, skipped = find_resume_checkpoint(tmp_path)
    assert path.name == "step0000004.ckpt" and manifest["step"] == 4
    assert len(skipped) == 1 and "step0000010.ckpt has 1 bytes" in skipped[0]


# ---- metrics.csv ----------------------------------------------------------------------------

def test_metrics_csv_resumes_without_duplicates_and_drops_torn_rows(tmp_path):
    logger = make_csv_logger(tmp_path)
    for step in range(6):
        logger.log_metrics({"loss": step / 10}, step=step)
    logger.log_metrics({"loss": 0.9, "val": 1.5}, step=6)  # a new column: a rewrite
    logger.save()
    path = tmp_path / "logs" / "metrics.csv"
    with open(path, "a") as f:
        f.write("0.7,3")  # torn by a kill: no newline, and a wrong-looking step
    logger = make_csv_logger(tmp_path, resume_step=4)
    # already on disk: a kill before the resumed run's first flush must not lose the history
    kept = ["loss,step,val", "0.0,0,", "0.1,1,", "0.2,2,", "0.3,3,"]
    assert path.read_text().splitlines() == kept
    logger.log_metrics({"loss": 0.44}, step=4)
    logger.save()
    assert path.read_text().splitlines() == kept + ["0.44,4,"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file


def test_metrics_csv_of_a_fresh_run_starts_empty(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("loss,step\n1.0,0\n")
    logger = make_csv_logger(tmp_path)
    logger.log_metrics({"loss": 2.0}, step=0)
    logger.save()
    assert (tmp_path / "logs" / "metrics.csv").read_text().splitlines() == ["loss,step", "2.0,0"]


def test_gzip_corpus_round_trips_through_training(tmp_path, capsys):
    """The happy path of a compressed corpus, so the unreadable-gzip error above means something."""
    data = tmp_path / "ok.txt.gz"
    data.write_bytes(gzip.compress(TEXT.encode()))
    assert train.main(args(tmp_path, "gz", data)) == 0
    assert os.path.isfile(tmp_path / "runs" / "gz" / "checkpoints" / "last.ckpt")


def test_disk_full_anywhere_is_one_line(tmp_path, capsys, corpus, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "runs" / "x"))

    monkeypatch.setattr(train, "train", full)
    assert one_line_error(capsys, args(tmp_path, "x", corpus)) == (
        f"error: No space left on device while writing {tmp_path / 'runs' / 'x'}; the last "
        f"checkpoint is intact: free some space and --resume")


def test_wandb_offline_run_resumes_under_the_same_id(tmp_path, corpus, monkeypatch):
    import wandb
    from lightning.pytorch import loggers

    ids = []

    class Recording(loggers.WandbLogger):
        def __init__(self, **kwargs):
            ids.append((kwargs["id"], kwargs["resume"]))
            super().__init__(**kwargs)

    monkeypatch.setattr(loggers, "WandbLogger", Recording)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "runs" / "wb"
    assert train.main(args(tmp_path, "wb", corpus, "--train.loggers", "csv,wandb")) == 0
    wandb.finish()
    assert train.main(["--resume", str(run), "--trainer.max_steps", "4"]) == 0
    wandb.finish()
    assert train.main(args(tmp_path, "wb", corpus, "--train.loggers", "csv,wandb",
                           "--overwrite")) == 0
    wandb.finish()
    run_id = ids[0][0]
    assert ids[:2] == [(run_id, "allow")] * 2 and run_id.startswith("wb-")
    assert ids[2][0] != run_id  # a replaced run is a new W&B run, not more history on the old
    assert all(p.name.endswith(run_id) or p.name.endswith(ids[2][0])
               for p in (run / "wandb").glob("offline-run-*"))
