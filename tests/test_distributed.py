"""Several processes on CPU (gloo): a 2-rank DDP run (torchrun) and a 2-rank FSDP run (Lightning's
launcher) train exactly what one process with the whole global batch trains, within fp32
tolerance; a NaN on one rank makes every rank skip that step; an FSDP checkpoint resumes under
FSDP and then in one process; ranks draw disjoint windows; --resume auto; one-line errors; the
launch scripts."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import train
from bytelm.checkpoint import load_checkpoint
from bytelm.config import DataConfig
from bytelm.training.checkpointing import verify_checkpoint
from bytelm.training.datamodule import IGNORE, ByteDataModule, EvalWindows
from bytelm.training.distributed import cluster_plugins

REPO = Path(train.__file__).resolve().parent
LAUNCH = [sys.executable, str(REPO / "tests" / "launch_train.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
PER_RANK, STEPS, NAN_STEP = 2, 8, 1  # windows per micro-batch on each of 2 ranks; steps
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "BYTELM_TEST_NAN_STEP": str(NAN_STEP)}  # see launch_train.py


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    words = "the of and to in is was for on that with as by at from his her it an be".split()
    rng = np.random.default_rng(0)
    text = " ".join(rng.choice(words, 3000))
    (root / "corpus.txt").write_text("\n".join(text[i:i + 70] for i in range(0, len(text), 70)))
    return root


def run_args(root: Path, name: str, steps: int, batch_size: int, *extra) -> list[str]:
    return ["--data", str(root / "corpus.txt"), "--name", name,
            "--train.out_dir", str(root / "runs"), "--data.prepared_dir", str(root / "prepared"),
            "--data.seq_len", "16", "--data.batch_size", str(batch_size),
            "--data.val_bytes", "272",  # 17 windows: ranks hold unequal shares
            "--model.d_model", "16", "--model.n_layer", "1", "--model.layer_pattern", "MA",
            "--model.n_head", "2", "--model.d_state", "4",
            "--optim.lr", "1e-2", "--optim.warmup_steps", "2", "--optim.decay_steps", str(STEPS),
            "--train.eval_every", "3", "--train.ckpt_every", "2", "--train.sample_bytes", "8",
            "--trainer.max_steps", str(steps), "--trainer.accumulate_grad_batches", "2",
            "--trainer.gradient_clip_val", "1.0", "--trainer.accelerator", "cpu",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]


def launch(command: list[str]) -> str:
    proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def logged(run: Path, key: str) -> dict[int, float]:
    with open(run / "logs" / "metrics.csv") as f:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(f) if row.get(key)}


def samples(run: Path) -> dict[int, str]:
    """samples.txt by step."""
    blocks = (run / "samples.txt").read_text().split("=== step ")[1:]
    return {int(block.split(" ", 1)[0]): block.split("\n", 1)[1] for block in blocks}


def final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """One process drawing both ranks' windows: batch 2 x PER_RANK."""
    launch(LAUNCH + run_args(root, "one", STEPS, 2 * PER_RANK))
    return root / "runs" / "one"


def assert_same_training(expected: Path, actual: Path, steps=range(STEPS)):
    for key in ("train/loss", "train/grad_norm", "train/lr"):
        a, b = logged(expected, key), logged(actual, key)
        assert all(s in a and s in b for s in steps), (key, sorted(a), sorted(b))
        for s in steps:  # step NAN_STEP: a NaN loss, no update (and no gradient to log)
            if key != "train/grad_norm" or s != NAN_STEP:
                assert b[s] == pytest.approx(a[s], rel=1e-4, nan_ok=True), (key, s)
    for run in (expected, actual):
        assert logged(run, "train/skipped_steps")[STEPS - 1] == 1.0
    final_bpb = logged(expected, "val/bpb")[STEPS - 1]
    assert logged(actual, "val/bpb")[STEPS - 1] == pytest.approx(final_bpb, rel=1e-4)
    a, b = final_state(expected), final_state(actual)
    assert a["global_step"] == b["global_step"] == STEPS
    for ckpt in (actual / "checkpoints").glob("step*.ckpt"):  # through our atomic writer
        assert verify_checkpoint(ckpt)["sha256"]
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for i, state in a["optimizer_states"][0]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b["optimizer_states"][0]["state"][i][moment], state[moment],
                                       rtol=1e-3, atol=1e-6)


