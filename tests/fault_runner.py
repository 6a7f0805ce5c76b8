"""Run saekit's command line with a fault injected into the file system, for tests/test_faults.py.

    python tests/fault_runner.py ACTION FUNCTION N -- train --preset topk ...

FUNCTION is os.fsync, os.replace or os.rename (every saekit write flushes with fsync and commits
with a rename), os.open for opens that create a file, or MODULE:NAME for any function (a name
looked up in MODULE when called, such as saekit.run.train:evaluate_stream). At the N-th call
ACTION happens:
    kill     SIGKILL the process, as a crash or `kill -9` would, with nothing cleaned up
    sigint   send the process SIGINT (Ctrl-C), then make the call
    enospc   the call fails with "No space left on device" (and every later one)
    erofs    the call fails with "Read-only file system" (and every later one)
    count    nothing; at the end, print "FAULT-COUNT <calls>" to stderr (N is ignored)
    none     nothing at all
Then the command line's exit status is the process's.
"""

import errno
import importlib
import os
import signal
import sys

ERRORS = {"enospc": errno.ENOSPC, "erofs": errno.EROFS}


def inject(action: str, function: str, n: int):
    """Replace the function with one that faults at its n-th call; returns a function giving the calls so far."""
    module_name, _, name = function.rpartition(":") if ":" in function else ("os", ":", function.removeprefix("os."))
    module = importlib.import_module(module_name)
    real = getattr(module, name)
    calls = 0

    def faulty(*args, **kwargs):
        nonlocal calls
        creating = function != "os.open" or (len(args) > 1 and args[1] & os.O_CREAT)
        if creating:
            calls += 1
            if calls == n and action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if calls == n and action == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            if calls >= n and action in ERRORS:  # a full or read-only disk stays so
                raise OSError(ERRORS[action], os.strerror(ERRORS[action]), str(args[0]))
        return real(*args, **kwargs)

    setattr(module, name, faulty)
    return lambda: calls


if __name__ == "__main__":
    action, function, n, separator, *argv = sys.argv[1:]
    assert separator == "--", __doc__
    calls = inject(action, function, int(n))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, even if the test runner ignores it
    from saekit.cli import main

    code = main(argv)
    if action == "count":
        print(f"FAULT-COUNT {calls()}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
