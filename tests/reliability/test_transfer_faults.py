"""Bad inputs to the weight transfer behind ``finetune/run.py --pretrained PATH`` (NnyNet.transfer_from,
transfer_weights, UpKern): each is refused with an error naming the file and tensor, or clearly reported, and a
refused load leaves the model untouched. Never a silently different network."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn

from nny_models.config import NnyNetConfig
from nny_models.hub import NnyNet
from nny_models.transfer import NonFiniteWeightsError, WeightsDtypeError, transfer_weights
from nny_models.upkern import interpolate_kernel, upkern_load
from nny_models.zoo import create_model


pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = ["background", "liver", "tumor"]


def _unet(**kwargs) -> NnyNet:
    return NnyNet(NnyNetConfig(model="unet", model_kwargs={"size": "tiny", "out_channels": 3, **kwargs},
                               label_names=LABELS, patch_size=(32, 32, 32)))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A saved tiny unet (the --pretrained folder) and its first conv kernel's key."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pre") / "model"
    _unet().save_pretrained(path)
    state = safetensors.torch.load_file(str(path / "model.safetensors"))
    return path, next(k for k, v in state.items() if v.ndim == 5)


def _variant(tmp_path, export, change) -> os.PathLike:
    """A copy of the export whose model.safetensors is change(state)."""
    src, _ = export
    dst = tmp_path / "variant"
    shutil.copytree(src, dst)
    state = safetensors.torch.load_file(str(src / "model.safetensors"))
    safetensors.torch.save_file(change(state), str(dst / "model.safetensors"))
    return dst


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_finite_float64_values_that_overflow_float32_are_refused(tmp_path, export):
    """1e300 is finite in the file but inf in the float32 model: before, it loaded as inf with no error."""
    _, key = export

    def huge(state):
        state[key] = state[key].double() * 1e300
        return state

    fine = _unet()
    before = _snapshot(fine)
    with pytest.raises(NonFiniteWeightsError, match=r"model\.safetensors: 1 tensor\(s\) hold finite values that "
                                                    r"overflow .*model\.0\.conv\.unit0\.conv\.weight \(float64 -> float32\)"):
        fine.transfer_from(_variant(tmp_path, export, huge), exclude_prefixes=fine.net.head_prefixes)
    assert _unchanged(fine, before)
    # The same into a half-precision model: 1e5 fits float32 but not float16.
    half = nn.Linear(2, 2).half()
    with pytest.raises(NonFiniteWeightsError, match=r"ckpt: .*weight \(float32 -> float16\)"):
        transfer_weights(half, {"weight": torch.full((2, 2), 1e5), "bias": torch.zeros(2)}, source="ckpt")


def test_integer_and_boolean_data_for_float_weights_are_refused_by_the_loader_itself():
    """Before, transfer_weights cast int / bool data into float weights silently (only hub checked dtypes)."""
    dst = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    before = _snapshot(dst)
    src = {k: v.clone() for k, v in dst.state_dict().items()}
    src["0.weight"] = torch.ones(8, 4, dtype=torch.int32)
    src["1.num_batches_tracked"] = torch.tensor(True)
    with pytest.raises(WeightsDtypeError, match=r"ckpt: 2 tensor\(s\) .*0\.weight \(int32, expected float32\), "
                                                r"1\.num_batches_tracked \(bool, expected int64\)"):
        transfer_weights(dst, src, source="ckpt")
    assert _unchanged(dst, before)
    with pytest.raises(TypeError, match=r"ckpt: '0\.bias' is a list, not a tensor"):
        transfer_weights(dst, {"0.bias": [0.0] * 8}, source="ckpt")


def test_resize_results_of_another_shape_or_kind_are_refused():
    """A resizer that returns a broadcastable tensor would be copy_'d silently into every element."""
    dst = nn.Conv3d(2, 4, 3)
    before = _snapshot(dst)
    src = {"weight": torch.ones(4, 2, 1, 1, 1), "bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"resize returned \(1, 1, 1, 1, 1\) for 'weight' \(4, 2, 1, 1, 1\); "
                                         r"expected the model's shape \(4, 2, 3, 3, 3\)"):
        transfer_weights(dst, src, resize=lambda k, s, d: torch.ones(1, 1, 1, 1, 1))
    with pytest.raises(WeightsDtypeError, match=r"weight \(int64, expected float32\)"):
        transfer_weights(dst, src, resize=lambda k, s, d: torch.ones(d.shape, dtype=torch.int64))
    assert _unchanged(dst, before)


