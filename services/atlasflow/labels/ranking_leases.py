"""ReviseLabels is tied to the reviewer's lease: labels asks ranking whether the caller holds the
case's lease right now (docs/security.md "Revisions need the lease").

`RankingLeases` calls RankingService.GetWorklistItem with labels' own service identity
(``svc:labels``, `atlasflow.common.policy.HANDOFF_CALLERS`). Ranking reports a lease only while
it is unexpired by ranking's clock, so the answer is ranking's: the revision is accepted only if
the item shows a lease whose reviewer is the caller (the token's subject). The check runs after
the request has been read and validated, immediately before the durable write; a lease that
expires during that write (milliseconds) does not undo the revision, which was made by the
holder. Afterwards the holder needs a lease again for the next revision; CompleteReview checks
the lease itself.

Answers: FAILED_PRECONDITION ``LEASE_NOT_HELD`` (metadata ``case_id``, ``cause``:
``not_in_worklist`` | ``no_lease`` | ``other_reviewer``) when the caller holds no lease (never
leased, expired, released, completed, another reviewer's); UNAVAILABLE
``LEASE_CHECK_UNAVAILABLE`` when ranking does not answer (nothing is written: the client may
retry with the same ``request_id``).
"""

from __future__ import annotations

from typing import Any

import grpc

from atlasflow.common.errors import FailedPrecondition, Unavailable
from atlasflow.labels.repository import DOMAIN
from atlasflow.ranking.v1 import ranking_pb2

#: seconds labels waits for ranking's answer
LEASE_CHECK_TIMEOUT_S = 10.0


def lease_not_held(case_id: str, cause: str) -> FailedPrecondition:
    return FailedPrecondition(
        "LEASE_NOT_HELD",
        "lease the case before revising its labels (or lease it again: the lease ended)",
        domain=DOMAIN,
        metadata={"case_id": case_id[:80], "cause": cause},
    )


class RankingLeases:
    """``await leases(case_id, reviewer)``: returns if ``reviewer`` holds ``case_id``'s unexpired
    lease in ranking, raises `lease_not_held` / Unavailable otherwise. ``stub``: a
    RankingServiceStub on an aio channel carrying labels' service token."""

    def __init__(self, stub: Any, timeout_s: float = LEASE_CHECK_TIMEOUT_S) -> None:
        self.stub = stub
        self.timeout_s = timeout_s

    async def __call__(self, case_id: str, reviewer: str) -> None:
        request = ranking_pb2.GetWorklistItemRequest(case_id=case_id)
        try:
            response = await self.stub.GetWorklistItem(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise lease_not_held(case_id, "not_in_worklist") from None
            raise Unavailable(
                "LEASE_CHECK_UNAVAILABLE",
                "the lease could not be checked with the ranking service; retry",
                domain=DOMAIN,
                metadata={"case_id": case_id[:80], "code": exc.code().name},
            ) from None
        item = response.item
        if not item.HasField("lease") or not item.lease.reviewer:
            raise lease_not_held(case_id, "no_lease")
        if item.lease.reviewer != reviewer:
            raise lease_not_held(case_id, "other_reviewer")
