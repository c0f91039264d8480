"""CSV logging that continues a run's metrics.csv when the run is resumed (Lightning's deletes it)."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _ContinuingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning removes an existing metrics.csv here; keep it and append under its header instead
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class MedRecCSVLogger(CSVLogger):
    """Lightning's CSVLogger (same options and layout, ``<save_dir>/<name>/version_N/metrics.csv``),
    except that a run continued with ``--ckpt_path last`` appends to its metrics.csv."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
