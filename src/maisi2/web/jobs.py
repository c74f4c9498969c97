"""A job queue for generation: one job runs at a time in a worker thread, the rest wait behind it.

A job is a function of a progress callback (`Task`). The queue hands each running task a callback
that records the latest progress event and raises `Cancelled` once the job is cancelled, so a
cancel takes effect at the task's next progress event (`generate` reports each Euler step and
each phase, each network loaded) and the task stops there; `generate` writes nothing when it is
stopped. Until then the job is "running" with "cancelling" set.

Usage::

    queue = JobQueue()
    job = queue.submit(lambda progress: run_generation(..., on_progress=progress), label="phantom")
    queue.cancel(job.id)
    queue.shutdown()   # cancels what is queued or running and waits for the worker
"""

from __future__ import annotations

import logging
import queue as queue_module
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from maisi2.errors import Maisi2Error

__all__ = ["Cancelled", "Job", "JobQueue", "NotFound", "Task", "USER_ERRORS"]

log = logging.getLogger(__name__)

# What the `maisi2` command reports as one-line user errors (maisi2.cli.main): the web app shows
# their message in the page; anything else is a bug and is logged with its traceback.
USER_ERRORS = (Maisi2Error,)


class NotFound(Maisi2Error, KeyError):
    """An id the app does not know (a job, upload, mask, result or file kind): HTTP 404. Its own
    type, so that a KeyError from a bug inside is not answered as a missing item."""

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class Cancelled(Exception):
    """Raised inside a running task by its progress callback once the job is cancelled."""


Task = Callable[[Callable[[dict], None]], Any]


@dataclass
class Job:
    id: str
    label: str
    task: Task
    details: dict = field(default_factory=dict)  # what the page shows about the request
    state: str = QUEUED
    progress: dict = field(default_factory=dict)  # the latest progress event
    error: str | None = None
    result: Any = None  # what the task returned
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def to_dict(self) -> dict:
        return {"id": self.id, "label": self.label, "details": self.details, "state": self.state,
                "progress": dict(self.progress), "error": self.error, "result": self.result,
                "cancelling": self.state == RUNNING and self.cancel_requested.is_set(),
                "submitted": self.submitted, "started": self.started, "finished": self.finished}


class JobQueue:
    """First in, first out; `workers` jobs at a time (1: generation takes the whole machine)."""

    def __init__(self, workers: int = 1):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._waiting: queue_module.Queue[Job | None] = queue_module.Queue()
        self._threads = [threading.Thread(target=self._work, name=f"maisi2-job-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, task: Task, label: str, details: dict | None = None) -> Job:
        job = Job(secrets.token_hex(6), label, task, details or {})
        with self._lock:
            self._jobs[job.id] = job
        self._waiting.put(job)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise NotFound(f"no job {job_id!r}")
            return self._jobs[job_id]

    def jobs(self) -> list[Job]:
        """Every job, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.submitted, reverse=True)

    def position(self, job: Job) -> int | None:
        """How many jobs run or wait before a queued job (0: it is next); None when not queued."""
        if job.state != QUEUED:
            return None
        with self._lock:
            return sum(1 for j in self._jobs.values()
                       if j.state == RUNNING or (j.state == QUEUED and j.submitted < job.submitted))

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, a running one at its next progress event; finished jobs stay."""
        job = self.get(job_id)
        with self._lock:
            if job.state in FINISHED:
                return job
            job.cancel_requested.set()
            if job.state == QUEUED:
                self._finish(job, CANCELLED)
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job has finished (for tests and scripts); raises TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        while job.state not in FINISHED:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout} s")
            time.sleep(0.02)
        return job

    def shutdown(self, timeout: float = 120.0) -> None:
        """Cancel every unfinished job and wait for the workers (a running task stops at its next event)."""
        for job in self.jobs():
            self.cancel(job.id)
        for _ in self._threads:
            self._waiting.put(None)
        for thread in self._threads:
            thread.join(timeout)

    # -- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._waiting.get()) is not None:
            with self._lock:
                if job.state != QUEUED:  # cancelled while waiting
                    continue
                job.state, job.started = RUNNING, time.time()
            self._run(job)

    def _run(self, job: Job) -> None:
        def progress(event: dict) -> None:
            job.progress = dict(event)
            if job.cancel_requested.is_set():
                raise Cancelled

        try:
            progress({"phase": "starting"})
            result = job.task(progress)
        except Cancelled:
            self._finish(job, CANCELLED)
        except USER_ERRORS as err:
            self._finish(job, FAILED, _message(err))
        except Exception as err:  # a bug: keep the trace in the server log, say so in the page
            log.exception("job %s failed", job.id)
            self._finish(job, FAILED, f"internal error ({type(err).__name__}: {err}); see the server log")
        else:
            job.result = result
            self._finish(job, DONE)

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        job.state, job.error, job.finished = state, error, time.time()


def _message(err: BaseException) -> str:
    """The one line the CLI would print for a user error (a KeyError's message without its quotes)."""
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