def test_upkern_only_upsamples_floating_point_kernels():
    dst = torch.zeros(4, 2, 3, 3, 3)
    assert interpolate_kernel("w", torch.ones(4, 2, 5, 5, 5), dst) is None  # shrinking 5 -> 3: not UpKern
    assert interpolate_kernel("w", torch.ones(4, 2, 1, 5, 1), dst) is None  # mixed up / down
    assert interpolate_kernel("w", torch.ones(4, 2, 1, 1, 1, dtype=torch.int32), dst) is None  # int: rounds
    assert interpolate_kernel("w", torch.ones(4, 2, 0, 1, 1), dst) is None  # empty: F.interpolate raises
    # fp16 kernels are interpolated in float32, not rounded back to fp16
    src = torch.randn(4, 2, 1, 3, 3).half()
    out = interpolate_kernel("w", src, dst)
    assert out.dtype == torch.float32 and out.shape == dst.shape
    assert torch.equal(out, torch.nn.functional.interpolate(src.float(), size=(3, 3, 3), mode="trilinear"))
    # in a load, a refused kernel is reported as a mismatch and left as initialised
    conv = nn.Conv3d(2, 4, 3)
    before = _snapshot(conv)
    report = upkern_load(conv, {"weight": torch.ones(4, 2, 5, 5, 5), "bias": torch.zeros(4)})
    assert report.mismatched == [("weight", (4, 2, 5, 5, 5), (4, 2, 3, 3, 3))] and not report.interpolated
    assert torch.equal(conv.weight, before["weight"]) and torch.equal(conv.bias, torch.zeros(4))


