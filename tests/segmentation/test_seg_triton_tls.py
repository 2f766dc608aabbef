"""Mutual TLS to Triton (issue 13, "Triton"): the stock ``tritonserver`` binary of the
nvidia-pytriton wheel, started with the chart's TLS flags (``--grpc-use-ssl-mutual`` and
certificate FILES from `atlasflow.common.tls.LocalCA`, HTTP off), serves segmentation's
`TritonSegmenter` and training's roll-out client when they present a certificate of that CA, and
refuses them in the handshake without one, with one of another CA, or in plaintext. Plaintext to a
Triton on another host is refused before any connection; the removed access token is a clear
error. One module-scoped server (tiny test ensemble, explicit model control)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from atlasflow.common.errors import InvalidArgument, Unavailable
from atlasflow.common.tls import ClientTLS, LocalCA
from atlasflow.segmentation.ensemble import triton_model_name
from atlasflow.segmentation.settings import PREFIX, SegmentationSettings
from atlasflow.segmentation.triton_client import TritonSegmenter, triton_grpc_client
from atlasflow.segmentation.triton_repo import write_repository
from atlasflow.segmentation.triton_server import access_token_refused
from atlasflow.testing.triton import BundledTriton
from atlasflow.training.rollout import TritonRepositoryRollout
from atlasflow.training.versions import EnsembleVersion

TINY = Path(__file__).resolve().parent / "tiny_ensembles" / "tiny-a-v1.json"
MODEL = triton_model_name("tiny-a-v1")


@dataclass
class Stack:
    server: BundledTriton
    repo: Path
    good: ClientTLS  # segmentation's certificate of the Triton CA
    no_cert: ClientTLS  # verifies the server, presents nothing
    foreign: ClientTLS  # a certificate of another CA


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("triton-tls")
    ca = LocalCA.create_or_load(root / "ca")
    server_cert = ca.issue("triton")
    seg = ca.issue("segmentation", server=False)
    other = LocalCA.create_or_load(root / "other-ca")
    intruder = other.issue("segmentation", server=False)
    repo = root / "models"
    write_repository(repo, TINY)
    good = ClientTLS(ca_file=str(ca.ca_file), cert_file=str(seg.cert_file), key_file=str(seg.key_file))
    tls_args = [
        "--grpc-use-ssl=true",
        "--grpc-use-ssl-mutual=true",
        f"--grpc-server-cert={server_cert.cert_file}",
        f"--grpc-server-key={server_cert.key_file}",
        f"--grpc-root-cert={ca.ca_file}",
        "--allow-http=false",
    ]
    server = BundledTriton(
        repo,
        root / "work",
        [MODEL],
        extra_args=["--model-control-mode=explicit", f"--load-model={MODEL}", "--exit-timeout-secs=5", *tls_args],
        client_tls=good,
    ).start(timeout_s=240)
    try:
        yield Stack(
            server,
            repo,
            good,
            ClientTLS(ca_file=str(ca.ca_file)),
            ClientTLS(ca_file=str(ca.ca_file), cert_file=str(intruder.cert_file), key_file=str(intruder.key_file)),
        )
    except Exception:
        print(server.log_tail(60))
        raise
    finally:
        server.stop()


def _ct() -> tuple[np.ndarray, np.ndarray]:
    vol = np.full((24, 24, 16), -1000, dtype=np.int16)
    vol[6:18, 6:18, 4:12] = 60
    return vol, np.diag([2.0, 2.0, 3.0, 1.0])


def test_segmentation_client_with_its_certificate_infers(stack: Stack) -> None:
    with TritonSegmenter(stack.server.grpc_url, MODEL, tls=stack.good, shm="off") as seg:
        assert seg.ready()
        vol, affine = _ct()
        out = seg.segment(vol, affine)
        assert out.labels.shape == vol.shape and seg.last_transport == "grpc"


@pytest.mark.parametrize("who", ["no_cert", "foreign", "plaintext"])
def test_a_client_without_a_certificate_of_the_ca_is_refused(stack: Stack, who: str) -> None:
    tls = None if who == "plaintext" else getattr(stack, who)
    with TritonSegmenter(stack.server.grpc_url, MODEL, tls=tls, shm="off", connect_retries=0) as seg:
        assert not seg.ready()
        with pytest.raises(Unavailable) as exc:
            seg.segment(*_ct())
        assert exc.value.reason == "TRITON_UNAVAILABLE"
    # the roll-out's repository API behind the same handshake
    client = triton_grpc_client(stack.server.grpc_url, tls)
    try:
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException):
            client.get_model_repository_index(client_timeout=10.0)
    finally:
        client.close()


def test_training_rollout_client_uses_the_repository_api_over_mutual_tls(stack: Stack, tmp_path: Path) -> None:
    """The roll-out's own client (`TritonRepositoryRollout.client`) with the training service's
    certificate reaches the repository API; with another CA's, a roll-out fails as a load
    failure (the full write + load + unload flow: test_training_rollout.py)."""
    folder = tmp_path / "versions" / "tiny-a-tls-0123456789ab"
    folder.mkdir(parents=True)
    raw = json.loads(TINY.read_text())
    raw["version"] = folder.name
    (folder / "ensemble.json").write_text(json.dumps(raw))
    version = EnsembleVersion(folder.name, "sha256:" + "0" * 64, folder)
    refused = TritonRepositoryRollout(stack.server.grpc_url, tmp_path / "repo", tls=stack.foreign, ready_timeout_s=30)
    with pytest.raises(Unavailable) as exc:
        refused(version)
    assert exc.value.reason == "TRITON_LOAD_FAILED"
    client = TritonRepositoryRollout(stack.server.grpc_url, stack.repo, tls=stack.good).client()
    index = {m.name: m.state for m in client.get_model_repository_index(client_timeout=10.0).models}
    assert index[MODEL] == "READY"
    assert client.is_model_ready(MODEL)
    client.close()


def test_plaintext_only_to_loopback_and_no_access_token() -> None:
    with pytest.raises(InvalidArgument) as exc:
        TritonSegmenter("10.1.2.3:8001", MODEL)
    assert exc.value.reason == "TRITON_TLS_REQUIRED"
    with pytest.raises(InvalidArgument):
        TritonRepositoryRollout("triton.atlasflow.svc:8001", "/nonexistent").client()
    TritonSegmenter("10.1.2.3:8001", MODEL, allow_plaintext=True).close()  # knowingly plaintext: built
    TritonSegmenter("localhost:8001", MODEL).close()
    # TLS settings: the service's own certificate is the default client certificate
    s = SegmentationSettings.from_env(
        PREFIX,
        {
            f"{PREFIX}TRITON_TLS_CA_FILE": "/tls/ca.crt",
            f"{PREFIX}TLS_CERT_FILE": "/tls/tls.crt",
            f"{PREFIX}TLS_KEY_FILE": "/tls/tls.key",
        },
    )
    assert s.triton_tls() == ClientTLS(ca_file="/tls/ca.crt", cert_file="/tls/tls.crt", key_file="/tls/tls.key")
    assert not SegmentationSettings.from_env(PREFIX, {}).triton_tls().enabled
    # the removed access token: a clear error, never silently ignored
    old = SegmentationSettings.from_env(PREFIX, {f"{PREFIX}TRITON_ACCESS_TOKEN": "x" * 32})
    with pytest.raises(InvalidArgument) as exc:
        old.triton_tls()
    assert exc.value.reason == "TRITON_ACCESS_TOKEN_UNSUPPORTED"
    with pytest.raises(InvalidArgument):
        TritonSegmenter("127.0.0.1:8001", MODEL, access_token="x" * 32)
    assert "no longer used" in access_token_refused({"ATLASFLOW_TRITON_ACCESS_TOKEN": "t"})
    assert access_token_refused({}) == ""
