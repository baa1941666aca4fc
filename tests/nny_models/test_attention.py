"""Attention maps of the clinical cross-attention: the captured weights, the upsampled map, predict's grid,
the figure and ``nnynet-predict --attention``."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from nny_models.attention import attention_fusion, attention_map, predict_attention
from nny_models.config import NnyNetConfig, PreprocessConfig
from nny_models.fusion import ATTENTION_MODES, ClinicalFusion
from nny_models.hub import NnyNet

pytestmark = pytest.mark.usefixtures("one_thread")
AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 20.0], [0, 0, 4.0, -50.0], [0, 0, 0, 1]])  # LPS-like


def tiny_model(fusion: str = "cross_attention") -> NnyNet:
    torch.manual_seed(0)
    config = NnyNetConfig(model="unet", model_kwargs={"size": "tiny", "fusion": fusion, "clinical_features": 3},
                          patch_size=(32, 32, 32), preprocessing=PreprocessConfig(spacing=(3.0, 3.0, 4.0)).to_dict())
    return NnyNet(config).eval()


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_captured_weights_are_the_attention_the_module_uses(mode):
    torch.manual_seed(0)
    fusion = ClinicalFusion(16, 3, mode).eval()
    for p in fusion.parameters():  # make every path non-trivial (the zero-initialised layers included)
        torch.nn.init.normal_(p, std=0.3)
    feat, clinical = torch.randn(2, 16, 3, 4, 2), torch.randn(2, 3)
    plain = fusion(feat, clinical)
    fusion.capture_attention = True
    captured = fusion(feat, clinical)
    torch.testing.assert_close(captured, plain)  # explicit softmax == SDPA
    w = fusion.last_attention
    assert w.shape == (2, fusion.num_heads, fusion.num_tokens, 3, 4, 2)
    torch.testing.assert_close(w.flatten(3).sum(-1), torch.ones(w.shape[:3]))
    # recompute head 0 of query 0 by hand from the module's own layers
    q = fusion.q(fusion.norm_q(fusion.embed_clinical(clinical, 2, feat)))
    k = fusion.kv(fusion.norm_kv(feat.flatten(2).transpose(1, 2))).chunk(2, dim=-1)[0]
    d = 16 // fusion.num_heads
    manual = (q[:, :1, :d] @ k[..., :d].transpose(1, 2) / math.sqrt(d)).softmax(-1)[:, 0]  # (B, N)
    torch.testing.assert_close(w[:, 0, 0].flatten(1), manual)


def test_attention_map_on_a_patch_depends_on_the_clinical_row():
    model = tiny_model()
    fusion = attention_fusion(model)
    for p in fusion.parameters():
        torch.nn.init.normal_(p, std=0.3)
    patch = torch.randn(32, 32, 32)
    a = attention_map(model, patch, torch.tensor([[1.0, 0.0, -1.0]]))
    b = attention_map(model, patch, torch.tensor([[-2.0, 1.0, 0.5]]))
    none = attention_map(model, patch, None)
    assert a.shape == (32, 32, 32) and a.dtype == np.float32 and np.isfinite(a).all()
    assert a.min() >= 0 and abs(a.mean() - 1.0) < 0.1  # 1 = uniform attention over the 2^3 bottleneck
    assert not np.allclose(a, b) and not np.allclose(a, none)
    assert not np.allclose(attention_map(model, patch, torch.tensor([[1.0, 0.0, -1.0]]), head=0), a)
    assert not fusion.capture_attention  # switched off again


def test_models_without_attention_are_refused():
    with pytest.raises(ValueError, match="fusion is 'add'"):
        attention_map(tiny_model("add"), torch.randn(32, 32, 32), None)
    with pytest.raises(ValueError, match="fusion is 'none'"):
        attention_fusion(tiny_model("none"))


def synthetic_ct(shape=(40, 36, 12)) -> np.ndarray:
    ct = np.full(shape, -1000.0, np.float32)
    ct[4:-4, 4:-4, 2:-2] = 50.0
    ct[12:24, 10:20, 4:8] = 250.0
    return ct


def test_predict_attention_lands_on_the_input_grid_and_cli_writes_it(tmp_path, capsys):
    model = tiny_model()
    ct = synthetic_ct()
    amap = predict_attention(model, ct, np.array([[0.5, 1.0, -1.0]], np.float32), affine=AFFINE, overlap=0.25)
    assert amap.shape == ct.shape and np.isfinite(amap).all() and amap.max() > 0

    from nny_models.cli import main

    model.save_pretrained(tmp_path / "model")
    nib.save(nib.Nifti1Image(ct, AFFINE), tmp_path / "ct.nii.gz")
    args = ["--device", "cpu", "--model", str(tmp_path / "model"), "--input", str(tmp_path / "ct.nii.gz"),
            "--output", str(tmp_path / "mask.nii.gz"), "--attention", str(tmp_path / "attn.nii.gz")]
    assert main(args) == 0, capsys.readouterr().err
    written = nib.load(tmp_path / "attn.nii.gz")
    assert written.shape == ct.shape and written.get_data_dtype() == np.float32
    np.testing.assert_allclose(written.affine, AFFINE)
    from nny_models.inference import predict

    expected = predict(model, ct, affine=AFFINE, return_attention=True)[1]  # the CLI's defaults, one pass
    np.testing.assert_allclose(np.asarray(written.dataobj), expected, rtol=1e-5)

    tiny_model("add").save_pretrained(tmp_path / "add")
    args[3] = str(tmp_path / "add")
    args[7] = str(tmp_path / "mask2.nii.gz")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--attention" in err and "fusion is 'add'" in err and not (tmp_path / "mask2.nii.gz").exists()


def test_predict_returns_the_map_from_the_same_forward_passes_without_changing_the_mask():
    """predict(return_attention=True) captures the map while it segments: the mask is the one predict gives
    without it, and the map the one predict_attention computes in a second pass (same overlap, fp32)."""
    from nny_models.inference import predict

    model = tiny_model()
    for p in attention_fusion(model).parameters():  # a non-trivial attention (the zero-initialised layers too)
        torch.nn.init.normal_(p, std=0.3)
    ct, row = synthetic_ct(), np.array([[0.5, 1.0, -1.0]], np.float32)
    mask = predict(model, ct, affine=AFFINE, clinical=row, overlap=0.25, precision="fp32")
    fused_mask, probs, amap = predict(model, ct, affine=AFFINE, clinical=row, overlap=0.25, precision="fp32",
                                      return_probabilities=True, return_attention=True)
    np.testing.assert_array_equal(fused_mask, mask)
    assert probs.shape == (len(model.config.label_names), *ct.shape) and amap.shape == ct.shape
    separate = predict_attention(model, ct, row, affine=AFFINE, overlap=0.25)
    np.testing.assert_allclose(amap, separate, rtol=1e-4, atol=1e-5)
    assert amap.std() > 0.01  # the map is not flat: a wrong capture would show up
    with pytest.raises(ValueError, match="fusion is 'add'"):
        predict(tiny_model("add"), ct, affine=AFFINE, return_attention=True)

    # under mirror TTA the map comes from a second, un-mirrored pass: predict_attention's, exactly
    model.config.tta_mirror_axes = [2]
    tta_mask, tta_map = predict(model, ct, affine=AFFINE, clinical=row, overlap=0.25, precision="fp32",
                                return_attention=True)
    np.testing.assert_array_equal(tta_mask, predict(model, ct, affine=AFFINE, clinical=row, overlap=0.25,
                                                    precision="fp32"))
    np.testing.assert_allclose(tta_map, separate, rtol=1e-5, atol=1e-6)


def test_attention_overlay_png(tmp_path):
    from finetune.figures import save_attention_overlay

    ct, labels = synthetic_ct(), np.zeros((40, 36, 12), np.uint8)
    labels[8:30, 8:28, 3:9] = 1
    amap = np.random.default_rng(0).random(ct.shape).astype(np.float32)
    path = save_attention_overlay(ct, amap, tmp_path / "a.png", labels=labels)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="one \\(X, Y, Z\\) shape"):
        save_attention_overlay(ct, amap[:, :, :5], tmp_path / "b.png")