def test_a_load_where_nothing_matched_warns_but_deliberate_exclusion_does_not():
    dst = nn.Linear(4, 2)
    with pytest.warns(UserWarning, match=r"ckpt: none of the model's 2 tensors loaded"):
        report = transfer_weights(dst, {"other.weight": torch.zeros(3)}, source="ckpt")
    assert report.fraction_loaded() == 0.0 and report.missing == ["weight", "bias"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert transfer_weights(dst, dict(dst.state_dict()), exclude_prefixes=("",)).excluded == ["weight", "bias"]


def test_another_feature_size_loads_too_little_of_the_encoder_for_finetune(tmp_path, export):
    """finetune/run.py refuses below min_encoder_loaded (0.9); the report must show the low share, not 1.0."""
    _unet(size="small").save_pretrained(tmp_path / "small")
    fine = _unet()
    report = fine.transfer_from(tmp_path / "small", exclude_prefixes=fine.net.head_prefixes)
    assert report.fraction_loaded(fine.net.encoder_prefixes) < 0.9
    assert report.unexpected or report.mismatched or report.missing
    assert f"/{report.total} tensors" in report.summary()


def test_files_that_are_not_safetensors_are_refused_and_never_unpickled(tmp_path, export, monkeypatch):
    src, key = export

    def boom(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    state = safetensors.torch.load_file(str(src / "model.safetensors"))
    fine = _unet()
    before = _snapshot(fine)
    cases = {}
    for name in ("bin_only", "pickle_named_safetensors", "corrupt", "truncated", "nan"):
        d = tmp_path / name
        shutil.copytree(src, d)
        cases[name] = d
    (cases["bin_only"] / "model.safetensors").unlink()
    with open(cases["bin_only"] / "pytorch_model.bin", "wb") as f:
        pickle.dump({k: v.numpy() for k, v in state.items()}, f)
    with open(cases["pickle_named_safetensors"] / "model.safetensors", "wb") as f:
        pickle.dump({k: v.numpy() for k, v in state.items()}, f)
    (cases["corrupt"] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    data = (src / "model.safetensors").read_bytes()
    (cases["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    state_nan = dict(state)
    state_nan[key] = state[key].clone()
    state_nan[key].view(-1)[0] = float("nan")
    safetensors.torch.save_file(state_nan, str(cases["nan"] / "model.safetensors"))
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    inner = tmp_path / "inner_loop"
    shutil.copytree(src, inner)
    (inner / "model.safetensors").unlink()
    os.symlink(inner / "model.safetensors", inner / "model.safetensors")
    expected = [
        (cases["bin_only"], FileNotFoundError, r"model\.safetensors not found.*pickled pytorch_model\.bin"),
        (cases["pickle_named_safetensors"], ValueError, r"model\.safetensors: not a readable safetensors file"),
        (cases["corrupt"], ValueError, r"model\.safetensors: not a readable safetensors file"),
        (cases["truncated"], ValueError, r"model\.safetensors: not a readable safetensors file"),
        (cases["nan"], NonFiniteWeightsError, r"model\.safetensors: 1 tensor\(s\) contain NaN or inf"),
        (cases["bin_only"] / "pytorch_model.bin", ValueError, r"pytorch_model\.bin is a file; expected"),
        (src / "model.safetensors", ValueError, r"model\.safetensors is a file; expected"),
        (loop, FileNotFoundError, r"loop is a broken symbolic link"),
        (inner, FileNotFoundError, r"inner_loop/model\.safetensors not found"),
    ]
    for path, error, message in expected:
        with pytest.raises(error, match=message):
            fine.transfer_from(path, exclude_prefixes=fine.net.head_prefixes)
    assert _unchanged(fine, before)


def test_pretraining_and_finetuned_nnynet_exports_load_their_encoder(tmp_path):
    """Swin-NeXt: a pretraining export (5 classes) and a fine-tuned one (clinical fusion, 3 classes) both give a
    new task's network its whole encoder; only head (excluded) and fusion tensors differ."""
    torch.manual_seed(0)

    def nnynet(out_channels, **kw):
        labels = ["background", "liver", "tumor", "portal_vein", "aorta"][:out_channels]
        return NnyNet(NnyNetConfig(model_kwargs={"size": "tiny", "out_channels": out_channels, **kw},
                                   label_names=labels, patch_size=(64, 32, 32)))

    nnynet(5).save_pretrained(tmp_path / "pretrain")
    nnynet(3, fusion="add", clinical_features=2).save_pretrained(tmp_path / "finetuned")
    for source in ("pretrain", "finetuned"):
        fine = nnynet(2)
        report = fine.transfer_from(tmp_path / source, exclude_prefixes=fine.net.head_prefixes)
        assert report.fraction_loaded(fine.net.encoder_prefixes) == 1.0, source
        assert not report.mismatched and not report.missing, (source, report.summary())
        saved = safetensors.torch.load_file(str(tmp_path / source / "model.safetensors"))
        key = next(k for k in report.loaded if k.startswith(fine.net.encoder_prefixes))
        assert torch.equal(fine.net.state_dict()[key], saved["net." + key])


@pytest.mark.parametrize("kind", ["broken", "loop"])
def test_a_bare_name_that_is_a_dangling_link_is_local_not_a_hub_lookup(tmp_path, monkeypatch, kind):
    from nny_models import hub

    monkeypatch.chdir(tmp_path)
    if kind == "broken":
        Path("model").symlink_to(tmp_path / "gone")
    else:
        Path("model").symlink_to("model2")
        Path("model2").symlink_to("model")
    monkeypatch.setattr(hub, "hf_hub_download", lambda **kw: pytest.fail("looked up on the Hub"))
    with pytest.raises(FileNotFoundError, match="model is a broken symbolic link"):
        hub.NnyNet.from_pretrained("model")
