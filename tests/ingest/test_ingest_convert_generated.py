"""`atlasflow convert` vs dcm2niix on cases DERIVED from real slices (atlasflow.testing.gen_cases):
patient positions, RLE / JPEG-LS lossless, Legacy Converted Enhanced CT, a tilt revealed only
by orientation + position, a 300-slice series, and the 1,000-slice memory bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_ingest_convert import (
    ATLASFLOW,
    assert_same,
    assert_tilt_close,
    canonical,
    run_atlasflow,
    run_dcm2niix,
)

from atlasflow.cli.demo_series import write_demo_series
from atlasflow.testing import gen_cases
from atlasflow.testing.data import TEST_DATA

EXAMPLE_CT = TEST_DATA / "totalsegmentator/tests/reference_files/example_ct.nii.gz"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled real CT as an HFS series (122x101x112, 3 mm, signed int16)."""
    out = tmp_path_factory.mktemp("demo")
    write_demo_series(EXAMPLE_CT, out)
    return out


@pytest.fixture(scope="module")
def demo_nifti(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo_nii") / "hfs.nii"
    assert run_atlasflow(demo, out).returncode == 0
    return out


@pytest.fixture(scope="module")
def ts_nifti(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ts_nii") / "ts.nii"
    assert run_atlasflow(gen_cases.TS_DICOM, out).returncode == 0
    return out


def _convert_both(src: Path, tmp: Path) -> tuple[Path, list[Path], str]:
    ours = tmp / "ours.nii"
    run = run_atlasflow(src, ours)
    assert run.returncode == 0, run.stderr
    d2n_run, d2n_out = run_dcm2niix(src, tmp / "d2n")
    assert d2n_run.returncode == 0, d2n_run.stdout
    return ours, d2n_out, run.stdout + run.stderr


@pytest.mark.parametrize("position", list(gen_cases.POSITIONS))
def test_patient_positions(position: str, demo: Path, demo_nifti: Path, tmp_path: Path) -> None:
    src = gen_cases.write_position(demo, tmp_path / position, position)
    ours, d2n_out, _ = _convert_both(src, tmp_path)
    assert len(d2n_out) == 1
    assert_same(ours, d2n_out[0])
    # same anatomy at the same patient coordinates: identical to the HFS conversion in RAS
    assert_same(ours, demo_nifti)
    stored = nib.load(ours)
    if position in ("HFDR", "HFDL", "FFDR", "FFDL"):  # rows/columns swapped on disk
        assert stored.shape == (101, 122, 112)
    assert np.linalg.det(stored.affine[:3, :3]) > 0


@pytest.mark.parametrize("syntax", ["rle", "jpegls"])
def test_lossless_reencodings(syntax: str, ts_nifti: Path, tmp_path: Path) -> None:
    src = gen_cases.write_reencoded(tmp_path / syntax, syntax, count=6)
    ours, d2n_out, _ = _convert_both(src, tmp_path)
    assert_same(ours, d2n_out[0])
    a, a_hu = canonical(ours)
    b, b_hu = canonical(ts_nifti)  # the J2K original: lossless means identical HU
    assert np.array_equal(a_hu, b_hu[:, :, :6])
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


def test_legacy_converted_enhanced_ct(ts_nifti: Path, tmp_path: Path) -> None:
    src = gen_cases.write_enhanced(gen_cases.TS_DICOM, tmp_path / "enhanced")
    assert len(list(src.iterdir())) == 1  # one multi-frame instance
    ours, d2n_out, _ = _convert_both(src, tmp_path)
    assert_same(ours, d2n_out[0])
    assert_same(ours, ts_nifti)  # frames = the 20 source slices, real HU, same geometry
    strict = run_atlasflow(src, tmp_path / "strict.nii", "--strict")
    assert strict.returncode == 2 and "UNSUPPORTED_MULTIFRAME" in strict.stderr


def test_tilt_from_orientation_and_position_only(demo: Path, tmp_path: Path) -> None:
    src = gen_cases.write_tilted(demo, tmp_path / "tilted", 12.0)
    ours, d2n_out, log = _convert_both(src, tmp_path)
    assert "gantry tilt 12.00 deg" in log and "(0018,1120) says 12 deg" in log
    corrected = [p for p in d2n_out if "_Tilt" in p.name]
    assert len(corrected) == 1
    assert_tilt_close(ours, corrected[0])
    strict = run_atlasflow(src, tmp_path / "strict.nii", "--strict")
    assert strict.returncode == 2 and "gantry_tilt" in strict.stderr


def test_300_slices_match_dcm2niix(tmp_path: Path) -> None:
    src = gen_cases.write_long_series(tmp_path / "s300", 300)
    ours, d2n_out, _ = _convert_both(src, tmp_path)
    assert nib.load(ours).shape == (512, 512, 300)
    assert_same(ours, d2n_out[0])


#: Max RSS of `atlasflow convert` on a 3-slice series (interpreter, numpy, pydicom, one slice)
#: is measured in the test itself and added to the bound.
MEMORY_FACTOR = 2.2


def _max_rss_bytes(src: Path, out: Path) -> int:
    """Max RSS of one conversion in a fresh child (ru_maxrss of RUSAGE_CHILDREN, Linux KiB)."""
    code = (
        "import resource, subprocess, sys;"
        f"r = subprocess.run([{str(ATLASFLOW)!r}, 'convert', {str(src)!r}, {str(out)!r}],"
        " capture_output=True);"
        "assert r.returncode == 0, r.stderr;"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return int(run.stdout.strip()) * 1024


def test_1000_slices_peak_memory(tmp_path: Path) -> None:
    small = gen_cases.write_long_series(tmp_path / "s3", 3)
    baseline = _max_rss_bytes(small, tmp_path / "s3.nii")
    src = gen_cases.write_long_series(tmp_path / "s1000", 1000)
    out = tmp_path / "s1000.nii.gz"
    peak = _max_rss_bytes(src, out)
    volume_bytes = 512 * 512 * 1000 * 2
    print(f"baseline {baseline / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, volume {volume_bytes / 2**20:.0f} MiB")
    assert peak <= MEMORY_FACTOR * volume_bytes + baseline
    img = nib.load(out)
    assert img.shape == (512, 512, 1000)


def test_benchmark_dry_run(tmp_path: Path) -> None:
    """benchmarks/bench_convert.py end to end on a tiny series (asserts nothing about speed)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_convert.py"
    run = subprocess.run(
        [sys.executable, str(script), "--slices", "4", "--runs", "1", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    line = next(x for x in run.stdout.splitlines() if x.startswith("JSON "))
    results = json.loads(line[5:])
    assert set(results) == {f"{t} -> {e}" for t in ("atlasflow", "dcm2niix") for e in (".nii", ".nii.gz")}
    assert all(r["wall_s"] > 0 and r["max_rss_mib"] > 0 for r in results.values())
    assert list(tmp_path.iterdir()) == []  # the generated series is removed
