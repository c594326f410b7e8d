"""The benchmark scripts still run (tiny sizes on the CPU); their numbers are not checked here."""

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_generate_benchmark_runs_on_cpu(tmp_path, capsys):
    import generate

    out = tmp_path / "gen.md"
    generate.main(["--size", "tiny", "--device", "cpu", "--prompt-bytes", "16", "--new-bytes", "8",
                   "--batches", "1,2", "--out", str(out)])
    table = out.read_text()
    assert table.count("| Mamba |") == 2 and table.count("| Transformer |") == 2


def test_compare_curves_reports_differences(tmp_path, capsys):
    import compare_curves

    for name, losses in (("a", [3.0, 2.0, 1.5]), ("b", [3.0, 2.1, 1.4])):
        logs = tmp_path / name / "logs"
        logs.mkdir(parents=True)
        rows = "\n".join(f"{s},{v},{s * 0.5}" for s, v in enumerate(losses))
        (logs / "metrics.csv").write_text("step,train/loss,train/time\n" + rows + "\n")
    compare_curves.main([str(tmp_path / "a"), str(tmp_path / "b"), "--every", "1"])
    out = capsys.readouterr().out
    assert "3 common steps: mean |difference| 0.0667, max 0.1000" in out
    assert "0.500 s per optimizer step" in out


def test_compare_curves_keeps_a_range_of_steps_and_skips_a_restart_of_the_clock(tmp_path, capsys):
    """--start/--stop: e.g. the part of a run after a resume, where train/time starts again."""
    import compare_curves

    for name, times in (("a", [0, 1, 2, 3, 4]), ("b", [0, 1, 0.5, 1, 1.5])):  # b resumed at 2
        logs = tmp_path / name / "logs"
        logs.mkdir(parents=True)
        rows = "\n".join(f"{s},{3.0 - s / 10 * (name == 'b')},{t}" for s, t in enumerate(times))
        (logs / "metrics.csv").write_text("step,train/loss,train/time\n" + rows + "\n")
    compare_curves.main([str(tmp_path / "a"), str(tmp_path / "b"), "--every", "1", "--start", "2",
                         "--stop", "4"])
    out = capsys.readouterr().out
    assert "| 3 |" in out and "| 4 |" in out and "| 2 |" not in out and "| 5 |" not in out
    assert "2 common steps: mean |difference| 0.2500, max 0.3000" in out
    assert "b: 0.500 s per optimizer step" in out
    assert compare_curves.seconds_per_step(tmp_path / "b") == 0.5  # 1 -> 0.5 is left out


def test_family_script_trains_evaluates_and_compares(tmp_path):
    """benchmarks/family.sh end to end with tiny models on the CPU: every member trains, is
    evaluated (bpb, probes, robustness) and lands in one comparison table."""
    import argparse
    import inspect
    import os
    import subprocess

    corpus = tmp_path / "english.txt"
    corpus.write_text(inspect.getsource(argparse)[:40000])
    env = dict(os.environ, EXTRA_SEEDS="", MAX_STEPS="1", DEVICE="cpu", PROBES_N="1",
               BPE_VOCAB="300", EXTRA_ARGS="--model.d_model 32 --model.n_layer 1 "
                                           "--model.n_head 2 --data.batch_size 2")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(["bash", str(root / "benchmarks" / "family.sh"), str(corpus),
                             str(tmp_path / "fam")], env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "fam" / "report" / "compare.md").read_text()
    for member in ("byte-mamba", "byte-transformer", "byte-hybrid-3to1", "bpe-transformer",
                   "bpe-mamba"):
        assert f"| {member}-s1337 |" in table
    assert (tmp_path / "fam" / "report" / "bpb_vs_flops.png").stat().st_size > 0