def test_ddp_two_ranks_train_what_one_process_trains(root, reference):
    """Launched by torchrun, which starts both ranks at once: they prepare the corpus together."""
    args = run_args(root, "ddp", STEPS, PER_RANK, "--trainer.devices", "2",
                    "--trainer.strategy", "ddp", "--data.prepared_dir", str(root / "prepared-ddp"))
    out = launch(TORCHRUN + [str(REPO / "tests" / "launch_train.py")] + args)
    assert "global batch: 2 windows x 2 accumulated x 2 devices = 8 windows of 16 = 128 bytes" in out
    run = root / "runs" / "ddp"
    assert_same_training(reference, run)
    for metrics in (run, reference):
        assert logged(metrics, "train/global_batch_size") == {0: 8}
    assert logged(run, "train/global_batch_bytes") == {0: 128}
    assert samples(run) == samples(reference)


def test_fsdp_checkpoint_resumes_under_fsdp_and_then_in_one_process(root, reference):
    fsdp = ["--trainer.devices", "2", "--trainer.strategy", "fsdp"]
    out = launch(LAUNCH + run_args(root, "fsdp", 4, PER_RANK, *fsdp))
    assert "FSDP units: 3" in out  # one per block and the root
    run = root / "runs" / "fsdp"
    groups = torch.load(run / "checkpoints" / "step0000004.ckpt",
                        weights_only=False)["optimizer_states"][0]["param_groups"]
    expected = final_state(reference)["optimizer_states"][0]["param_groups"]
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in expected] == [8, 7]
    cfg, model, _ = load_checkpoint(run / "checkpoints" / "step0000004.ckpt")  # a plain model
    assert model.layers[0].mixer.in_proj.weight.shape == (64, 16)

    launch(LAUNCH + ["--resume", str(run), "--trainer.max_steps", "6", *fsdp])
    one_process = ["--trainer.devices", "1", "--trainer.strategy", "auto",
                   "--data.batch_size", str(2 * PER_RANK)]  # the same global batch
    launch(LAUNCH + ["--resume", str(run), "--trainer.max_steps", str(STEPS), *one_process])
    assert_same_training(reference, run)
    for step in (3, 6):  # sampled under FSDP, from the model gathered on rank 0
        assert samples(run)[step] == samples(reference)[step]


def running(pid: int) -> bool:
    """Not exited (an exited process nobody has reaped yet is a zombie: state Z)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_preemption_signal_to_one_rank_stops_every_rank_after_one_checkpoint(root):
    """Lightning's launcher: this process is rank 0 and starts rank 1; only rank 0 is signalled."""
    run = root / "runs" / "preempted"
    args = run_args(root, "preempted", 500, PER_RANK, "--trainer.devices", "2",
                    "--trainer.strategy", "ddp", "--train.eval_every", "100")
    with open(root / "preempted.log", "w") as log:
        rank0 = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                                 env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not list((run / "checkpoints").glob("step*.ckpt.json")) and time.monotonic() < deadline:
        assert rank0.poll() is None, (root / "preempted.log").read_text()[-3000:]
        time.sleep(0.05)
    rank1 = [int(pid) for pid in  # started by Lightning's launcher, in rank 0
             Path(f"/proc/{rank0.pid}/task/{rank0.pid}/children").read_text().split()]
    rank0.send_signal(signal.SIGUSR1)
    try:
        assert rank0.wait(timeout=60) == 128 + signal.SIGUSR1
    finally:
        for pid in [rank0.pid] * (rank0.poll() is None) + rank1:
            deadline = time.monotonic() + 30
            while running(pid) and time.monotonic() < deadline:
                time.sleep(0.1)  # rank 1 stops by itself: it agreed on the step
            if running(pid):
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"process {pid} still running after the preemption")
    out = (root / "preempted.log").read_text()
    step = verify_checkpoint(run / "checkpoints" / "last.ckpt")["step"]
    assert out.count(f"preempted by SIGUSR1 at step {step}: saved") == 2  # both ranks
    assert step == max(logged(run, "train/loss")) + 1  # stopped at the step it saved


