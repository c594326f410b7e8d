"""The eval commands end to end on two tiny runs trained by train.main (one with probes mixed
into training): each command's JSON lands in RUN_DIR/eval/, and compare turns the runs into a
markdown table and plots."""

import csv
import json

import pytest

import train
from eval import bpb, compare, generate, probes, robustness

TEXT = ("Seven quiet foxes jumped over three lazy brown dogs while a curious cat watched from "
        "the garden wall. Every morning the baker sold fresh bread, warm rolls and sweet cakes "
        "to people walking past the old market square near the river.\n") * 40


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_runs")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    dirs = {}
    for name, extra in (("plain", []), ("probed", ["--data.probe_fraction", "0.25"])):
        assert train.main([
            "--data", str(corpus), "--name", name, "--train.out_dir", str(root / "runs"),
            "--data.prepared_dir", str(root / "prepared"), "--data.seq_len", "64",
            "--data.batch_size", "8", "--data.val_bytes", "512",
            "--model.d_model", "32", "--model.n_layer", "2", "--model.d_state", "4",
            "--optim.lr", "1e-2", "--optim.warmup_steps", "3", "--train.eval_every", "5",
            "--train.ckpt_every", "15", "--train.sample_bytes", "0", "--trainer.max_steps", "15",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            *extra]) == 0
        dirs[name] = root / "runs" / name
    return dirs


def run_json(cli, argv, capsys) -> dict:
    assert cli(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_bpb_covers_the_whole_split_and_is_saved(runs, capsys):
    run = runs["plain"]
    result = run_json(bpb.cli, ["--ckpt", str(run), "--device", "cpu"], capsys)
    meta = json.loads((run.parent.parent / "prepared" / "meta.json").read_text())
    assert result["bytes"] == meta["splits"]["val"]["bytes"] - 1 and result["step"] == 15
    assert 1.0 < result["bpb"] < 8.0
    assert json.loads((run / "eval" / "bpb.json").read_text()) == result
    with open(run / "logs" / "metrics.csv") as f:  # training validated on the first 512 bytes
        logged = [float(r["val/bpb"]) for r in csv.DictReader(f) if r.get("val/bpb")][-1]
    first = run_json(bpb.cli, ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--max-bytes",
                               "512", "--out", str(run / "first.json")], capsys)
    assert first["bytes"] == 511 and first["bpb"] == pytest.approx(logged, rel=1e-4)
    assert json.loads((run / "first.json").read_text()) == first


def test_generate_streams_and_is_seeded(runs, capsys):
    argv = ["--ckpt", str(runs["plain"]), "--prompt", "Seven quiet", "--max-bytes", "24",
            "--seed", "3"]
    assert generate.cli(argv) == 0
    first = capsys.readouterr()
    summary = json.loads(first.err)
    assert first.out == summary["text"] + "\n" and summary["bytes"] >= 24
    assert generate.cli(argv) == 0
    assert capsys.readouterr().out == first.out


def test_probes_and_robustness_then_compare(runs, capsys, tmp_path):
    args = ["--tasks", "count", "contains", "spell", "--n", "4"]
    for run in runs.values():
        result = run_json(probes.cli, ["--ckpt", str(run), *args], capsys)
        assert result["words"].startswith("corpus:") and result["n_words"]["held_out"] > 0
        count = result["tasks"]["count"]
        assert count["held_out"]["n"] == count["train"]["n"] == 4
        assert 0 <= count["held_out"]["ranked"] <= 1
        assert "ranked" not in result["tasks"]["spell"]["train"]
        again = run_json(probes.cli, ["--ckpt", str(run), *args], capsys)
        assert again["tasks"] == result["tasks"]  # fixed seeds
        noisy = run_json(robustness.cli, ["--ckpt", str(run), "--max-bytes", "1500"], capsys)
        assert set(noisy["perturbations"]) == set(robustness.PERTURBATIONS)
        assert noisy["perturbations"]["swap"]["bytes"] == noisy["clean"]["bytes"]
        assert noisy["perturbations"]["drop"]["bytes"] < noisy["clean"]["bytes"]
        run_json(bpb.cli, ["--ckpt", str(run)], capsys)  # the whole validation split

    out = tmp_path / "report"
    report = run_json(compare.cli, [str(runs["plain"]), str(runs["probed"]), "--out", str(out)],
                      capsys)
    table = (out / "compare.md").read_text()
    assert table.strip() == report["table"]
    header, _, plain_row, probed_row = table.splitlines()[:4]
    for column in ("params", "train FLOPs", "bytes seen", "val bpb", "count (held-out)",
                   "spell (held-out)", "bpb clean", "bpb swap"):
        assert column in header
    assert plain_row.startswith("| plain |") and probed_row.startswith("| probed |")
    for name in ("bpb_vs_flops.png", "probes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    plain = report["runs"]["plain"]
    tokens = 15 * 8 * 64
    assert plain["tokens_seen"] == plain["bytes_seen"] == tokens
    cfg_model = compare.load(runs["plain"], "cpu").model
    assert plain["train_flops"] == 3 * cfg_model.flops_per_token(64) * tokens
    assert [p["step"] for p in plain["curve"]][:2] == [4, 9]
    assert plain["curve"][0]["flops"] == 3 * cfg_model.flops_per_token(64) * 5 * 8 * 64
    assert plain["val_bpb_from"] == "eval/bpb.json"
    assert plain["val_bpb"] == json.loads((runs["plain"] / "eval" / "bpb.json").read_text())["bpb"]
    assert set(plain["probes"]) == {"count", "contains", "spell"}
