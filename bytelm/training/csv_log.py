"""A CSV logger whose metrics.csv survives kills and continues a resumed run.

Lightning's CSVLogger deletes an existing metrics.csv when it starts and rewrites the file in
place when a new column appears, so a kill at the wrong moment loses the history. Here rows are
appended whole and fsynced, and a rewrite (a new column, a resume) goes to a temporary file
that is renamed over the old one. On resume the rows logged before the checkpoint's step are
kept and those after it are dropped (a killed run may have gone on past its last checkpoint),
so the file ends up with every step exactly once.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from bytelm.training.checkpointing import atomic_write


def _read_rows(path: Path, before_step: float) -> tuple[list[str], list[dict]]:
    """(header, rows logged before `before_step`, values as written). A torn or damaged row,
    which only a kill during an append can leave, is dropped."""
    if not path.is_file():
        return [], []
    text = path.read_text(errors="replace")
    text = text[: text.rfind("\n") + 1]  # a last line without its newline is incomplete
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for row in reader:
        if None in row or None in row.values():
            continue  # wrong number of fields
        try:
            step = int(float(row["step"]))
        except (KeyError, ValueError):
            continue
        if step < before_step:
            rows.append({k: v for k, v in row.items() if v != ""})
    return list(reader.fieldnames or []), rows


def _csv_bytes(fields: list[str], rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


class _DurableWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None):
        super().__init__(log_dir)
        path = Path(self.metrics_file_path)
        fields, rows = _read_rows(path, resume_step) if resume_step is not None else ([], [])
        if rows:
            self.metrics_keys = fields
            atomic_write(path, _csv_bytes(fields, rows))
        else:
            path.unlink(missing_ok=True)

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes metrics.csv here; __init__ decides what to keep instead."""

    def save(self) -> None:
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        if self._record_new_keys() or not path.is_file():
            _, old = _read_rows(path, math.inf)
            atomic_write(path, _csv_bytes(self.metrics_keys, old + self.metrics))
        else:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.metrics_keys).writerows(self.metrics)
                f.flush()
                os.fsync(f.fileno())
        self.metrics = []


class ResumableCSVLogger(CSVLogger):
    """runs/<name>/logs/metrics.csv; `resume_step`: the step of the checkpoint resumed from."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        super().__init__(save_dir=str(run_dir), name="", version="logs")
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> _DurableWriter:
        if self._experiment is None:
            self._experiment = _DurableWriter(self.log_dir, self._resume_step)
        return self._experiment


def make_csv_logger(run_dir: Path, resume_step: int | None = None) -> CSVLogger:
    logger = ResumableCSVLogger(run_dir, resume_step)
    logger.experiment  # noqa: B018 -- trims a resumed run's file now, before anything is logged
    return logger