def test_ranks_draw_disjoint_windows_that_make_up_the_global_batch(root, reference):
    def first_batch(rank: int, world: int, batch_size: int) -> np.ndarray:
        dm = ByteDataModule(DataConfig(seq_len=16, batch_size=batch_size), seed=5,
                            prepared_dir=str(root / "prepared"))
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=3,
                                     accumulate_grad_batches=2)
        dm.setup()
        return next(iter(dm.train_dataloader())).numpy()

    ranks = [first_batch(r, 2, PER_RANK) for r in range(2)]
    whole = first_batch(0, 1, 2 * PER_RANK)
    assert np.array_equal(np.concatenate(ranks), whole)
    assert not {r.tobytes() for r in ranks[0]} & {r.tobytes() for r in ranks[1]}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_validates_as_many_batches_and_all_windows_once(root, reference, world):
    from bytelm.data.dataset import PreparedCorpus, iter_eval_windows

    corpus = PreparedCorpus(root / "prepared")
    per_rank = [list(EvalWindows(corpus, 16, 4, 272, rank, world)) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # a forward each, in step
    scored = sorted((tuple(w[t != IGNORE].tolist()), tuple(t[t != IGNORE].tolist()))
                    for batches in per_rank for ids, targets in batches
                    for w, t in zip(ids[:, :-1], targets))
    expected = sorted((tuple(w[:-1].tolist()), tuple(w[1:].tolist()))
                      for w in iter_eval_windows(corpus, "val", 16, max_bytes=272))
    assert [s for s in scored if s[1]] == expected  # rows with no target are padding


def test_resume_auto_starts_continues_and_restarts_a_run_without_checkpoints(root, reference,
                                                                             capsys):
    args = run_args(root, "auto", 2, 2, "--resume", "auto", "--train.sample_bytes", "0")
    assert train.main(args) == 0
    assert "no checkpoint" in capsys.readouterr().out
    run = root / "runs" / "auto"
    edited = root / "edited.yaml"  # the config file changed between two starts of the job
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    edited.write_text(yaml.safe_dump({**default, "seed": 7}))
    assert train.main(args + ["--config", str(edited), "--trainer.max_steps", "4"]) == 0
    assert "seed differs in the config given and is not applied" in capsys.readouterr().err
    assert final_state(run)["global_step"] == 4 and max(logged(run, "train/loss")) == 3
    for path in (run / "checkpoints").iterdir():  # as if preempted before its first checkpoint
        path.unlink()
    assert train.main(args) == 0 and final_state(run)["global_step"] == 2
    assert min(logged(run, "train/loss")) == 0 and max(logged(run, "train/loss")) == 1
    assert train.main(args + ["--overwrite"]) == 2
    assert "pass one of them" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--trainer.strategy", "fdsp"], "'fdsp' is not one train.py runs (auto, single_device, ddp, "
                                     "fsdp); did you mean fsdp?"),
    (["--trainer.strategy", "deepspeed"], "'deepspeed' is not one train.py runs"),
    (["--trainer.strategy", "ddp_spawn"], "train.py starts one process per device itself"),
    (["--trainer.strategy", "fsdp"], "requires a GPU accelerator"),  # Lightning's FSDP, on CPU
])
def test_strategy_mistakes_are_one_line(root, reference, capsys, extra, message):
    assert train.main(run_args(root, "bad", 2, 2, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (root / "runs" / "bad").exists()


def test_under_slurm_lightning_does_not_requeue_itself(monkeypatch):
    assert cluster_plugins() == []
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    (slurm,) = cluster_plugins()
    assert slurm.auto_requeue is False  # ours checkpoint and exit 128+N; the sbatch requeues


@pytest.mark.parametrize("status, requeued", [(0, False), (2, False), (138, True), (143, True)])
def test_sbatch_requeues_a_preempted_job(tmp_path, status, requeued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/srun.args\nexit {status}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/scontrol.args\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_RESTART_COUNT": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm.sbatch"), "--config", "c.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == status
    srun = (tmp_path / "srun.args").read_text()
    assert "train.py --resume auto --trainer.devices 4 --trainer.num_nodes 2 --config c.yaml" in srun
    assert (tmp_path / "scontrol.args").exists() == requeued
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "42"]


def test_torchrun_script_starts_a_rank_per_gpu_on_each_node(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\n")
    fake_python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake_python), "NPROC_PER_NODE": "4", "NNODES": "2",
           "NODE_RANK": "1", "MASTER_ADDR": "node0"}
    subprocess.run([str(REPO / "scripts" / "torchrun.sh"), "--resume", "auto"], env=env, check=True,
                   timeout=30)
    assert (tmp_path / "args").read_text().split() == [
        "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "4", "--node-rank", "1",
        "--master-addr", "node0", "--master-port", "29500", "train.py", "--trainer.devices", "4",
        "--trainer.num_nodes", "2", "--resume", "auto"]


