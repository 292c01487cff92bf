"""StopFlag with real signals sent to this process; the end of a job after the stop, in a subprocess."""
import os
import signal
import subprocess
import sys
import threading

import pytest
from conftest import ROOT

from fedmpi.runtime.stop import INTERRUPT_EXIT_CODE, Interrupted, StopFlag, abort_on_second_interrupt


@pytest.fixture(autouse=True)
def keep_handlers():
    """Put pytest's own signal handlers back after each test."""
    saved = {sig: signal.getsignal(sig) for sig in StopFlag.SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_interrupts_only_inside_training():
    aborts = []
    flag = StopFlag(lambda: aborts.append(1)).install()
    flag.check()  # nothing pending: no-op
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.requested and flag.signum == signal.SIGTERM
    flag.check()  # outside training a pending stop is a vote, not an interruption
    with pytest.raises(Interrupted, match="SIGTERM"):
        with flag.interruptible():
            flag.check()
    assert not flag.training and aborts == []


def test_repeated_signals_change_nothing_and_a_second_sigint_aborts():
    aborts = []
    flag = StopFlag(lambda: aborts.append(1)).install()
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a stop like SIGTERM, no KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM):
        os.kill(os.getpid(), sig)
    assert flag.signum == signal.SIGINT and aborts == []
    os.kill(os.getpid(), signal.SIGINT)
    assert aborts == [1]


def test_a_sigint_after_a_sigterm_aborts_too():
    aborts = []
    StopFlag(lambda: aborts.append(1)).install()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    assert aborts == [1]


def test_check_raises_on_a_worker_thread():
    flag = StopFlag().install()
    os.kill(os.getpid(), signal.SIGUSR1)
    seen = []

    def worker():
        try:
            flag.check()
        except Interrupted:
            seen.append("interrupted")

    with flag.interruptible():
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert seen == ["interrupted"]


def test_after_settle_no_signal_changes_the_exit_code():
    """Not a late SIGTERM (the default action, restored during the interpreter's teardown, would give
    exit 15), nor a SIGINT (with a stop pending it would abort)."""
    script = ("import os, signal, time\nfrom fedmpi.runtime.stop import StopFlag\n"
              "flag = StopFlag(lambda: os._exit(99)).install()\nos.kill(os.getpid(), signal.SIGTERM)\n"
              "flag.settle()\nassert all(signal.getsignal(s) == signal.SIG_IGN for s in StopFlag.SIGNALS)\n"
              "for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):\n    os.kill(os.getpid(), sig)\n"
              "time.sleep(0.2)\nraise SystemExit(75)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75 and proc.stderr == ""


class FakeComm:
    def __init__(self, rank, size):
        self.rank, self.size, self.codes = rank, size, []

    def abort(self, code):
        self.codes.append(code)


@pytest.mark.parametrize("rank,size,where", [(0, 1, ""), (0, 3, " (rank 0/3)")])
def test_the_second_interrupt_abort_prints_one_line_and_ends_with_130(capsys, rank, size, where):
    comm = FakeComm(rank, size)
    abort_on_second_interrupt(comm)()
    assert comm.codes == [INTERRUPT_EXIT_CODE] == [130]
    assert capsys.readouterr().err == (f"fedmpi: interrupted again{where}; aborting the job without a checkpoint "
                                       f"of this round\n")
