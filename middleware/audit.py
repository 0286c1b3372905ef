"""The audit log: who revealed, exported, replayed or purged which dead letters, and when.

One JSON object per line, appended to the file named by ``audit.path`` in config/middleware.yaml
(default ``var/audit.log``). The file is opened ``O_APPEND`` (never rewritten, never truncated),
created 0600, and never through a symbolic link. A record carries ids, counts and names, never a
body. Shared by the CLI and any other front end (a web console) that acts on dead letters.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from middleware.errors import AuditError

OPERATOR_ENV = "MIDDLEWARE_OPERATOR"


def os_user() -> str:
    """The operating-system user running this process."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no LOGNAME/USER and no passwd entry (a bare container)
        return f"uid {os.getuid()}"


def operator() -> str:
    """Who acts: ``MIDDLEWARE_OPERATOR`` if set (a console passes its signed-in user), else the OS user."""
    return os.environ.get(OPERATOR_ENV, "").strip() or os_user()


@dataclass(frozen=True)
class AuditLog:
    """An append-only JSON-lines file of operator actions on dead letters."""

    path: Path

    def check(self) -> None:
        """Fail now (AuditError) if a record could not be appended, before anything is done."""
        os.close(self._open())

    def append(self, command: str, ids: Iterable[str], **details: Any) -> dict[str, Any]:
        """Append one record (who, when, which command, which ids, how many, ``details``); fsynced.

        Raises AuditError when the log cannot be written: callers do the audited thing only after
        (for a disclosure) or check first with :meth:`check` (for a change)."""
        id_list = list(ids)
        record: dict[str, Any] = {
            "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "operator": operator(),
            "os_user": os_user(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": command,
            "ids": id_list,
            "count": details.pop("count", len(id_list)),
            **details,
        }
        line = (json.dumps(record, default=str, ensure_ascii=False) + "\n").encode("utf-8")
        fd = self._open()
        try:
            os.write(fd, line)  # one write: O_APPEND keeps concurrent writers' lines whole
            os.fsync(fd)
        except OSError as exc:
            raise AuditError(f"cannot write the audit log {self.path}: {exc.strerror or exc}",
                             hint="fix audit.path in config/middleware.yaml or the file's permissions") from None
        finally:
            os.close(fd)
        return record

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            reason = "it is a symbolic link" if self.path.is_symlink() else (exc.strerror or str(exc))
            raise AuditError(f"cannot open the audit log {self.path}: {reason}",
                             hint="fix audit.path in config/middleware.yaml or the file's permissions") from None