@pytest.fixture
def lightning_ddp_entry():
    """Lightning's registry entry for "ddp", put back after the test (make_strategy replaces it;
    monkeypatch.setitem cannot save it: the registry's get() builds a strategy)."""
    from lightning.pytorch.strategies import StrategyRegistry

    entry = dict.__getitem__(StrategyRegistry, "ddp")
    yield entry
    dict.__setitem__(StrategyRegistry, "ddp", entry)


@pytest.mark.parametrize("strategy", ["ddp", "auto"])
def test_ddp_over_several_devices_runs_our_ddp_strategy(strategy, lightning_ddp_entry):  # noqa: ARG001
    """`ddp`, and `auto` over two devices (Lightning picks DDP by name), build DistributedDataParallel
    on the current stream with gradients as bucket views, not Lightning's side-stream DDP."""
    import lightning as L

    from bytelm.training.distributed import CurrentStreamDDPStrategy, make_strategy


    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=make_strategy(strategy),
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert type(trainer.strategy) is CurrentStreamDDPStrategy
    assert trainer.strategy._ddp_kwargs == {"gradient_as_bucket_view": True}


def clip_target(grad_scale: float, scaler=None, sharded_clip=None):
    """A module stand-in for distributed.clip_gradients: one parameter whose gradient has norm
    5 * grad_scale, a trainer whose precision plugin has `scaler`, and Lightning's clip_gradients
    replaced by a recorder."""
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0]) * grad_scale
    calls = []
    module = SimpleNamespace(
        trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), strategy=None),
        clip_gradients=lambda *args: calls.append(args))
    return module, torch.optim.SGD([param], lr=0.1), param, calls


