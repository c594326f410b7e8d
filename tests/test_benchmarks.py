"""The benchmark scripts still run (tiny sizes on the CPU); their numbers are not checked here."""

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
