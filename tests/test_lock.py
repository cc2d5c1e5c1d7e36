"""One run directory, one writer: a second training process is refused while the first runs, a killed one blocks
nothing, and where flock cannot be trusted a heartbeat lock does the same. Real processes, no mocks.

Run with `python -m pytest tests/test_lock.py -q`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_train import TINY_RUN, small_shards

import train_gpt2
from conftest import REPO
from gpt2lite import lock


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("lock-data"))


def run_args(data: Path, run_dir: Path, max_steps: int = 100_000) -> list[str]:
    return [*TINY_RUN, "--data-dir", str(data), "--run-dir", str(run_dir), "--max-steps", str(max_steps),
            "--eval-interval", "1000", "--ckpt-interval", "5", "--sample-interval", "0", "--patience", "0"]  # fmt: skip


def start_training(argv: list[str], env: dict | None = None) -> subprocess.Popen:
    """A training process, returned once it holds its run directory and has checkpointed (so that --resume has
    something to continue from)."""
    process = subprocess.Popen([sys.executable, "train_gpt2.py", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("ckpt_*.pt")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    return process


def train(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_gpt2.py", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip


def snapshot(run_dir: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.iterdir()}


def refused_while_running(data: Path, run_dir: Path, second: list[str], env: dict | None = None) -> str:
    """Start a run, freeze it (SIGSTOP: its directory stands still), start the second command against the same
    directory, and check that it is refused with one line and writes nothing. Returns that line."""
    first = start_training(run_args(data, run_dir), env)
    try:
        first.send_signal(signal.SIGSTOP)
        before = snapshot(run_dir)
        result = train(second, env)
        assert result.returncode == 1, result.stderr
        assert snapshot(run_dir) == before, "the refused process wrote into the run directory"
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"is in use by process {first.pid} on {socket.gethostname()} since " in lines[0]
        assert "wait for that run to end or stop it, or give another --run-dir" in lines[0]
        return lines[0]
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("mode", ["flock", "heartbeat"])
def test_a_second_run_is_refused_while_the_first_runs(data, tmp_path, mode):
    env = {**os.environ, "GPT2LITE_LOCK": mode}
    line = refused_while_running(data, tmp_path / "run", run_args(data, tmp_path / "run"), env)
    assert ("last heartbeat" in line) == (mode == "heartbeat")


@pytest.mark.parametrize("mode", ["flock", "heartbeat"])
def test_a_resume_is_refused_while_the_run_it_would_continue_runs(data, tmp_path, mode):
    env = {**os.environ, "GPT2LITE_LOCK": mode}
    refused_while_running(data, tmp_path / "run", [*run_args(data, tmp_path / "run"), "--resume"], env)


def test_a_killed_run_blocks_nothing_and_its_unfinished_files_are_removed(data, tmp_path):
    run_dir = tmp_path / "run"
    first = start_training(run_args(data, run_dir))
    first.kill()  # SIGKILL: no handler runs, the OS drops the flock with the process
    first.wait()
    (run_dir / ".tmp-abc-ckpt_000010.pt").write_bytes(b"x" * 2_000_000)  # a checkpoint write it never finished
    result = train([*run_args(data, run_dir, max_steps=12), "--resume"])
    assert result.returncode == 0, result.stderr
    assert "removed 1 unfinished temporary file(s) of an earlier run, 2.0 MB freed" in result.stdout
    assert not list(run_dir.glob(".tmp-*"))


def test_a_stale_heartbeat_lock_is_taken_over_with_a_line(data, tmp_path):
    """What a killed process leaves where only the heartbeat lock works: a lock file whose heartbeat stopped."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gone = {"pid": 4242, "host": "another-machine", "since": time.time() - 3600,
            "heartbeat": time.time() - lock.STALE_SECONDS - 5}  # fmt: skip
    (run_dir / ".lock").write_text(json.dumps(gone))
    result = train(run_args(data, run_dir, max_steps=4), {**os.environ, "GPT2LITE_LOCK": "heartbeat"})
    assert result.returncode == 0, result.stderr
    assert "taking over the lock of process 4242 on another-machine, whose last heartbeat is" in result.stdout
    assert not (run_dir / ".lock").exists(), "a heartbeat lock is removed when its run ends"