def test_family_script_rejects_an_unknown_member(tmp_path):
    import os
    import subprocess

    corpus = tmp_path / "english.txt"
    corpus.write_text("some text\n")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(["bash", str(root / "benchmarks" / "family.sh"), str(corpus),
                             str(tmp_path / "fam")], env=dict(os.environ, MEMBERS="byte-mambo"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "MEMBERS names byte-mambo" in result.stderr
    assert not (tmp_path / "fam" / "prepared").exists()


def test_throughput_peer_row_wraps_mamba_ssm(monkeypatch):
    """Without mamba_ssm the table says why its row is skipped; with it (a stand-in module
    here) its model is built at our Mamba's shape and its logits and FLOPs are read right."""
    import sys
    import types
    from collections import namedtuple

    import torch

    import throughput

    if "mamba_ssm" not in sys.modules:
        assert "mamba_ssm" in throughput.peer_missing()

    class MambaConfig:
        def __init__(self, d_model, n_layer, vocab_size):
            self.d_model, self.n_layer, self.vocab_size = d_model, n_layer, vocab_size

    class MambaLMHeadModel(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.emb = torch.nn.Embedding(cfg.vocab_size, cfg.d_model)

        def forward(self, ids):
            return namedtuple("Out", "logits")(self.emb(ids) @ self.emb.weight.t())

    config_mod = types.SimpleNamespace(MambaConfig=MambaConfig)
    model_mod = types.SimpleNamespace(MambaLMHeadModel=MambaLMHeadModel)
    monkeypatch.setitem(sys.modules, "mamba_ssm", types.ModuleType("mamba_ssm"))
    monkeypatch.setitem(sys.modules, "mamba_ssm.models", types.ModuleType("mamba_ssm.models"))
    monkeypatch.setitem(sys.modules, "mamba_ssm.models.config_mamba", config_mod)
    monkeypatch.setitem(sys.modules, "mamba_ssm.models.mixer_seq_simple", model_mod)
    assert throughput.peer_missing() is None
    kw = dict(d_model=16, n_layer=2, layer_pattern="M")
    peer = throughput.PeerLM(kw)
    assert peer(torch.randint(0, 256, (2, 5))).shape == (2, 5, 256)
    assert peer.num_params() == 256 * 16
    assert peer.flops_per_token(64) == throughput.LM(throughput.ModelConfig(**kw)).flops_per_token(64)


def test_throughput_telemetry_averages_nvidia_smi_samples(tmp_path, monkeypatch):
    """GpuTelemetry reads nvidia-smi's streamed "clock, power" lines (a stand-in script here),
    skips what is not a sample, and averages them; without nvidia-smi it has no means."""
    import os
    import time

    import throughput

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho \"$*\" > " + str(tmp_path / "args") + "\n"
                    "printf '1980, 500.5\\n[N/A], [N/A]\\n1700, 699.5\\n'\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    start = time.monotonic()
    with throughput.GpuTelemetry("GPU-x") as t:
        assert t.samples  # the first sample is in before the block runs
        while len(t.samples) < 2 and time.monotonic() < start + 10:
            time.sleep(0.01)
    assert t.proc.poll() is not None and time.monotonic() - start < 10  # stopped, not waited out
    assert t.means == (1840.0, 600.0)
    assert "--id=GPU-x" in (tmp_path / "args").read_text()
    assert throughput.telemetry_cells(t.means) == "1840 | 600"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with throughput.GpuTelemetry("0") as t:
        pass
    assert t.means is None and throughput.telemetry_cells(None) == " | "
    assert throughput.gpu_limits("0") == ""


def test_throughput_table_rows_match_its_header():
    """Every row kind (measured, measured without telemetry, OOM) has the header's columns."""
    import throughput

    header = throughput.TABLE_HEADER.splitlines()[0]
    rows = [throughput.table_row("90m", 8, 8192, "Mamba", None),
            throughput.table_row("90m", 8, 8192, "Mamba", dict(
                params=9e7, ms=170.0, bytes_per_s=3.8e5, mfu=0.21, peak_gb=53.6, accum=2,
                clock_watts=(1791.0, 630.0)), base=3.0e5),
            throughput.table_row("90m", 8, 8192, "Mamba", dict(
                params=9e7, ms=170.0, bytes_per_s=3.8e5, mfu=0.21, peak_gb=53.6, accum=1,
                clock_watts=None), base=3.0e5)]
    assert {r.count("|") for r in rows} == {header.count("|")}
    assert "| 1791 | 630 |" in rows[1] and "8 (4 x 2) x 8192" in rows[1]


def test_scan_tune_variants_run(monkeypatch):
    """Every tile shape / cut `scan.py --tune` times launches and agrees with the default
    backward (timing replaced by one call; tiny shapes, in Triton's interpreter on the CPU, on
    the GPU where there is one)."""
    import re

    import torch
    import scan

    monkeypatch.setattr(scan, "bench", lambda fn, rep=200: (fn(), 0.0)[1])
    g = torch.Generator().manual_seed(0)
    b, d, length, n = 1, 8, 11, 16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    x = dict(u=rnd(b, d, length), delta=0.5 * rnd(b, d, length),
             A=-(torch.rand(d, n, generator=g).to(device) * 4 + 0.1),
             B=rnd(b, n, length), C=rnd(b, n, length), D=rnd(d), z=rnd(b, d, length), delta_bias=0.5 * rnd(d))
    lines = scan.tune(x, rnd(b, d, length), n)
    fwd = [ln for ln in lines if ln.lstrip().startswith("fwd")]
    bwd = [ln for ln in lines if ln.lstrip().startswith("bwd")]
    assert any("'NPT': 4" in ln for ln in fwd) and any("'NPT': 2" in ln for ln in bwd)
    errs = [float(re.search(r"max rel diff ([0-9.e+-]+)", ln).group(1)) for ln in bwd]
    assert len(errs) == len(bwd) >= 6 and max(errs) < 1e-5


TRAIN_LOOP_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}


def run_train_loop(tmp_path, *args):
    import os
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "train_loop.py"
    return subprocess.run([sys.executable, str(script), *args], cwd=tmp_path,
                          env={**os.environ, **TRAIN_LOOP_ENV}, capture_output=True, text=True,
                          timeout=300)


def test_train_loop_benchmark_times_bare_and_train_py_on_cpu(tmp_path):
    """benchmarks/train_loop.py end to end with a tiny config: the bare loop, the bare loop with a
    host sync and train.py in a subprocess each get a row of positive step times; the corpus
    path in the config is relative to where the benchmark runs, and train.py (run from its own
    directory) reads the same file. The CPU timings themselves are not checked."""
    import inspect
    import math

    (tmp_path / "corpus.txt").write_text(inspect.getsource(inspect)[:30000])
    (tmp_path / "tiny.yaml").write_text(
        "name: tiny\ndata:\n  source: corpus.txt\n  seq_len: 32\n  batch_size: 2\n"
        "model:\n  d_model: 16\n  n_layer: 1\n")
    out = tmp_path / "loop.md"
    result = run_train_loop(tmp_path, "--config", "tiny.yaml", "--steps", "30", "--warmup", "2",
                            "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    assert table.strip() in result.stdout
    assert "- device: cpu;" in table and "batch x seq_len: 2 x 32" in table
    assert "over 2 intervals of 10 steps" in table
    assert "--config tiny.yaml --steps 30 --warmup 2" in table
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
             if line.startswith("| ") and not line.startswith(("| variant", "| ---")))}
    assert list(rows) == ["bare", "bare+sync", "train.py"]
    for label, (seconds, bytes_per_s, _) in rows.items():
        assert math.isfinite(float(seconds)) and float(seconds) > 0, label
        assert float(bytes_per_s.replace(",", "")) > 0, label
    assert not list(tmp_path.glob("runs")) and not list(tmp_path.glob("data_cache"))


def test_train_loop_benchmark_bad_input_is_a_one_line_error(tmp_path):
    result = run_train_loop(tmp_path, "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: config file not found: "
                                                  f"{tmp_path / 'missing.yaml'}"]
    (tmp_path / "tiny.yaml").write_text("data:\n  seq_len: 32\n")
    result = run_train_loop(tmp_path, "--config", "tiny.yaml", "--data", "missing.txt")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and "missing.txt" in result.stderr


def test_scan_ablate_makes_its_variants(tmp_path, monkeypatch):
    """scan_ablate.py's substitutions still find their targets in the kernels (it exits with
    a one-line message when they drift) and each variant's kernels differ from ours."""
    import scan_ablate

    monkeypatch.setattr(sys, "argv", ["scan_ablate.py", str(tmp_path)])
    scan_ablate.main()
    ours = (Path(scan_ablate.__file__).resolve().parents[1] / scan_ablate.KERNELS).read_text()
    for name in scan_ablate.VARIANTS:
        text = (tmp_path / name / scan_ablate.KERNELS).read_text()
        assert text != ours and (tmp_path / name / "benchmarks" / "scan_configs.py").exists()
    assert scan_ablate.ATOM_B not in (tmp_path / "nors" / scan_ablate.KERNELS).read_text()


def test_scan_host_runs_stubbed():
    """scan_host.py --stub (no kernel launches, CPU tensors) times and counts the op's host
    side for the inference forward and forward + backward (in a subprocess: it swaps the
    module's kernels)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "scan_host.py"
    result = subprocess.run([sys.executable, str(script), "--stub", "--calls", "3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["fwd", "fwd+bwd"]
    fwd_ops, fb_ops = (int(r[r.index("aten") - 1]) for r in rows)
    assert 0 < fwd_ops < fb_ops


def test_transformer_ops_benchmark_runs_on_cpu(tmp_path):
    import transformer_ops

    out = tmp_path / "ops.md"
    rows = transformer_ops.main(["--device", "cpu", "--tokens", "16", "--sizes", "90m",
                                 "--reps", "1", "--out", str(out)])
    assert [r["op"] for r in rows] == ["rope", "swiglu"]
    assert all(r["diff"] < 1e-2 for r in rows)  # fused and reference agree to bf16 rounding
    assert out.read_text().count("| rope |") == 1


def test_ssd_benchmark_runs_on_cpu(tmp_path):
    import ssd

    out = tmp_path / "ssd.md"
    rows = ssd.main(["--device", "cpu", "--shapes", "1x40x2x16x16", "--reps", "1", "--out", str(out)])
    assert len(rows) == 1 and rows[0]["diff"] < 2e-2  # kernels and reference agree to bf16
    assert rows[0]["triton"][1] > 0 and rows[0]["mamba1"][1] > 0
    assert "| 1 x 40 x 2 x 16 x 16 |" in out.read_text()


def test_ssd_sass_compiles_every_kernel_for_sm90():
    """The offline statistics: one row a kernel of a forward + backward (the state pass twice),
    each with registers and instructions. A process of its own: the tests' interpreter mode
    gives kernels that cannot be compiled."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "ssd_sass.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(script), "--shape", "1x40x2x16x16"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [r for r in res.stdout.splitlines() if r.startswith("| _ssd")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["_ssd_chunk_state_kernel", "_ssd_state_pass_kernel", "_ssd_state_pass_kernel (reverse)",
                     "_ssd_chunk_out_kernel", "_ssd_chunk_dstate_kernel", "_ssd_chunk_bwd_kernel"]
    for r in rows:
        regs, stack, shared, instr = (int(v) for v in r.split("|")[2:6])
        assert 0 < regs <= 255 and instr > 0 and stack >= 0
    bad = subprocess.run([sys.executable, str(script), "--shape", "2x256x4"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "want batch x length x heads x head_dim x state" in bad.stderr


def test_profile_step_families_name_the_kernels():
    import profile_step

    assert profile_step.family("_rotary_bwd_kernel") == "rope / swiglu (triton)"
    assert profile_step.family("_swiglu_fwd_kernel") == "rope / swiglu (triton)"
    assert profile_step.family("void cudnn::fusion::convert_dq_to_16bits<true>(void const*") == "attention"
    assert profile_step.family("_conv_bwd_kernel") == "conv1d"
    assert profile_step.family("_scan_bwd_kernel") == "scan (triton)"
    assert profile_step.family("_ssd_chunk_bwd_kernel") == "ssd (triton)"
    assert profile_step.family("_ssd_state_pass_kernel") == "ssd (triton)"
