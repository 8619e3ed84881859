"""Retries only for transient failures (a refused connection, a 5xx or 429 from a real
server), never for contract errors; and the step logs: tqdm bars as whole lines, the root
cause of a failed step read from the local runner's log."""

from __future__ import annotations

import io
import socket
import sys

import pytest
import requests

from genco.cli.common import bug_in_step
from genco.errors import ContractError, NotFoundError, StepError
from genco.pipeline.logs import RunLog, failed_step, progress_lines, root_cause
from genco.retries import call_with_retries, is_transient
from tests.test_cli_errors import _closed_url, _serve


@pytest.fixture
def status_server():
    """Answers every request with the status in its path (``/503``)."""

    def answer(path: str) -> tuple[int, dict]:
        return int(path.strip("/").split("/")[0]), {"message": "status by test"}

    yield from _serve(answer)


class Calls:
    def __init__(self, fn) -> None:
        self.fn, self.count, self.waits = fn, 0, []

    def __call__(self):
        self.count += 1
        return self.fn()

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


def _refused() -> None:
    host, port = _closed_url().removeprefix("http://").split(":")
    socket.create_connection((host, int(port)), timeout=5).close()


def test_a_refused_connection_is_retried_with_backoff_then_raised() -> None:
    calls = Calls(_refused)
    lines: list[str] = []
    with pytest.raises(ConnectionRefusedError):
        call_with_retries(
            calls, attempts=3, delay_s=2, what="probe", sleep=calls.sleep, log=lines.append
        )
    assert calls.count == 3 and calls.waits == [2, 4]
    assert lines[0].startswith("probe: transient failure (ConnectionRefusedError: ")
    assert lines[0].endswith("attempt 2/3 in 2 s")


@pytest.mark.parametrize(("status", "tries"), [(503, 3), (500, 3), (429, 3), (404, 1), (403, 1)])
def test_http_5xx_and_429_are_retried_4xx_are_not(status_server, status, tries) -> None:
    calls = Calls(lambda: requests.get(f"{status_server}/{status}", timeout=10).raise_for_status())
    with pytest.raises(requests.HTTPError):
        call_with_retries(calls, attempts=3, delay_s=0.01, sleep=calls.sleep, log=lambda _: None)
    assert calls.count == tries


@pytest.mark.parametrize(
    "error",
    [ContractError("bad column"), NotFoundError("gs://b/x: no such object"), KeyError("bug")],
)
def test_contract_errors_and_bugs_fail_at_once(error: BaseException) -> None:
    def fail() -> None:
        raise error

    calls = Calls(fail)
    with pytest.raises(type(error)):
        call_with_retries(calls, attempts=5, sleep=calls.sleep)
    assert calls.count == 1 and calls.waits == []
    assert not is_transient(error)


def test_success_after_a_transient_failure_returns_the_value() -> None:
    outcomes = iter([ConnectionResetError("reset by peer"), "ok"])

    def flaky() -> str:
        outcome = next(outcomes)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    calls = Calls(flaky)
    assert call_with_retries(calls, sleep=calls.sleep, log=lambda _: None) == "ok"
    assert calls.count == 2


# ----------------------------------------------------------------------------- logs


def test_tqdm_bars_become_whole_lines(capfd) -> None:
    from tqdm import tqdm

    with progress_lines(every_s=3600):
        for _ in tqdm(range(50), desc="generator RL", unit="step", mininterval=0):
            pass
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    # The first draw shows at once, the rest are throttled; the final state always shows.
    assert lines[0].startswith("generator RL:   0%") and lines[-1].startswith("generator RL: 100%")
    assert len(lines) == 2


# A failed step as kfp.local prints it: the executor's lines indented by 4, a chained
# traceback, then the runner's own status line (with colour codes).
RUN_LOG = """\
\x1b[0m12:00:00.000 - INFO - Executing task \x1b[96m'ingest'\x1b[0m
12:00:00.001 - INFO - Streamed logs:

    [KFP Executor 2026-11-29 12:00:00,100 INFO]: Looking for component `ingest`
    Traceback (most recent call last):
      File "/genco/data/contract.py", line 380, in _read_strings
    FileNotFoundError: [Errno 2] No such file or directory: '/data/catalog.csv'

    The above exception was the direct cause of the following exception:

    Traceback (most recent call last):
      File "/genco/data/contract.py", line 391, in _read_strings
        raise ContractError(f"{path}: file not found") from exc
    genco.errors.ContractError: /data/catalog.csv: file not found


12:00:04.000 - ERROR - Task \x1b[96m'ingest'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
"""


def test_root_cause_is_the_error_that_ended_the_step() -> None:
    assert failed_step(RUN_LOG) == "ingest"
    cause = root_cause(RUN_LOG, "ingest")
    assert cause is not None
    assert (cause.type_name, cause.message) == (
        "genco.errors.ContractError",
        "/data/catalog.csv: file not found",
    )
    assert cause.exception_type() is ContractError
    assert cause.traceback.startswith("Traceback (most recent call last):")
    assert "FileNotFoundError" in cause.traceback  # the whole chain, for a bug report
    assert failed_step(RUN_LOG.replace("FAILURE", "SUCCESS")) is None


def test_a_bug_in_a_step_keeps_its_traceback_an_expected_error_does_not() -> None:
    bug_log = RUN_LOG.replace(
        "genco.errors.ContractError: /data/catalog.csv: file not found", "KeyError: 'ad_id'"
    )
    bug = root_cause(bug_log, "ingest")
    assert bug is not None and bug.exception_type() is KeyError
    error = StepError("ingest", "m", "/run/pipeline.log", KeyError, bug.traceback)
    shown = bug_in_step(error)
    assert shown is not None and shown.startswith("Traceback (most recent call last):")
    assert shown.endswith("(step 'ingest' failed on a bug; full log: /run/pipeline.log)")
    expected = StepError("ingest", "m", "/run/pipeline.log", ContractError, "Traceback ...")
    assert bug_in_step(expected) is None
    assert bug_in_step(ContractError("x")) is None


def test_run_log_keeps_everything_and_shows_task_and_progress_lines(tmp_path) -> None:
    console = io.StringIO()
    log = RunLog(str(tmp_path / "pipeline.log"), console)
    log.write(RUN_LOG.replace("Streamed logs:", "Streamed logs:\n    [genco] ingest: 9 rows in"))
    log.close()
    assert console.getvalue().splitlines() == [
        "ingest: running",
        "[genco] ingest: 9 rows in",
        "ingest: failed",
    ]
    assert "Looking for component" in (tmp_path / "pipeline.log").read_text()
    verbose = io.StringIO()
    with RunLog(str(tmp_path / "v.log"), verbose, verbose=True) as log:
        log.write(RUN_LOG)
    assert verbose.getvalue() == RUN_LOG


def test_step_output_reaches_the_log_not_the_console(tmp_path, capfd) -> None:
    log = RunLog(str(tmp_path / "pipeline.log"), sys.stderr)
    log.write("    some executor JSON\n")
    log.close()
    assert capfd.readouterr().err == ""
