"""Decisions read through the label service's gRPC API (`atlasflow.training.dataset.DecisionSource`).

The training service calls ``LabelService.ListLabelVersions`` (all cases, newest first, pages of
1000) as its own identity ``svc:training`` (role ``service``; `atlasflow.common.policy`
HANDOFF_CALLERS admits it to that RPC only). Versions come back in insertion order, newest
first, so the first version seen of a case is its head; the head's ``organ_provenance``
carries who decided each organ and in which version, the fields `decisions_of` reads. One
snapshot is taken per `refresh` (a round reads the decisions once, at its manifest stage), so
``case_ids()`` and ``head()`` agree with each other within a round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from atlasflow.common.auth import TokenSource
from atlasflow.common.clients import sync_channel
from atlasflow.common.errors import Unavailable
from atlasflow.common.tls import ClientTLS
from atlasflow.labels.v1 import labels_pb2, labels_pb2_grpc
from atlasflow.training.dataset import DOMAIN

_Stub: Callable[[grpc.Channel], Any] = labels_pb2_grpc.LabelServiceStub

_SOURCE = {
    labels_pb2.LABEL_SOURCE_AI: "ai",
    labels_pb2.LABEL_SOURCE_RADIOLOGIST: "radiologist",
    labels_pb2.LABEL_SOURCE_ORIGINAL: "original",
}


@dataclass(frozen=True)
class _Provenance:
    source: str
    model_version: str


@dataclass(frozen=True)
class _OrganProvenance:
    provenance: _Provenance
    version_id: str


@dataclass(frozen=True)
class HeadVersion:
    """The fields of a head label version that `atlasflow.training.dataset.decisions_of` reads."""

    version_id: str
    case_id: str
    ct_digest: str
    label_map_digest: str
    organ_provenance: dict[int, _OrganProvenance]


def head_of(v: labels_pb2.LabelVersion) -> HeadVersion:
    return HeadVersion(
        v.version_id,
        v.case_id,
        v.ct.digest,
        v.label_map.digest,
        {
            int(op.organ): _OrganProvenance(
                _Provenance(_SOURCE.get(op.provenance.source, ""), op.provenance.model_version), op.version_id
            )
            for op in v.organ_provenance
        },
    )


class LabelsDecisionSource:
    """A `DecisionSource` over ``LabelService`` at ``target`` (see the module docstring)."""

    def __init__(self, target: str, token: TokenSource, tls: ClientTLS, *, timeout_s: float = 60.0) -> None:
        self._channel = sync_channel(target, token=token, tls=tls)
        self._stub = _Stub(self._channel)
        self._timeout_s = timeout_s
        self._heads: dict[str, HeadVersion] | None = None

    def refresh(self) -> None:
        heads: dict[str, HeadVersion] = {}
        token = ""
        try:
            while True:
                page = self._stub.ListLabelVersions(
                    labels_pb2.ListLabelVersionsRequest(page_size=1000, page_token=token), timeout=self._timeout_s
                )
                for v in page.versions:
                    heads.setdefault(v.case_id, head_of(v))
                token = page.next_page_token
                if not token:
                    break
        except grpc.RpcError as exc:
            raise Unavailable(
                "LABELS_UNAVAILABLE",
                "the label service did not answer the decisions read",
                domain=DOMAIN,
                metadata={"code": exc.code().name if exc.code() else ""},
            ) from None
        self._heads = heads

    def _snapshot(self) -> dict[str, HeadVersion]:
        if self._heads is None:
            self.refresh()
        assert self._heads is not None
        return self._heads

    def case_ids(self) -> list[str]:
        self.refresh()  # a new walk starts: take a fresh snapshot
        return sorted(self._snapshot())

    def head(self, case_id: str) -> HeadVersion | None:
        return self._snapshot().get(case_id)

    def close(self) -> None:
        self._channel.close()
