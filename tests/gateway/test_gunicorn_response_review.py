"""Review of CoalescingResponse.process_headers (b95bf38): under gunicorn's gthread worker (GUNICORN_WORKER_CLASS), the
threads of a worker share the names already checked; the fast path must never fail a response that gunicorn's own
checks accept, whatever another thread does to that memory meanwhile."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest
from gunicorn.config import Config

from gateway import gunicorn_response

HEADERS = [("Content-Type", "text/plain"), ("X-Cache", "HIT"), ("Age", "1"), ("ETag", '"v1"'), ("Content-Length", "5")]


@pytest.fixture
def _often_full(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The worker's memory of names fills (and is cleared) every few responses instead of every 4096 new names: the
    same code path, reached in a fraction of a second; threads switch as often as the interpreter allows."""
    monkeypatch.setattr(gunicorn_response, "MAX_CHECKED_NAMES", 8)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)
    gunicorn_response._checked_names.clear()


@pytest.mark.usefixtures("_often_full")
def test_valid_headers_never_fail_while_other_threads_fill_the_name_memory() -> None:
    cfg = Config()
    failures: list[str] = []
    stop = threading.Event()

    def answer_the_same_headers() -> None:
        while not stop.is_set():
            try:
                gunicorn_response.CoalescingResponse(None, None, cfg).process_headers(HEADERS)
            except Exception as exc:  # gunicorn would answer 500
                failures.append(repr(exc))
                stop.set()

    def answer_with_new_names() -> None:  # e.g. an upstream that names a header per trace
        n = 0
        while not stop.is_set():
            n += 1
            gunicorn_response.CoalescingResponse(None, None, cfg).process_headers([(f"X-Trace-{n}", "1"), *HEADERS])

    threads = [threading.Thread(target=answer_the_same_headers) for _ in range(3)]
    threads.append(threading.Thread(target=answer_with_new_names))
    for thread in threads:
        thread.start()
    stop.wait(20)
    stop.set()
    for thread in threads:
        thread.join()
    assert failures == []
