"""A CSV logger that continues a resumed run's metrics.csv instead of deleting it.

Lightning's CSVLogger removes an existing metrics.csv when it starts. On resume we keep the
rows logged before the checkpoint's step and drop any logged after it (a killed run may have
gone on past its last checkpoint), so the file ends up with every step exactly once.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger


def _read_rows(path: Path, before_step: int) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = []
    for row in rows:
        if row.get("step") and int(float(row["step"])) < before_step:
            kept.append({k: (int(float(v)) if k in ("step", "epoch") else float(v))
                         for k, v in row.items() if v not in ("", None)})
    return kept


def make_csv_logger(run_dir: Path, resume_step: int | None = None) -> CSVLogger:
    logger = CSVLogger(save_dir=str(run_dir), name="", version="logs")
    if resume_step is None:
        return logger
    old = _read_rows(Path(logger.log_dir) / "metrics.csv", resume_step)
    writer = logger.experiment  # creating it deletes the old file: we hold its rows
    writer.metrics.extend(old)
    return logger
