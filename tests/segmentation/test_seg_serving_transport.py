"""Transport between the segmentation service and Triton: a 512x512x600 int16 CT round-trips
through `TritonSegmenter` to the real (wheel-bundled) tritonserver over system shared memory
and over gRPC payloads; the shared-memory fallback and the message-limit error.

The served model is a test-only Python-backend "echo" with the pipeline model's exact config
(`triton_repo.config_pbtxt`): labels = low byte of each HU value, heatmap = high byte, so
every voxel of the 315 MB request and the 2 x 157 MB response is checked without running the
ensemble on 157 M voxels.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from atlasflow.common.errors import ResourceExhausted
from atlasflow.segmentation.triton_client import TritonSegmenter, is_loopback
from atlasflow.segmentation.triton_repo import config_pbtxt
from atlasflow.testing.triton import BundledTriton

SHAPE = (512, 512, 600)
ECHO_PY = """
import numpy as np
import triton_python_backend_utils as pb


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            vol = pb.get_input_tensor_by_name(r, "volume").as_numpy()
            u8 = vol.view(np.uint8).reshape(*vol.shape, 2)  # little-endian: [..., 0] = low byte
            out.append(pb.InferenceResponse(output_tensors=[
                pb.Tensor("labels", np.ascontiguousarray(u8[..., 0])),
                pb.Tensor("heatmap", np.ascontiguousarray(u8[..., 1])),
                pb.Tensor("organ_stats", np.zeros((9, 4), np.float64)),
                pb.Tensor("weights_trained", np.zeros(1, np.uint8)),
            ]))
        return out
"""


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BundledTriton]:
    tmp = tmp_path_factory.mktemp("echo")
    model = tmp / "models" / "echo"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(config_pbtxt("echo", "unused.json", kind="cpu"))
    (model / "1" / "model.py").write_text(ECHO_PY)
    srv = BundledTriton(
        tmp / "models",
        tmp,
        ["echo"],
        extra_args=[
            "--backend-config=python,shm-default-byte-size=67108864",
            "--backend-config=python,shm-growth-byte-size=67108864",
        ],
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def big_ct() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(-1024, 3072, size=SHAPE, dtype=np.int16)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_512x512x600_ct_round_trips(echo: BundledTriton, big_ct: np.ndarray, mode: str) -> None:
    with TritonSegmenter(echo.grpc_url, "echo", shm=mode) as client:
        t0 = time.perf_counter()
        out = client.segment(big_ct, np.eye(4))
        seconds = time.perf_counter() - t0
        assert client.last_transport == ("shm" if mode == "on" else "grpc")
    print(f"\n{SHAPE} int16 ({big_ct.nbytes / 1e6:.0f} MB) via {client.last_transport}: {seconds:.2f} s")
    raw = big_ct.view(np.uint8).reshape(*SHAPE, 2)
    assert out.labels.shape == SHAPE and out.heatmap.shape == SHAPE
    assert np.array_equal(out.labels, raw[..., 0]) and np.array_equal(out.heatmap, raw[..., 1])
    assert not any(
        p.name.startswith(f"atlasflow_{os.getpid()}_") for p in Path("/dev/shm").iterdir()
    )  # regions unlinked


def test_shm_registration_failure_falls_back_to_grpc(echo: BundledTriton, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = np.arange(24 * 20 * 16, dtype=np.int16).reshape(24, 20, 16)
    with TritonSegmenter(echo.grpc_url, "echo", shm="auto") as client:

        def refuse(name, key, byte_size, **kw):
            # what a server on another host answers: it cannot open our /dev/shm key
            raise InferenceServerException(
                f"Unable to open shared memory region: '{key}'", status="StatusCode.INVALID_ARGUMENT"
            )

        monkeypatch.setattr(client._client, "register_system_shared_memory", refuse)
        out = client.segment(vol, np.eye(4))
        assert client.last_transport == "grpc" and not client._shm_usable  # auto: stop trying
        assert np.array_equal(out.labels, vol.view(np.uint8).reshape(*vol.shape, 2)[..., 0])
        client.segment(vol, np.eye(4))
        assert client.last_transport == "grpc"


@pytest.mark.parametrize(
    ("url", "mode", "expected"),
    [
        ("127.0.0.1:8001", "auto", True),
        ("localhost:8001", "auto", True),
        ("[::1]:8001", "auto", True),
        ("10.0.0.5:8001", "auto", False),
        ("triton.atlasflow.svc:8001", "auto", False),
        ("10.0.0.5:8001", "on", True),
        ("127.0.0.1:8001", "off", False),
    ],
)
def test_shm_mode_selection(url: str, mode: str, expected: bool) -> None:
    # plaintext to another host only when the deployment says so (test_seg_triton_tls.py)
    with TritonSegmenter(url, "m", shm=mode, allow_plaintext=not is_loopback(url)) as client:
        assert client._shm_usable is expected
    assert is_loopback("127.0.0.1:1") and not is_loopback("192.168.1.2:1")


def test_shm_mode_from_environment_and_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATLASFLOW_SEGMENTATION_TRITON_SHM", "off")
    with TritonSegmenter("127.0.0.1:1", "m") as client:
        assert client.shm_mode == "off" and not client._shm_usable
    with pytest.raises(ValueError):
        TritonSegmenter("127.0.0.1:1", "m", shm="sometimes")


def test_message_over_client_limit_is_resource_exhausted(echo: BundledTriton, big_ct: np.ndarray) -> None:
    with TritonSegmenter(echo.grpc_url, "echo", shm="off", max_message_bytes=64 << 20) as client:
        with pytest.raises(ResourceExhausted) as err:
            client.segment(big_ct[:, :, :200], np.eye(4))
    assert err.value.reason == "TRITON_MESSAGE_TOO_LARGE"
