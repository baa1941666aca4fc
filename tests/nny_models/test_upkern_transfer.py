"""UpKern kernel interpolation, the weight-transfer report, strict loading and NnyNet.transfer_from."""

import pytest
import safetensors.torch
import torch
import torch.nn as nn

from nny_models.config import NnyNetConfig
from nny_models.hub import NnyNet
from nny_models.transfer import NonFiniteWeightsError, WeightsMismatchError, rename_prefixes, transfer_weights
from nny_models.upkern import interpolate_kernel, upkern_load
from nny_models.zoo import create_model, resolve_model_kwargs


pytestmark = pytest.mark.usefixtures("one_thread")


def test_upkern_mednext_k3_to_k5():
    torch.manual_seed(0)
    small = create_model("mednext_s", "tiny", kernel_size=3)
    big = create_model("mednext_s", "tiny", kernel_size=5)
    src = small.state_dict()
    key = "enc_stages.0.0.conv1.weight"  # depthwise 3^3 kernel
    src[key] = torch.full_like(src[key], 0.25)
    report = upkern_load(big, src)
    dst = big.state_dict()
    assert not report.missing and not report.unexpected and not report.mismatched
    assert report.fraction_loaded() == 1.0 and key in report.interpolated
    assert dst[key].shape[2:] == (5, 5, 5)
    assert torch.allclose(dst[key], torch.full_like(dst[key], 0.25))  # a constant kernel stays constant
    other = "enc_stages.1.0.conv1.weight"
    assert torch.allclose(dst[other][..., 2, 2, 2], src[other][..., 1, 1, 1])  # centre value kept
    for k, v in src.items():
        if k not in report.interpolated:
            assert torch.equal(dst[k], v), k  # non-conv tensors (norms, 1x1 convs, biases) are copied
    # Swin-NeXt decoder too (kernel 3 -> 7); the encoder is copied unchanged.
    rep = upkern_load(create_model("nnynet", "tiny", kernel_size=7), create_model("nnynet", "tiny").state_dict())
    assert rep.fraction_loaded() == 1.0 and rep.interpolated
    assert all(not k.startswith("encoder.") for k in rep.interpolated)


def test_transfer_report_counts_on_hand_made_mismatch():
    dst = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))  # keys 0.weight 0.bias 2.weight 2.bias
    src = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5)).state_dict()
    src["extra.weight"] = torch.zeros(2)
    del src["0.bias"]
    report = transfer_weights(dst, src)
    assert report.loaded == ["0.weight"]
    assert report.missing == ["0.bias"]
    assert report.unexpected == ["extra.weight"]
    assert report.mismatched == [("2.weight", (5, 8), (3, 8)), ("2.bias", (5,), (3,))]
    assert torch.equal(dst.state_dict()["0.weight"], src["0.weight"])
    assert report.fraction_loaded("0.") == 0.5 and report.fraction_loaded("2.") == 0.0
    assert "loaded 1/4" in report.summary() and "2.weight (5, 8)->(3, 8)" in report.summary()
    excl = transfer_weights(dst, src, exclude_prefixes=("0.",))
    assert excl.excluded == ["0.weight", "0.bias"] and not excl.loaded


def test_encoder_transfer_from_pretraining_to_new_head():
    pre = create_model("mednext_s", "tiny", out_channels=5)
    fine = create_model("mednext_s", "tiny", out_channels=3, fusion="cross_attention", clinical_features=4)
    report = transfer_weights(fine, pre.state_dict(), exclude_prefixes=fine.head_prefixes)
    assert report.fraction_loaded(fine.encoder_prefixes) == 1.0
    assert all(k.startswith("fusion.") for k in report.missing)
    assert not report.mismatched and report.excluded


