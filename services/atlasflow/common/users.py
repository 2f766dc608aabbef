"""The local stack's demo users: a users file of scrypt password hashes (``atlasflow up``).

Only for the embedded default: in a cluster people log in at the hospital's OIDC provider and
no password ever reaches atlasflow. The file is JSON, mode 0600, in the stack's ``auth/``
directory::

    {"format": "atlasflow.users/1",
     "users": {"dr.demo": {"roles": ["reviewer"], "scrypt": {"salt": "<hex>", "hash": "<hex>",
                                                             "n": 16384, "r": 8, "p": 1}}}}

`create_demo_users` writes it with generated passwords (returned to the caller once, and kept
in ``demo-passwords.txt`` beside it, mode 0600, so a newcomer can log in); `UserFile.check`
verifies a password in constant time against the stored hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

FORMAT = "atlasflow.users/1"
#: the demo users `atlasflow up` creates: subject -> roles
DEMO_USERS: Mapping[str, Sequence[str]] = {
    "dr.demo": ("reviewer",),
    "annotator": ("annotator",),
    "admin": ("admin",),
}
USERS_FILE = "users.json"
PASSWORDS_FILE = "demo-passwords.txt"
# scrypt cost: N=2^14, r=8, p=1 (~16 MiB, tens of ms): the interactive-login figure of RFC 7914
_N, _R, _P = 1 << 14, 8, 1


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32)


def hash_password(password: str) -> dict[str, object]:
    salt = secrets.token_bytes(16)
    return {"salt": salt.hex(), "hash": _scrypt(password, salt, _N, _R, _P).hex(), "n": _N, "r": _R, "p": _P}


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


@dataclass(frozen=True)
class User:
    subject: str
    roles: tuple[str, ...]


class UserFile:
    """A users file, re-read when it changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, dict[str, object]] = {}

    def _load(self) -> dict[str, dict[str, object]]:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            doc = json.loads(self.path.read_text())
            if doc.get("format") != FORMAT:
                raise ValueError(f"{self.path} is not an {FORMAT} file")
            self._users = dict(doc.get("users", {}))
            self._stamp = stamp
        return self._users

    def check(self, subject: str, password: str) -> User | None:
        """The user when ``password`` is theirs; None otherwise (unknown users cost the same time)."""
        entry = self._load().get(subject)
        params = entry.get("scrypt") if isinstance(entry, dict) else None
        if not isinstance(params, dict):
            # same work as a real check: a wrong user name is not faster than a wrong password
            _scrypt(password, b"\0" * 16, _N, _R, _P)
            return None
        digest = _scrypt(
            password, bytes.fromhex(str(params["salt"])), int(params["n"]), int(params["r"]), int(params["p"])
        )
        if not hmac.compare_digest(digest, bytes.fromhex(str(params["hash"]))):
            return None
        assert isinstance(entry, dict)
        roles = entry.get("roles", [])
        return User(subject, tuple(str(r) for r in roles) if isinstance(roles, list) else ())


def write_users(path: Path, users: Mapping[str, tuple[Sequence[str], str]]) -> None:
    """Write ``users`` (subject -> (roles, password)) as a users file, mode 0600."""
    doc = {
        "format": FORMAT,
        "users": {s: {"roles": list(roles), "scrypt": hash_password(pw)} for s, (roles, pw) in users.items()},
    }
    _write_private(path, json.dumps(doc, indent=2))


def create_demo_users(directory: Path) -> dict[str, str] | None:
    """Create ``<directory>/users.json`` with `DEMO_USERS` and generated passwords, unless it
    exists. Returns subject -> password when created (also written to ``demo-passwords.txt``,
    0600), None when the file was already there."""
    path = directory / USERS_FILE
    if path.exists():
        return None
    passwords = {s: secrets.token_urlsafe(12) for s in DEMO_USERS}
    write_users(path, {s: (DEMO_USERS[s], pw) for s, pw in passwords.items()})
    lines = [f"{s}\t{pw}\t{','.join(DEMO_USERS[s])}" for s, pw in passwords.items()]
    _write_private(
        directory / PASSWORDS_FILE, "# user\tpassword\troles (atlasflow up demo users)\n" + "\n".join(lines) + "\n"
    )
    return passwords
