"""Compare runs: one markdown table (params, training FLOPs, bytes seen, validation bits per
byte, held-out probe accuracy per task, robustness) and plots.

    python -m eval.compare runs/mamba-20m runs/transformer-20m runs/bpe-20m --out report/

Reads each run's config.yaml, checkpoints/last.ckpt, logs/metrics.csv and the JSON results
the other eval commands saved in RUN_DIR/eval/ (bpb.json, probes.json, robustness.json);
what a run lacks shows as "-". Training FLOPs are the logged train/flops column when there is
one, else 3 x model.flops_per_token x tokens seen, where a step's tokens come from the run's
settings (world size = trainer devices x num_nodes, 'auto' counting as one device).
With --out DIR: compare.md, compare.json, bpb_vs_flops.png (validation bits per byte against
training FLOPs, every run on one axis) and probes.png (held-out probe accuracy per task).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from bytelm import probes
from eval.common import EvalError, Parser, load, run_cli
from eval.robustness import PERTURBATIONS


def world_size(trainer: dict) -> int:
    """Devices x nodes from the Trainer arguments; 'auto' counts as one device."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    else:
        n = int(devices) if str(devices).isdigit() and int(devices) > 0 else 1
    return n * int(trainer.get("num_nodes", 1))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def read_result(run_dir: Path, name: str) -> dict | None:
    path = run_dir / "eval" / f"{name}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise EvalError(f"{path} is not valid JSON: {e}") from None


def summarize(run_dir: Path) -> dict:
    if not (run_dir / "config.yaml").is_file():
        raise EvalError(f"{run_dir} is not a run directory (no config.yaml)")
    loaded = load(run_dir, "cpu")
    cfg, model = loaded.cfg, loaded.model
    flops_per_token = model.flops_per_token(cfg.data.seq_len)
    rows = read_metrics(run_dir / "logs" / "metrics.csv")
    logged = [(r["step"], r["train/flops"]) for r in rows if "train/flops" in r]
    if logged:
        # Every optimizer step costs the same, so the last cumulative count gives the rate
        # (train/flops is logged only every log_every_n_steps).
        flops_per_step = logged[-1][1] / (logged[-1][0] + 1)
        tokens_per_step = flops_per_step / (3 * flops_per_token)
    else:
        tokens_per_step = (cfg.data.seq_len * cfg.data.batch_size * world_size(cfg.trainer)
                           * int(cfg.trainer.get("accumulate_grad_batches", 1)))
        flops_per_step = 3 * flops_per_token * tokens_per_step

    def flops_at(step: int) -> float:
        """Training FLOPs once optimizer step `step` (0-based, as logged) is done."""
        return flops_per_step * min(step + 1, loaded.step)

    curve = [{"step": int(r["step"]), "flops": flops_at(int(r["step"])), "bpb": r["val/bpb"]}
             for r in rows if "val/bpb" in r]
    bpb = read_result(run_dir, "bpb")
    # A saved bpb.json counts only when it scored the run's own validation split in full.
    own_val = bpb and bpb.get("data") == cfg.data.source and bpb.get("split") == "val" \
        and bpb.get("max_bytes") is None
    flops_per_byte = [r["train/flops_per_byte"] for r in rows if "train/flops_per_byte" in r]
    if loaded.tokenizer.is_bytes:
        bytes_per_token = 1.0
    elif flops_per_byte:  # logged by training as 3 x flops_per_token / bytes per token
        bytes_per_token = 3 * flops_per_token / flops_per_byte[-1]
    else:
        bytes_per_token = bpb["bytes"] / bpb["tokens"] if bpb else None
    tokens_seen = tokens_per_step * loaded.step
    probe = read_result(run_dir, "probes")
    robust = read_result(run_dir, "robustness")
    return {
        "run": str(run_dir),
        "step": loaded.step,
        "params": model.num_params(),
        "train_flops": flops_at(loaded.step - 1),
        "tokens_seen": tokens_seen,
        "bytes_seen": tokens_seen * bytes_per_token if bytes_per_token else None,
        "val_bpb": bpb["bpb"] if own_val else (curve[-1]["bpb"] if curve else None),
        "val_bpb_from": "eval/bpb.json" if own_val else ("metrics.csv" if curve else None),
        "probes": {task: r["held_out"] for task, r in probe["tasks"].items() if "held_out" in r}
        if probe else {},
        "robustness": ({"clean": robust["clean"]["bpb"],
                        **{k: v["bpb"] for k, v in robust["perturbations"].items()}}
                       if robust else {}),
        "curve": curve,
    }


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}{unit}"
    return f"{x:.0f}{unit}"