def test_clipping_without_a_grad_scaler_is_ours_and_exact():
    """bf16-mixed (no scaler) with a fused AdamW: Lightning would refuse to clip, so gradients are
    clipped here, over the optimizer's parameters, exactly as torch's clip_grad_norm_ /
    clip_grad_value_ do; clip_val <= 0 clips nothing (as in Lightning)."""
    from bytelm.training.distributed import clip_gradients

    module, optimizer, param, calls = clip_target(grad_scale=2.0)  # norm 10
    clip_gradients(module, optimizer, 1.0, "norm")
    torch.testing.assert_close(param.grad, torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0)
    module, optimizer, param, calls = clip_target(grad_scale=0.1)  # norm 0.5: untouched
    clip_gradients(module, optimizer, 1.0, None)
    torch.testing.assert_close(param.grad, torch.tensor([0.3, 0.4]))
    module, optimizer, param, calls = clip_target(grad_scale=2.0)
    clip_gradients(module, optimizer, 7.0, "value")
    torch.testing.assert_close(param.grad, torch.tensor([6.0, 7.0]))
    for clip_val in (0.0, -1.0, None):
        module, optimizer, param, calls = clip_target(grad_scale=2.0)
        clip_gradients(module, optimizer, clip_val, "norm")
        torch.testing.assert_close(param.grad, torch.tensor([6.0, 8.0]))
    assert calls == []


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fp16_clipping_is_lightnings(algorithm):
    """With a grad scaler Lightning clips (it unscales the gradients first)."""
    from bytelm.training.distributed import clip_gradients

    module, optimizer, param, calls = clip_target(grad_scale=2.0, scaler=object())
    clip_gradients(module, optimizer, 1.0, algorithm)
    assert calls == [(optimizer, 1.0, algorithm)]
    torch.testing.assert_close(param.grad, torch.tensor([6.0, 8.0]))  # not clipped here


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fused_adamw_trains_with_clipping_under_bf16_mixed(tmp_path, algorithm):
    """A real Lightning loop: bf16-mixed, fused AdamW and clipping by norm or by value (Lightning
    alone refuses both with a fused optimizer). On the CPU here; CUDA makes the same choice."""
    import lightning as L

    from bytelm.config import ModelConfig, OptimConfig
    from bytelm.training.lm_module import LMTask

    torch.manual_seed(0)
    task = LMTask(ModelConfig(d_model=8, n_layer=1, d_state=2), OptimConfig(fused=True), seq_len=8)
    class Windows(L.LightningDataModule):
        cfg = SimpleNamespace(batch_size=2)  # what LMTask reads (its FLOPs per batch)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randint(0, 256, (4, 9)), batch_size=2)

    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2,
                        gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=Windows())
    assert trainer.optimizers[0].defaults["fused"]
    assert any(not torch.equal(before[k], v) for k, v in task.model.state_dict().items())


@pytest.mark.parametrize("fused, precision_scaler, clip, expected", [
    (None, None, 1.0, True),  # bf16-mixed with clipping: fused, clipped by clip_gradients
    (None, object(), 1.0, False),  # fp16 scaler with clipping: Lightning must unscale first
    (None, object(), 0.0, True),  # fp16 without clipping
    (False, None, 1.0, False),  # asked for
])
def test_adamw_is_fused_on_cuda_unless_an_fp16_scaler_clips(monkeypatch, fused, precision_scaler,
                                                           clip, expected):
    from bytelm.config import ModelConfig, OptimConfig
    from bytelm.training.lm_module import LMTask

    task = LMTask(ModelConfig(d_model=8, n_layer=1, d_state=2), OptimConfig(fused=fused), seq_len=8)
    trainer = SimpleNamespace(gradient_clip_val=clip, max_steps=10,
                              precision_plugin=SimpleNamespace(scaler=precision_scaler))
    monkeypatch.setattr(LMTask, "trainer", property(lambda self: trainer))
    monkeypatch.setattr(LMTask, "device", property(lambda self: torch.device("cuda")))
    built = {}
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: built.update(kw) or
                        torch.optim.SGD(params, lr=kw["lr"]))
    task.configure_optimizers()
    assert bool(built["fused"]) == expected


def test_fused_adamw_refused_where_an_fp16_scaler_clips(monkeypatch):
    from bytelm.config import ConfigError, ModelConfig, OptimConfig
    from bytelm.training.lm_module import LMTask

    task = LMTask(ModelConfig(d_model=8, n_layer=1, d_state=2), OptimConfig(fused=True), seq_len=8)
    trainer = SimpleNamespace(gradient_clip_val=1.0, max_steps=10,
                              precision_plugin=SimpleNamespace(scaler=object()))
    monkeypatch.setattr(LMTask, "trainer", property(lambda self: trainer))
    with pytest.raises(ConfigError, match="optim.fused true: fp16 gradients must be unscaled"):
        task.configure_optimizers()


def test_lightning_still_has_the_per_batch_sigterm_broadcast_we_turn_off():
    """StepCheckpoints replaces this method of the training epoch loop (over several ranks it
    reads a GPU value at every batch start); a Lightning that renamed it would run it again."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None))

