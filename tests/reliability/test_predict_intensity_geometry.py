"""Inference on CTs nobody planned for: intensities, headers and devices (nnynet-predict / nny_models.predict).

- Stored values without the rescale intercept (HU + 1024: air at +24, soft tissue above 1000) with the usual fill
  outside the reconstruction circle (-2000) passed the CT check: the fill counted as "air", the body as "bone", the
  air inside the circle as "soft tissue". predict ran, exit 0, on an image shifted by 1024 HU. Values below
  -1100 HU (no material: fill / padding) are now left out of the statistics, and the refusal says the values
  minus 1024 look like a CT.
- A NIfTI whose scl_slope is 0 (or NaN) but scl_inter is -1024 is read as stored (the standard's "no scaling"):
  a warning now names the two header fields.
- --device mps / meta / xpu, or cuda:N past the machine's GPUs, ended in "unexpected RuntimeError" (exit 1) after the
  input was read; predict(device="cuda") without CUDA raised an AssertionError after preprocessing. Both are now
  a ValueError / one-line error naming the device, before any work.
- precision "bf16" where bf16 is emulated (no AMX / AVX512-BF16, pre-Ampere GPUs) ran silently slower than fp32:
  it now warns.
"""

from __future__ import annotations

import subprocess
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from nny_models import inference
from nny_models.hu_check import check_ct_volume, hu_problems
from nny_models.io import load_volume

cli = pytest.importorskip("nny_models.cli")

AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("nnynet-predict: error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def scan_in_hu(shape=(56, 56, 24), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume, reconstruction circle): air inside the scanner's circular field of view, a body of soft tissue
    (several organs), a fat rim and a spine."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    circle = x**2 + y**2 <= 1.0
    body = (x / 0.62) ** 2 + (y / 0.5) ** 2 <= 1.0
    inner = (x / 0.55) ** 2 + (y / 0.43) ** 2 <= 1.0
    hu = np.full(shape[:2], -1000.0)
    hu[body] = -100.0  # subcutaneous fat
    hu[inner] = 40.0  # muscle, bowel
    hu[inner & (x < -0.05)] = 60.0  # liver
    hu[inner & (x > 0.25) & (y > 0)] = 25.0  # kidney, spleen
    hu[(np.abs(x) < 0.08) & (y > 0.25) & (y < 0.4)] = 700.0  # spine
    volume = np.repeat(hu[..., None], shape[2], axis=2) + rng.normal(0, 8, shape)
    return volume.astype(np.float32), np.repeat(circle[..., None], shape[2], axis=2)


def stored_values(hu: np.ndarray, circle: np.ndarray, fill: float = -2000.0) -> np.ndarray:
    """What a converter that drops RescaleIntercept -1024 writes: HU + 1024 inside the circle, the fill outside."""
    return np.where(circle, hu + 1024.0, fill).astype(np.float32)


# ----------------------------------------------------------------------------- HU + 1024 with a fill


@pytest.mark.parametrize("fill", [-2000.0, -2048.0, -3024.0])
def test_stored_values_with_a_fill_outside_the_circle_are_refused(fill):
    hu, circle = scan_in_hu()
    assert hu_problems(hu) == []
    raw = stored_values(hu, circle, fill)
    with pytest.raises(ValueError, match=r"scan\.nii\.gz: does not look like a CT in Hounsfield units.*minus 1024"):
        check_ct_volume(raw, "scan.nii.gz")


def test_a_ct_in_hu_with_a_fill_outside_the_circle_still_passes():
    hu, circle = scan_in_hu()
    for fill in (-3024.0, -2048.0, -1024.0):  # the scanners' fills, in HU
        check_ct_volume(np.where(circle, hu, fill).astype(np.float32), "scan.nii.gz")
    check_ct_volume(np.clip(hu, -1024, None), "air clipped at -1024 HU")


def test_predict_refuses_stored_values_instead_of_segmenting_them(model_dir, tmp_path, capsys):
    hu, circle = scan_in_hu()
    path = tmp_path / "raw.nii.gz"
    nib.save(nib.Nifti1Image(stored_values(hu, circle).astype(np.int16), AFFINE), str(path))
    out = tmp_path / "mask.nii.gz"
    result = run_main(capsys, "--device", "cpu", "--model", str(model_dir), "--input", str(path), "--output", str(out))
    assert_one_line_error(result, str(path), "does not look like a CT", "minus 1024", "RescaleIntercept")
    assert not out.exists()


# ----------------------------------------------------------------------------- scl_slope 0 with an intercept


@pytest.mark.parametrize("slope", [0.0, float("nan")])
def test_an_intercept_ignored_because_scl_slope_is_zero_is_named(tmp_path, slope):
    hu, _ = scan_in_hu()
    img = nib.Nifti1Image((hu + 1024).astype(np.int16), AFFINE)
    img.header["scl_slope"], img.header["scl_inter"] = slope, -1024.0
    path = tmp_path / "ct.nii.gz"
    nib.save(img, str(path))
    with pytest.warns(UserWarning, match=r"ct\.nii\.gz: the NIfTI header's scl_slope is (0|nan).*scl_inter -1024"):
        volume, _ = load_volume(path)
    assert volume.min() > -200  # read as stored (air near +24), as nibabel and the standard read it: the CT check refuses it
    with pytest.raises(ValueError, match="minus 1024"):
        check_ct_volume(volume, str(path))


def test_applied_scaling_gives_hu_without_a_warning(tmp_path):
    hu, _ = scan_in_hu()
    img = nib.Nifti1Image((np.round(hu) + 1024).astype(np.int16), AFFINE)
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, -1024.0
    path = tmp_path / "ct.nii.gz"
    nib.save(img, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        volume, _ = load_volume(path)
    np.testing.assert_allclose(volume, np.round(hu), atol=1e-3)


# ----------------------------------------------------------------------------- devices and precision


@pytest.mark.parametrize("device, words", [
    ("mps", ["MPS", "not available"]),
    ("meta", ["expected cpu, cuda, cuda:N or mps"]),
    ("xpu", ["expected cpu, cuda, cuda:N or mps"]),
])
def test_a_device_this_machine_cannot_run_is_one_line_before_any_work(model_dir, tmp_path, capsys, monkeypatch,
                                                                      device, words):
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before --device was checked")

    monkeypatch.setattr(cli, "load_input", forbidden)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    result = run_main(capsys, "--device", device, "--model", str(model_dir), "--input", str(model_dir / "config.json"),
                      "--output", str(tmp_path / "mask.nii.gz"))
    assert_one_line_error(result, f"--device '{device}'", *words)


def test_cuda_index_past_the_machine_s_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(cli.InputError, match=r"--device 'cuda:3': this machine has 1 CUDA device\(s\); expected cuda:0"):
        cli.check_device("cuda:3")
    assert inference.check_device("cuda:0").index == 0


def test_predict_refuses_a_device_it_cannot_run_before_any_work(monkeypatch):
    hu, _ = scan_in_hu()
    from tests.nny_models.test_inference import ThresholdNet, make_config

    def forbidden(*args, **kwargs):
        raise AssertionError("the volume was read before the device was checked")

    monkeypatch.setattr(inference, "read_ct_input", forbidden)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"predict: device 'cuda': CUDA is not available"):
        inference.predict(ThresholdNet(make_config()), hu, spacing=(1.5, 1.5, 4.0), device="cuda")
    with pytest.raises(ValueError, match=r"predict: device 'gpu': expected cpu, cuda"):
        inference.predict(ThresholdNet(make_config()), hu, spacing=(1.5, 1.5, 4.0), device="gpu")


def test_bf16_where_it_is_emulated_warns_and_auto_stays_silent(monkeypatch):
    from tests.nny_models.test_inference import ThresholdNet, make_config

    hu, _ = scan_in_hu(shape=(32, 32, 12))
    monkeypatch.setattr(inference, "bf16_is_fast", lambda device: False)
    with pytest.warns(UserWarning, match=r"precision 'bf16' on cpu: this CPU has no AMX or AVX512-BF16.*slower than fp32"):
        inference.predict(ThresholdNet(make_config()), hu, spacing=(1.5, 1.5, 4.0), device="cpu", precision="bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inference.predict(ThresholdNet(make_config()), hu, spacing=(1.5, 1.5, 4.0), device="cpu", precision="auto")
    assert not [w for w in caught if "bf16" in str(w.message)]


# ----------------------------------------------------------------------------- a qform that is no rotation


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz"])
def test_a_qform_only_header_whose_quaternion_is_no_rotation_names_the_field(tmp_path, name):
    import gzip
    import struct

    hu, _ = scan_in_hu(shape=(16, 16, 12))
    img = nib.Nifti1Image(hu, AFFINE)
    img.header.set_qform(AFFINE, code=1)
    img.header.set_sform(None, code=0)
    plain = tmp_path / "plain.nii"
    nib.save(img, str(plain))
    raw = bytearray(plain.read_bytes())
    raw[256:264] = struct.pack("<2f", 0.9, 0.9)  # quatern_b, quatern_c: b^2 + c^2 = 1.62
    path = tmp_path / name
    path.write_bytes(gzip.compress(bytes(raw)) if name.endswith(".gz") else bytes(raw))
    with pytest.raises(ValueError, match=rf"{name}: the NIfTI qform quaternion \(quatern_b, quatern_c, quatern_d\) = "
                                         r"\(0\.9, 0\.9, 0\) is not a rotation.*no sform"):
        load_volume(path)


# ----------------------------------------------------------------------------- memory for the probability maps


def test_a_volume_whose_maps_exceed_free_memory_is_one_line_before_the_window(model_dir, tmp_path, capsys,
                                                                               monkeypatch):
    import psutil

    hu, _ = scan_in_hu()
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, AFFINE), str(path))
    free = type("Free", (), {"available": 100_000})()  # less than the maps of this 28 x 28 x 24 grid
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    called = []
    monkeypatch.setattr(inference, "sliding_window_probs", lambda *a, **k: called.append(1))
    out = tmp_path / "mask.nii.gz"
    result = run_main(capsys, "--device", "cpu", "--model", str(model_dir), "--input", str(path), "--output", str(out))
    assert_one_line_error(result, str(path), "GiB of host memory", "classes", "nothing was written")
    assert not called and not out.exists()


def test_memory_estimate_counts_every_class_and_the_returned_probabilities(monkeypatch):
    import psutil

    grid = (100, 100, 100)  # 1e6 voxels: 4 MB per float32 map
    free = type("Free", (), {"available": 0})()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    cpu = torch.device("cpu")
    # maps on the CPU: C blended + the count map (the input is already allocated), C more when the labels are
    # restored from the probabilities (a copy), C on the original grid when the probabilities are returned
    for classes, smooth, probabilities, maps in ((2, False, False, 3), (5, False, False, 6), (5, True, False, 11),
                                                  (5, True, True, 16), (5, False, True, 11)):
        kwargs = {"smooth": smooth, "probabilities": probabilities}
        free.available = 4e6 * maps + 1  # just enough
        inference.check_memory(grid, (100, 100, 100), classes, cpu, "x", **kwargs)
        free.available = 4e6 * maps - 1
        with pytest.raises(ValueError, match=f"{classes} classes"):
            inference.check_memory(grid, (100, 100, 100), classes, cpu, "x", **kwargs)
