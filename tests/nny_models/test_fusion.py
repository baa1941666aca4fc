"""ClinicalFusion on its own and inside a model."""

import pytest
import torch

from nny_models.fusion import ClinicalFusion
from nny_models.zoo import create_model

MODES = ["add", "concat", "cross_attention"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mode", MODES)
def test_fusion_module_shapes_missing_values_and_gradients(mode):
    torch.manual_seed(0)
    fusion = ClinicalFusion(32, 5, mode)
    feat = torch.randn(3, 32, 2, 3, 4, requires_grad=True)
    clinical = torch.randn(3, 5)
    clinical[0, 1] = float("nan")
    clinical[1] = float("nan")  # a row with nothing known
    clinical[2, 0] = float("inf")
    out = fusion(feat, clinical)
    assert out.shape == feat.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fusion.parameters())
    assert torch.isfinite(fusion(feat, None)).all()
    # An all-missing row and clinical=None both use the learned "no clinical data" embedding.
    assert torch.allclose(fusion(feat[1:2], clinical[1:2]), fusion(feat[1:2], None))


@pytest.mark.parametrize("mode", MODES)
def test_fused_model_depends_on_clinical(mode):
    torch.manual_seed(0)
    model = create_model("unet", "tiny", fusion=mode, clinical_features=4).eval()
    x = torch.randn(2, 1, 32, 16, 16)
    a, b = torch.zeros(2, 4), torch.zeros(2, 4)
    b[:, 0] = 3.0
    with torch.no_grad():
        out_a, out_b = model(x, a), model(x, b)
        out_none = model(x, None)
        nan = torch.full((2, 4), float("nan"))
        nan[0, 2] = 1.0
        out_nan = model(x, nan)
    assert not torch.allclose(out_a, out_b)
    assert torch.isfinite(out_none).all() and torch.isfinite(out_nan).all()
    assert out_nan.shape == out_a.shape


def test_cross_attention_starts_near_identity():
    fusion = ClinicalFusion(16, 3, "cross_attention")
    feat = torch.randn(2, 16, 2, 2, 2)
    out = fusion(feat, torch.randn(2, 3))
    delta = (out - feat).abs().max()
    assert 0 < delta < 0.1 * feat.abs().max()


def test_bad_inputs():
    with pytest.raises(ValueError, match="fusion"):
        ClinicalFusion(16, 3, "gate")
    fusion = ClinicalFusion(16, 3, "add")
    with pytest.raises(ValueError, match="clinical_features=3"):
        fusion(torch.randn(2, 16, 2, 2, 2), torch.randn(2, 4))