def test_swinunetr_encoder_loads_into_nnynet_after_renaming():
    """A MONAI SwinUNETR checkpoint (DDP-wrapped, keys "module.swinViT.*") gives nnynet its whole encoder."""
    swin = create_model("swinunetr", "tiny")
    state = {"module." + k: v for k, v in swin.state_dict().items()}
    nnynet = create_model("nnynet", "tiny")
    assert transfer_weights(nnynet, state).fraction_loaded(nnynet.encoder_prefixes) == 0.0  # as given: nothing
    report = transfer_weights(nnynet, rename_prefixes(state, {"module.": "", "swinViT.": "encoder."}))
    assert report.fraction_loaded(nnynet.encoder_prefixes) == 1.0
    key = next(k for k in nnynet.state_dict() if k.startswith("encoder."))
    assert torch.equal(nnynet.state_dict()[key], swin.state_dict()["swinViT." + key.removeprefix("encoder.")])
    with pytest.raises(ValueError, match="two tensors"):
        rename_prefixes({"a.w": torch.zeros(1), "b.w": torch.zeros(1)}, {"a.": "c.", "b.": "c."})


def test_strict_transfer_refuses_an_unclean_report_and_copies_nothing():
    dst = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    src = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5)).state_dict()
    with pytest.raises(WeightsMismatchError, match=r"weights.pt: .*2 shape mismatch\(es\): 2\.weight \[5, 8\] in "
                                                   r"checkpoint vs \[3, 8\] in model"):
        transfer_weights(dst, src, strict=True, source="weights.pt")
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # 0.* matched, yet not copied
    clean = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict()
    assert transfer_weights(dst, clean, strict=True).clean


def test_non_finite_tensors_are_refused_by_name():
    dst = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    src = {k: v.clone() for k, v in dst.state_dict().items()}
    src["1.weight"][0, 0] = float("nan")
    src["0.bias"][3] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"ckpt: 2 tensor\(s\) contain NaN or inf: 0\.bias, 1\.weight"):
        transfer_weights(dst, src, source="ckpt")
    # A non-finite tensor that is not loaded (here: an excluded head) does not matter.
    report = transfer_weights(dst, {k: v for k, v in src.items() if k != "0.bias"}, exclude_prefixes=("1.",))
    assert report.loaded == ["0.weight"]


def _saved(tmp_path, name: str, out_channels: int = 5, **overrides) -> NnyNet:
    labels = ["background", "liver", "tumor", "portal_vein", "aorta"][:out_channels]
    kwargs = resolve_model_kwargs(name, "tiny", out_channels=out_channels, **overrides)
    return NnyNet(NnyNetConfig(model=name, model_kwargs=kwargs, label_names=labels, patch_size=(32, 32, 32)))


def test_transfer_from_a_saved_model_into_a_new_task(tmp_path):
    torch.manual_seed(0)
    pre = _saved(tmp_path, "mednext_s")
    pre.save_pretrained(tmp_path / "pre")
    fine = _saved(tmp_path, "mednext_s", out_channels=3, fusion="cross_attention", clinical_features=4)
    fine = NnyNet(fine.config, deep_supervision=True)
    report = fine.transfer_from(tmp_path / "pre", exclude_prefixes=fine.net.head_prefixes)
    assert report.fraction_loaded(fine.net.encoder_prefixes) == 1.0  # report keys are fine.net's keys
    assert all(k.startswith(fine.net.head_prefixes) for k in report.excluded) and report.excluded
    assert all(k.startswith("fusion.") for k in report.missing) and not report.mismatched
    key = "enc_stages.0.0.conv1.weight"
    assert torch.equal(fine.net.state_dict()[key], pre.net.state_dict()[key])
    # UpKern goes through the same reader: kernel 3 -> 5.
    big = _saved(tmp_path, "mednext_s", kernel_size=5)
    up = big.transfer_from(tmp_path / "pre", resize=interpolate_kernel)
    assert up.fraction_loaded() == 1.0 and key in up.interpolated
    with pytest.raises(FileNotFoundError, match="not found"):
        fine.transfer_from(tmp_path / "nowhere")


def test_transfer_from_refuses_non_finite_weights_naming_the_file(tmp_path):
    pre = _saved(tmp_path, "unet")
    pre.save_pretrained(tmp_path)
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    state["net.model.0.conv.unit0.conv.weight"][0] = float("nan")
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(NonFiniteWeightsError, match=r"model\.safetensors: 1 tensor\(s\) contain NaN or inf: "
                                                    r"model\.0\.conv\.unit0\.conv\.weight"):
        _saved(tmp_path, "unet").transfer_from(tmp_path)
