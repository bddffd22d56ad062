"""``python -m training --spec spec.json [--print]``: run one training job for the server.

Exit status: 0 whenever ``report.json`` was written (the gate passed *or* failed); 2 for an
invalid spec; 1 for any other failure. The reason for a non-zero exit is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Sequence

from training.errors import SpecError, TrainingError

PARENT_ENV = "EDGELOOP_TRAINER_PARENT_PID"  # set by the server's job runner
PARENT_POLL_S = 1.0  # seconds between checks that the runner still lives
NICE_ENV = "EDGELOOP_TRAINER_NICE"  # niceness the job runner asks for (server training_nice)


def _lower_priority() -> None:
    """Run at the niceness the job runner asked for, before any worker thread exists (every
    thread torch or BLAS starts later inherits it): training takes only the CPU that serving
    the fleet leaves."""
    wanted = os.environ.get(NICE_ENV, "")
    if wanted.isdigit():
        try:
            os.nice(max(0, int(wanted) - os.nice(0)))
        except OSError as exc:
            print(f"training: cannot lower priority: {exc}", file=sys.stderr, flush=True)


def _exit_with_parent() -> None:
    """Exit when the job runner that started us dies (its job will be retried elsewhere)."""
    expected = os.environ.get(PARENT_ENV, "")
    if not expected.isdigit():
        return

    def watch() -> None:
        while True:
            if os.getppid() != int(expected):
                print("training: the job runner died; exiting", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(PARENT_POLL_S)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training", description="Train, gate and export one edgeloop challenger."
    )
    parser.add_argument("--spec", required=True, help="path to the job's spec.json")
    parser.add_argument("--print", action="store_true", help="echo report.json to stdout")
    args = parser.parse_args(argv)
    _lower_priority()
    _exit_with_parent()

    # Imported lazily so that `--help` and a bad spec fail fast, before torch/sklearn/ORT load.
    from training.spec import load_spec

    try:
        spec = load_spec(args.spec)
        from training.pipeline import run_job

        report = run_job(spec)
    except SpecError as exc:
        print(f"training: invalid spec: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"training: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.print:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
