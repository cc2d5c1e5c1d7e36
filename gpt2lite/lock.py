"""
One run directory, one writer. A training run holds an exclusive lock on its --run-dir for its whole life, so a
second process (another Colab tab, a re-run cell, a scheduler restarting a job it wrongly thinks died) is refused
before it writes anything, instead of interleaving its checkpoints and log with the first one's.

The lock is the OS's: fcntl.flock on `run_dir/.lock`, which dies with its process, so a killed run never blocks
the next. Where flock is missing or cannot be trusted (Windows; a network or FUSE mount such as Google Drive on
Colab, where another machine does not see it), the lock file itself is the lock: it holds the pid, the host and a
heartbeat that the running process refreshes, and a heartbeat older than STALE_SECONDS lets a new run take over, as
does a holder on this machine whose process is gone. The lock goes when its process ends, short of SIGKILL: SIGTERM
(torchrun, a scheduler, Colab's runtime stop) ends the run as Ctrl-C does, and an exit releases it.
"""

import atexit
import json
import os
import signal
import socket
import threading
import time

from gpt2lite.cli import InputError
from gpt2lite.files import write_atomically

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"
HEARTBEAT_SECONDS = 30.0  # how often a heartbeat lock is refreshed
STALE_SECONDS = 180.0  # a heartbeat this old belongs to a process that is gone
BEAT_WAIT_SECONDS = 60.0  # the longest release waits for a beat in flight (a hung mount must not hang the exit)
# filesystems where flock is local to one machine, or not implemented: Drive, NFS, SMB, sshfs, gcsfuse, ...
SHARED_FILESYSTEMS = ("fuse", "nfs", "cifs", "smb", "9p", "afs", "ceph", "lustre", "gpfs")


def filesystem_type(path: str) -> str:
    """The type of the filesystem that holds path, from /proc/mounts ('' where that cannot be read)."""
    path, best, kind = os.path.realpath(path), "", ""
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return ""
    for mount_point, fs_type in mounts:
        mount_point = mount_point.replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, kind = mount_point, fs_type
    return kind


def flock_is_trusted(run_dir: str) -> bool:
    if os.environ.get("GPT2LITE_LOCK") == "heartbeat":  # the fallback on any filesystem, for its tests
        return False
    return fcntl is not None and not filesystem_type(run_dir).startswith(SHARED_FILESYSTEMS)


def holder_line(run_dir: str, holder: dict, now: float) -> str:
    """The one line a refused process prints: who holds the directory, since when, and what to do."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", now)))
    who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
    beat = f", last heartbeat {now - holder['heartbeat']:.0f} s ago" if "heartbeat" in holder else ""
    return (
        f"{run_dir} is in use by {who} since {since}{beat}: wait for that run to end or stop it, "
        "or give another --run-dir"
    )


def read_holder(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def flock_held(path: str) -> bool:
    """Whether another process holds the flock on path; takes nothing and writes nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # no lock file: no run has held this directory
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False  # flock does not work here: the heartbeat says
    finally:
        os.close(fd)


def lock_problem(run_dir: str) -> str | None:
    """The line to print if another live process holds run_dir, else None. Writes nothing: for the checks before
    a run starts, and for --plan, which reports it as a warning."""
    path = os.path.join(run_dir, LOCK_NAME)
    holder, now = read_holder(path), time.time()
    trusted = flock_is_trusted(run_dir)
    if trusted and flock_held(path):
        return holder_line(run_dir, holder, now)
    if not trusted and live_heartbeat(holder, now):
        return holder_line(run_dir, holder, now)
    return None


def live_heartbeat(holder: dict, now: float) -> bool:
    """Whether a heartbeat lock file's holder is another process that is still alive: on this machine, whether its
    process runs; elsewhere, by its heartbeat's age."""
    if not holder or is_mine(holder) or (on_this_machine(holder) and process_gone(holder.get("pid"))):
        return False
    return now - holder.get("heartbeat", 0) < STALE_SECONDS


def is_mine(holder: dict) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def boot_id() -> str | None:
    """What tells this boot of this machine from another with the same host name (Linux; None elsewhere)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def pid_namespace() -> str | None:
    """Which process ids this process sees (Linux): two containers may share a host name and a boot, not their pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def on_this_machine(holder: dict) -> bool:
    """Whether the holder's pid can be looked up here: the same host, boot and process-id namespace."""
    here = {"host": socket.gethostname(), "boot": boot_id(), "pids": pid_namespace()}
    return all(holder.get(key) == value for key, value in here.items())


