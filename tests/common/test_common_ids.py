"""Identifiers are checked where they enter (atlasflow.common.ids)."""

from __future__ import annotations

import pytest

from atlasflow.common.errors import InvalidArgument
from atlasflow.common.ids import check_id, check_message_ids, is_valid_id
from atlasflow.labels.v1 import labels_pb2
from atlasflow.ranking.v1 import ranking_pb2


@pytest.mark.parametrize(
    "value",
    ["case-620dc976fbbc74ac6a93", "ser-5656c0a0b1d1c83808d9", "BDMAP_00000001", "a" * 256, "v1.2", "job:42", "0"],
)
def test_valid(value: str) -> None:
    assert is_valid_id(value)


@pytest.mark.parametrize(
    "value", ["", "../x", "..", "a..b", "a/b", "a\\b", " x", "x y", "-x", ".hidden", "a" * 257, "é", "x\n", "%2e%2e"]
)
def test_invalid(value: str) -> None:
    assert not is_valid_id(value)
    with pytest.raises(InvalidArgument) as err:
        check_id("case_id", value)
    assert err.value.reason == "INVALID_ID" and err.value.metadata == {"field": "case_id"}


def test_message_fields_repeated_and_nested() -> None:
    check_message_ids(labels_pb2.ExportDatasetRequest(case_ids=["case-1", "case-2"]))
    with pytest.raises(InvalidArgument) as err:
        check_message_ids(labels_pb2.ExportDatasetRequest(case_ids=["case-1", "../etc"]))
    assert err.value.metadata == {"field": "case_ids"}
    bad = labels_pb2.CreateLabelVersionRequest(case_id="case-1", provenance=labels_pb2.Provenance(job_id="a/b"))
    with pytest.raises(InvalidArgument) as err:
        check_message_ids(bad)
    assert err.value.metadata == {"field": "provenance.job_id"}
    check_message_ids(ranking_pb2.SubmitAttentionRequest())  # unset ids are the RPC's own business
