"""A `vllm bench serve` that stays up between the rates of a sweep.

Started afresh for every rate, `vllm bench serve` took about 25 s of a 40 s
rate on the GPU host beyond the arrivals, much of it importing vLLM and its
dependencies: device time that measures nothing. `BenchClient` starts this
module once (one import) and runs
each rate's arguments through the parser and `main` of vLLM's own
`vllm bench serve` (`vllm.benchmarks.serve`), each run's output in its own
log file, as the CLI's would be.

Protocol: one JSON object per line on the client's stdin, `{"argv": [...],
"log": PATH}` (argv: what follows `vllm bench serve`); one line back on the
control pipe whose descriptor is the client's argument, `{"code": N}` (0:
the run succeeded). The client's stdout and stderr are redirected per run at
the file-descriptor level, so vLLM's loggers (bound to the process's streams)
write into the run's log too.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import IO, Any


def _run(argv: list[str], log: Path) -> int:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with log.open("wb") as fh:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            try:
                parser = FlexibleArgumentParser()
                add_cli_args(parser)
                main(parser.parse_args(argv))
                return 0
            except SystemExit as e:  # argparse and the CLI exit this way
                return e.code if isinstance(e.code, int) else 1
            except Exception:
                traceback.print_exc()
                return 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def serve_forever(requests: IO[str], control: IO[str]) -> None:
    # vLLM's benchmark imported once, before the first run.
    import vllm.benchmarks.serve  # noqa: F401

    for line in requests:
        if not line.strip():
            continue
        request = json.loads(line)
        code = _run(list(request["argv"]), Path(request["log"]))
        control.write(json.dumps({"code": code}) + "\n")
        control.flush()


class BenchClient:
    """The parent's side: starts the client on first use, runs one `vllm
    bench serve` at a time, restarts it after a timeout or a crash."""

    def __init__(self, log: Path) -> None:
        self._log = log  # the client's own output between runs
        self._proc: subprocess.Popen[str] | None = None
        self._control: IO[str] | None = None

    def _start(self) -> tuple[subprocess.Popen[str], IO[str]]:
        read_fd, write_fd = os.pipe()
        with self._log.open("ab") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"{__package__}.serve_client", str(write_fd)],
                stdin=subprocess.PIPE, stdout=fh, stderr=subprocess.STDOUT, text=True,
                pass_fds=(write_fd,), start_new_session=True,
            )  # fmt: skip
        os.close(write_fd)
        self._proc, self._control = proc, os.fdopen(read_fd, "r")
        return proc, self._control

    def run(self, argv: list[str], log: Path, timeout_s: float) -> str | None:
        """One `vllm bench serve` with `argv` (what follows `vllm bench
        serve`); why it failed, or None."""
        proc, control = (
            (self._proc, self._control) if self._proc and self._control else self._start()
        )
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            self.close()
            return f"the bench client had exited ({proc.poll()}); see {self._log}"
        ready, _, _ = select.select([control], [], [], timeout_s)
        if not ready:
            self.close(kill=True)
            return f"`vllm bench serve` timed out after {timeout_s:.0f} s (--rate-timeout)"
        line = control.readline()
        if not line:
            self.close()
            return f"the bench client exited during the run; see {self._log} and {log}"
        code = int(json.loads(line)["code"])
        return None if code == 0 else f"`vllm bench serve` exited with {code}"

    def close(self, kill: bool = False) -> None:
        """End the client: at the end of its input, or at once (`kill`, for
        a run past its time)."""
        proc, control, self._proc, self._control = self._proc, self._control, None, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()  # the client's loop ends
        if not kill:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever it started
        proc.wait()
        if control is not None:
            control.close()

    def __enter__(self) -> BenchClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


if __name__ == "__main__":
    with os.fdopen(int(sys.argv[1]), "w") as control_pipe:
        serve_forever(sys.stdin, control_pipe)