def markdown(runs: list[dict], names: list[str]) -> str:
    tasks = [t for t in probes.TASK_NAMES if any(t in r["probes"] for r in runs)]
    noises = [n for n in ("clean", *PERTURBATIONS) if any(n in r["robustness"] for r in runs)]
    header = ["run", "params", "train FLOPs", "bytes seen", "val bpb",
              *[f"{t} (held-out)" for t in tasks], *[f"bpb {n}" for n in noises]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in zip(names, runs):
        cells = [name, _si(r["params"]), f"{r['train_flops']:.2e}", _si(r["bytes_seen"], "B"),
                 f"{r['val_bpb']:.4f}" if r["val_bpb"] is not None else "-"]
        for task in tasks:
            p = r["probes"].get(task)
            cells.append("-" if p is None else f"{p['exact']:.2f}" +
                         (f" / {p['ranked']:.2f}" if "ranked" in p else ""))
        cells += [f"{r['robustness'][n]:.4f}" if n in r["robustness"] else "-" for n in noises]
        lines.append("| " + " | ".join(cells) + " |")
    note = "Probe cells: held-out exact-match accuracy / likelihood-ranking accuracy."
    return "\n".join(lines) + ("\n\n" + note if tasks else "")


def plot_curves(runs: list[dict], names: list[str], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in zip(names, runs):
        points = [p for p in r["curve"] if p["flops"] > 0]
        ax.plot([p["flops"] for p in points], [p["bpb"] for p in points], marker="o", ms=3,
                label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation bits per byte")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_probes(runs: list[dict], names: list[str], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in probes.TASK_NAMES if any(t in r["probes"] for r in runs)]
    closed = [t for t in tasks if probes.TASKS[t].choices]
    ratios = [len(tasks), max(len(closed), 1)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": ratios})
    width = 0.8 / len(runs)
    for ax, key, shown in ((axes[0], "exact", tasks), (axes[1], "ranked", closed)):
        for i, (name, r) in enumerate(zip(names, runs)):
            values = [r["probes"].get(t, {}).get(key, 0.0) for t in shown]
            ax.bar([j + i * width for j in range(len(shown))], values, width, label=name)
        ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(shown))], shown)
        ax.set_ylim(0, 1)
        ax.set_title(f"held-out words: {'exact match' if key == 'exact' else 'likelihood ranking'}")
        ax.set_ylabel("accuracy")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv) -> int:
    parser = Parser(prog="python -m eval.compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--out", help="directory for compare.md, compare.json and the plots")
    args = parser.parse_args(argv)

    dirs = [Path(r) for r in args.runs]
    runs = [summarize(d) for d in dirs]
    short = [d.name for d in dirs]
    names = short if len(set(short)) == len(short) else [str(d) for d in dirs]
    table = markdown(runs, names)
    result = {"runs": {name: r for name, r in zip(names, runs)}, "table": table, "files": []}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plot_curves(runs, names, out / "bpb_vs_flops.png")
        result["files"] = [str(out / "compare.md"), str(out / "compare.json"),
                           str(out / "bpb_vs_flops.png")]
        if any(r["probes"] for r in runs):
            plot_probes(runs, names, out / "probes.png")
            result["files"].append(str(out / "probes.png"))
        (out / "compare.md").write_text(table + "\n")
        (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(table, file=sys.stderr)
    return 0


def cli(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
