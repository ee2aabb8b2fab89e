"""The sweep's progress bar: jobs done, the latest job's losses, failures and workers."""

import io

from modelscape.execution.progress import Progress, placement_text
from modelscape.results import JobRecord

OK = JobRecord(key=(0,), seed=1, status="ok", train_loss=0.123, test_loss=0.456)
TINY = JobRecord(key=(1,), seed=2, status="ok", train_loss=2.5e-9, test_loss=0.0312)
FAILED = JobRecord(key=(2,), seed=3, status="failed", error="boom")


def shown(records: list[JobRecord]) -> str:
    """The bar's last line once ``records`` have finished (tqdm throttles redraws until then)."""
    stream = io.StringIO()
    bar = Progress(4, 1, placement_text(["cpu", "cpu"]), file=stream)
    for record in records:
        bar.update(record)
    bar.close()
    return stream.getvalue().rstrip("\n").split("\r")[-1]  # each redraw starts with a \r


def test_bar_shows_the_latest_jobs_losses_failures_and_workers():
    assert shown([]).endswith("failed=0, workers: cpux2]") and "train=" not in shown([])
    assert "2/4" in shown([OK]) and "train=0.123 test=0.456, failed=0, workers: cpux2" in shown(
        [OK]
    )
    assert "train=2.5e-09 test=0.0312, failed=0" in shown([OK, TINY])
    # a failed job has no losses: the bar keeps the latest ones and counts the failure
    text = shown([OK, TINY, FAILED])
    assert "4/4" in text and "train=2.5e-09 test=0.0312, failed=1, workers: cpux2" in text
