"""`entrorl report` on the log that verl's own file logger writes (verl.utils.tracking.Tracking with "file")."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

tracking = pytest.importorskip("verl.utils.tracking", reason="verl is not installed; run 'make test-verl'")

from entrorl.analysis.run_report import write_run_report  # noqa: E402


def test_report_reads_what_verl_s_file_logger_writes(tmp_path, monkeypatch):
    """Metrics logged through verl's Tracking (numpy values included, as verl's trainer passes them) come back as the
    report's entropy, reward, interventions and validations."""
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(tmp_path))
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH", raising=False)
    logger = tracking.Tracking(project_name="project", experiment_name="run", default_backend=["file"], config={})
    logger.log(data={"val-core/gsm8k/acc/mean@2": np.float64(0.25)}, step=0)
    for step in range(1, 9):
        entropy = 1.0 / step
        logger.log(data={"actor/entropy": np.float32(entropy), "critic/score/mean": 0.9 - 0.3 * math.exp(entropy),
                         "actor/select/clip_b_frac": 0.05, "actor/pg_loss": np.float32(0.1)}, step=step)
    logger.log(data={"val-core/gsm8k/acc/mean@2": 0.75}, step=8)
    del logger  # closes the file
    log = tmp_path / "project" / "run.jsonl"
    assert json.loads(log.read_text().splitlines()[1])["data"]["actor/select/clip_b_frac"] == 0.05
    report = write_run_report(tmp_path / "project", figures=False)
    assert report["steps"] == 8 and report["reward_key"] == "reward/mean"
    assert report["law"]["fit"]["fit"]["r2"] == pytest.approx(1.0)
    assert report["law"]["fit"]["fit"]["a"] == pytest.approx(0.3, rel=1e-5)
    assert {row["step"]: row["Avg@n"] for row in report["evaluations"]["values"]} == {0: 0.25, 8: 0.75}
    assert {row["metric"] for row in report["interventions"]["values"]} == {"select/clip_b_frac"}