def test_a_plan_takes_no_lock_and_warns_of_one(data, tmp_path):
    run_dir = tmp_path / "run"
    first = start_training(run_args(data, run_dir))
    try:
        result = train([*run_args(data, run_dir), "--resume", "--plan"])
        assert result.returncode == 0, result.stderr
        assert (
            f"is in use by process {first.pid}" in result.stdout
            and "a run started now would be refused" in result.stdout
        )
    finally:
        first.kill()
        first.wait()


def test_the_lock_is_released_however_an_in_process_run_ends(data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train_gpt2.main(run_args(data, run_dir, max_steps=4))
    assert lock.lock_problem(str(run_dir)) is None, "released at the end of a run"

    def ctrl_c(run, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_gpt2, "train_step", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train_gpt2.main([*run_args(data, run_dir, max_steps=8), "--resume"])
    assert lock.lock_problem(str(run_dir)) is None, "released after Ctrl-C"
    assert train([*run_args(data, run_dir, max_steps=6), "--resume"]).returncode == 0


# --- a lock that goes with its process --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["flock", "heartbeat"])
def test_sigterm_ends_a_run_as_ctrl_c_does_and_a_restart_is_not_refused(data, tmp_path, mode):
    """torchrun, a scheduler and Colab's runtime stop send SIGTERM. Its default ends a process with no cleanup, and
    a heartbeat lock would look alive for 3 minutes: every restart in that time refused."""
    env = {**os.environ, "GPT2LITE_LOCK": mode}
    run_dir = tmp_path / "run"
    first = start_training(run_args(data, run_dir), env)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 130, first.stderr.read()
    (line,) = first.stderr.read().strip().splitlines()
    assert line.startswith("train_gpt2.py: interrupted: ") and "--resume" in line, line
    assert mode == "flock" or not (run_dir / ".lock").exists(), "the heartbeat lock is removed"
    restart = train([*run_args(data, run_dir, max_steps=12), "--resume"], env)
    assert restart.returncode == 0, restart.stderr
    assert "taking over" not in restart.stdout


def test_a_heartbeat_lock_whose_process_is_gone_on_this_machine_is_taken_over_at_once(data, tmp_path):
    """SIGKILL leaves the heartbeat file with a fresh beat; on the machine that wrote it, the pid says it is gone."""
    env = {**os.environ, "GPT2LITE_LOCK": "heartbeat"}
    run_dir = tmp_path / "run"
    first = start_training(run_args(data, run_dir), env)
    first.kill()
    first.wait()
    holder = json.loads((run_dir / ".lock").read_text())
    assert holder["pid"] == first.pid and time.time() - holder["heartbeat"] < lock.STALE_SECONDS
    restart = train([*run_args(data, run_dir, max_steps=12), "--resume"], env)
    assert restart.returncode == 0, restart.stderr
    assert f"taking over the lock of process {first.pid} on {socket.gethostname()}, which is no longer running" in (
        restart.stdout
    )


def test_release_lets_a_beat_in_flight_finish_before_removing_the_lock(tmp_path, monkeypatch):
    """A beat that is writing when the run ends would write the lock file back after release removed it: on Drive,
    a lock with a fresh heartbeat and no process. Here a beat is slowed to be caught in flight."""
    monkeypatch.setenv("GPT2LITE_LOCK", "heartbeat")
    monkeypatch.setattr(lock, "HEARTBEAT_SECONDS", 0.05)
    in_flight, real_write = threading.Event(), lock.write_atomically

    def slow_write(path, write):
        if threading.current_thread().name == "run-dir heartbeat":
            in_flight.set()
            time.sleep(0.5)
        real_write(path, write)

    monkeypatch.setattr(lock, "write_atomically", slow_write)
    held = lock.RunLock(str(tmp_path), print)
    assert in_flight.wait(timeout=10)
    held.release()
    time.sleep(1.0)  # past the slowed beat
    assert not (tmp_path / ".lock").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "SIGTERM's own handler is back"
