"""Identifiers are checked where they enter the system, before any of them touches a path, a
URL or a query.

Every string field of a request whose name ends in ``_id`` (or a repeated ``_ids``) that is set
must be an atlasflow identifier: 1-256 characters from ``A-Z a-z 0-9 . _ - :``, starting with a
letter or digit, and never containing ``..``. atlasflow's own ids (``case-…``, ``ser-…``, job
and version ids, hex digests) and the usual dataset case names (``BDMAP_00000001``) pass; a
``../`` or a path separator does not. The server interceptor (`atlasflow.common.server`) checks
every request message, streamed ones included, and answers INVALID_ARGUMENT with reason
``INVALID_ID`` (metadata ``field``); whether an id is required stays the RPC's own rule, and
the few fields in `SELF_CHECKED` keep their service's documented check.
"""

from __future__ import annotations

import re

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from atlasflow.common.errors import InvalidArgument

DOMAIN = "atlasflow"
MAX_ID_CHARS = 256
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,255}")


def is_valid_id(value: str) -> bool:
    return bool(_ID.fullmatch(value)) and ".." not in value


def check_id(field: str, value: str) -> None:
    """InvalidArgument(INVALID_ID) unless ``value`` is a well-formed identifier."""
    if not is_valid_id(value):
        raise InvalidArgument(
            "INVALID_ID",
            f"{field} is not a valid identifier (1-{MAX_ID_CHARS} of A-Z a-z 0-9 . _ - :, no '..')",
            domain=DOMAIN,
            metadata={"field": field},
        )


#: Id fields their service checks with its own, stricter, documented rule (ingest's upload_id:
#: INVALID_UPLOAD_ID, a client-chosen key that never becomes a path: its file name is a hash).
SELF_CHECKED = frozenset({"upload_id"})


def _is_id_field(fd: FieldDescriptor) -> bool:
    return (
        fd.type == FieldDescriptor.TYPE_STRING
        and (fd.name.endswith("_id") or fd.name.endswith("_ids"))
        and fd.name not in SELF_CHECKED
    )


def check_message_ids(message: Message, prefix: str = "") -> None:
    """`check_id` on every set ``*_id`` / ``*_ids`` string field of ``message`` and of the
    messages it contains."""
    for fd, value in message.ListFields():
        name = prefix + fd.name
        if _is_id_field(fd):
            for v in value if fd.is_repeated else (value,):
                if v:
                    check_id(name, v)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type and not fd.message_type.GetOptions().map_entry:
            for m in value if fd.is_repeated else (value,):
                check_message_ids(m, name + ".")
