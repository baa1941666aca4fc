"""ClinicalFusion on its own and inside a model."""

import pytest
import torch

from nny_models.fusion import ATTENTION_MODES, FUSION_MODES, ClinicalFusion, check_fusion_args
from nny_models.zoo import create_model, list_models

MODES = [m for m in FUSION_MODES if m != "none"]
ZERO_INIT = ["cross_attention_film", "cross_attention_tokens"]  # start as exact identity


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
    if mode in ZERO_INIT:  # trained weights: the zero-initialised output layer has moved
        last = model.fusion.film if mode == "cross_attention_film" else model.fusion.out2
        torch.nn.init.normal_(last.weight, std=0.1)
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


@pytest.mark.parametrize("mode", ZERO_INIT)
def test_strong_modes_start_as_identity_and_learn_from_the_clinical_vector(mode):
    """Exact identity at initialisation, yet one gradient step makes the output depend on the clinical vector."""
    torch.manual_seed(0)
    fusion = ClinicalFusion(16, 3, mode)
    feat = torch.randn(4, 16, 2, 3, 2)
    clinical = torch.randn(4, 3)
    assert torch.equal(fusion(feat, clinical), feat)
    target = feat + clinical[:, :1, None, None, None]  # a shift that depends on the clinical vector
    opt = torch.optim.SGD(fusion.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        (fusion(feat, clinical) - target).square().mean().backward()
        opt.step()
    other = clinical.flip(0)
    assert not torch.allclose(fusion(feat, clinical), fusion(feat, other))


def test_every_zoo_model_builds_every_fusion_mode():
    """Fusion modes live in fusion.py alone: every zoo model picks up a new one through make_fusion."""
    for name in list_models():
        for mode in FUSION_MODES:
            kwargs = {"img_size": 32} if name == "unetr" else {}
            model = create_model(name, "tiny", fusion=mode, clinical_features=3, **kwargs)
            assert (model.fusion is None) if mode == "none" else (model.fusion.mode == mode), (name, mode)
    assert set(ATTENTION_MODES) <= set(FUSION_MODES)
    with pytest.raises(ValueError, match="fusion must be one of"):
        check_fusion_args("film", 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="fusion"):
        ClinicalFusion(16, 3, "gate")
    fusion = ClinicalFusion(16, 3, "add")
    with pytest.raises(ValueError, match="clinical_features=3"):
        fusion(torch.randn(2, 16, 2, 2, 2), torch.randn(2, 4))
