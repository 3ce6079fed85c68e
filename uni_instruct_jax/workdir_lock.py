"""One training run per workdir: an exclusive lock file W/run.lock with a heartbeat.

The lock file is JSON {host, pid, start_time, heartbeat, token}. Process 0 of a run creates it
with create-exclusive semantics, a daemon thread refreshes `heartbeat` every `heartbeat_s`, and it
is removed on any exit (normal return, exception, Ctrl-C, SIGTERM; SIGTERM is turned into
SystemExit while the lock is held so the `finally` runs). A lock is stale, and taken over with a
one-line note, when its owner is on this host and its pid is gone, or when its heartbeat is older
than `stale_s` (a run killed on another machine). A live holder refuses the run with one line
naming it (`WorkdirLockedError`, a `SetupError`: exit 2 from the CLI).

Works through `paths` (etils.epath), so a gs:// workdir is locked too. Limitation: object stores
reached through epath offer no create-if-absent, so there the lock is written and read back, and
the token compared; two runs starting within the same second may both see their own token if
the store is not read-after-write consistent (GCS is). Locally a hard link of the complete
record is atomic and fails when the lock exists.
--mode=sample/eval never take the lock (they only read).
"""

import json
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional

from uni_instruct_jax import paths
from uni_instruct_jax.builders import SetupError

LOCK_NAME = "run.lock"


class WorkdirLockedError(SetupError):
  """Another live run holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """Context manager holding W/run.lock for one run (see the module docstring)."""

  def __init__(self, workdir: paths.PathLike, heartbeat_s: float = 30.0, stale_s: float = 300.0):
    self.path = paths.workdir_path(workdir) / LOCK_NAME
    self.heartbeat_s = heartbeat_s
    self.stale_s = stale_s
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time(),
                  "token": uuid.uuid4().hex}
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._previous_sigterm: Any = None
    self.held = False

  # ---------------------------------------------------------------------------------------------
  # Lock file

  def _record(self) -> str:
    return json.dumps({**self.owner, "heartbeat": time.time()}, sort_keys=True) + "\n"

  def _create(self) -> bool:
    """Creates the lock file if absent; True when this run now owns it."""
    if paths.is_url(self.path):
      if self.path.exists():
        return False
      self.path.write_text(self._record())
      return self._read().get("token") == self.owner["token"]
    # Locally: the full record in a private file, hard-linked into place (fails if the lock
    # exists), so a kill never leaves a lock file without its owner.
    tmp = self.path.with_name(f".{LOCK_NAME}.{self.owner['token']}")
    tmp.write_text(self._record())
    try:
      os.link(tmp, self.path)
    except FileExistsError:
      return False
    except OSError:  # a filesystem without hard links: create-exclusive, then write
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(self._record())
    finally:
      tmp.unlink()
    return True

  def _read(self) -> Dict[str, Any]:
    """The lock's record ({} if it vanished; {'unreadable': True} if it is not JSON)."""
    try:
      record = json.loads(self.path.read_text())
    except FileNotFoundError:
      return {}
    except (ValueError, OSError):
      return {"unreadable": True}
    return record if isinstance(record, dict) else {"unreadable": True}

  def _stale_reason(self, record: Dict[str, Any]) -> Optional[str]:
    """Why the holder in `record` is gone, or None if it may be alive."""
    if record.get("unreadable"):
      age = time.time() - self.path.stat().st_mtime
      return f"unreadable lock file {age:.0f} s old" if age > self.stale_s else None
    if record.get("host") == self.owner["host"] and not _pid_alive(int(record.get("pid", 0))):
      return f"pid {record.get('pid')} is not running on {record.get('host')}"
    age = time.time() - float(record.get("heartbeat", 0))
    if age > self.stale_s:
      return f"its heartbeat is {age:.0f} s old (> {self.stale_s:.0f} s)"
    return None

  @staticmethod
  def describe(record: Dict[str, Any]) -> str:
    if record.get("unreadable"):
      return "an unreadable lock file"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("start_time", 0))))
    return f"pid {record.get('pid')} on {record.get('host')} (started {started})"

  # ---------------------------------------------------------------------------------------------
  # Acquire / release

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (taking over a stale one with a note) or raises WorkdirLockedError."""
    for _ in range(3):
      if self._create():
        break
      record = self._read()
      if not record:  # released meanwhile
        continue
      reason = self._stale_reason(record)
      if reason is None:
        raise WorkdirLockedError(
            f"workdir {self.path.parent} is in use by another run: {self.describe(record)}; "
            f"lock file {self.path} (delete it only if that run is gone)")
      print(f"note: taking over the stale lock of {self.describe(record)} in {self.path.parent} "
            f"({reason})", flush=True)
      try:
        self.path.unlink()
      except FileNotFoundError:
        pass
    else:
      raise WorkdirLockedError(f"could not take the lock {self.path}: it keeps reappearing")
    self.held = True
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()
    if threading.current_thread() is threading.main_thread():
      self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_exit)
    return self

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        if self._read().get("token") != self.owner["token"]:
          print(f"warning: lost the workdir lock {self.path} to another run", flush=True)
          return
        paths.write_text(self.path, self._record())
      except OSError as e:  # a full disk must not kill the run through the heartbeat
        print(f"warning: cannot refresh the workdir lock {self.path}: {e}", flush=True)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if this run still owns it."""
    if not self.held:
      return
    self.held = False
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._previous_sigterm is not None:
      signal.signal(signal.SIGTERM, self._previous_sigterm)
      self._previous_sigterm = None
    try:
      if self._read().get("token") == self.owner["token"]:
        self.path.unlink()
    except OSError as e:
      print(f"warning: cannot remove the workdir lock {self.path}: {e}", flush=True)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _raise_exit(signum, frame) -> None:
  del frame
  raise SystemExit(128 + signum)