def process_gone(pid) -> bool:
    """Whether no process of this pid runs here (False where that cannot be told: on Windows, os.kill ends it)."""
    if os.name == "nt" or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists is checked
    except ProcessLookupError:
        return True
    except OSError:  # it exists, and belongs to someone else
        return False
    return False


def end_like_ctrl_c(signum: int, frame):
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


class RunLock:
    """The exclusive lock on a run directory, from `acquire` until `release` (or the process's end)."""

    def __init__(self, run_dir: str, say):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.run_dir, self.file, self.stop, self.beating = run_dir, None, threading.Event(), None
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(), "boot": boot_id(), "pids": pid_namespace(),
                       "since": time.time()}  # fmt: skip
        trusted = flock_is_trusted(run_dir)
        if trusted:
            self.take_flock()
        if not trusted or self.file is None:
            self.take_heartbeat(say)
        self.sigterm = None  # the handler SIGTERM had before, while this lock replaces it
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            # SIGTERM's default ends the process at once, with no `finally`: a heartbeat lock would stay behind, and
            # look alive for STALE_SECONDS. Ended as Ctrl-C ends it, the run unwinds and releases its lock.
            self.sigterm = signal.signal(signal.SIGTERM, end_like_ctrl_c)
        atexit.register(self.release)  # however the interpreter exits, even before the run's `with` is entered

    def take_flock(self):
        file = open(self.path, "a+b")  # a file object: dropped without release, it closes, and the flock goes
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise InputError(holder_line(self.run_dir, read_holder(self.path), time.time())) from None
        except OSError:  # flock is not supported on this filesystem after all
            file.close()
            return
        # the holder's pid and host, for the line a refused process prints; written in place, since the lock
        # belongs to this file (a rename would hand the next process a new, unlocked one)
        file.truncate(0)
        file.write(json.dumps(self.holder).encode())
        file.flush()
        self.file = file

    def take_heartbeat(self, say):
        holder, now = read_holder(self.path), time.time()
        if live_heartbeat(holder, now):
            raise InputError(holder_line(self.run_dir, holder, now))
        if holder and not is_mine(holder):
            age = f"whose last heartbeat is {now - holder.get('heartbeat', 0):.0f} s old"
            gone = on_this_machine(holder) and process_gone(holder.get("pid"))
            say(
                f"{self.run_dir}: taking over the lock of process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, {'which is no longer running' if gone else age}"
            )
        self.beat()
        self.beating = threading.Thread(target=self.keep_beating, daemon=True, name="run-dir heartbeat")
        self.beating.start()

    def beat(self):
        self.holder["heartbeat"] = time.time()
        write_atomically(self.path, lambda f: f.write(json.dumps(self.holder).encode()))

    def keep_beating(self):
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                self.beat()
            except OSError:  # a full or vanished disk: the run itself will say so
                pass

    def release(self):
        if self.stop.is_set():
            return
        self.stop.set()
        atexit.unregister(self.release)
        if self.sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.sigterm)
        if self.beating is not None:
            # a beat already writing would put the file back after its removal: let it finish first (a lock left by
            # a hung mount is taken over by its age, or on this machine at once, since this process is gone)
            self.beating.join(timeout=BEAT_WAIT_SECONDS)
        if self.file is not None:
            self.file.close()  # the flock goes with it
        elif is_mine(read_holder(self.path)):
            os.remove(self.path)  # a heartbeat lock is released by removing it


def remove_leftovers(run_dir: str, say):
    """Delete the temporary files of writes that a killed process never finished (up to a checkpoint's size each:
    1.39 GiB for GPT-2 124M, which counts against Drive's quota); only under the run's lock, so never a live one."""
    freed = count = 0
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.startswith(".tmp-") and os.path.isfile(path):
            freed += os.path.getsize(path)
            os.remove(path)
            count += 1
    if count:
        say(f"{run_dir}: removed {count} unfinished temporary file(s) of an earlier run, {freed / 1e6:,.1f} MB freed")
