import numpy as np
import pytest
import torch

from finetune.loss import DiceFocalCELoss

# A 2-class, 1x2x2x2 case small enough to compute every term by hand with numpy.
LOGITS = np.array(
    [
        [[[2.0, -1.0], [0.5, 0.0]], [[1.0, 3.0], [-2.0, 0.2]]],  # class 0
        [[[0.0, 1.0], [1.5, -0.5]], [[0.3, -1.0], [2.0, 0.1]]],  # class 1
    ]
)
TARGET = np.array([[[0, 1], [1, 0]], [[0, 0], [1, 1]]])


def _numpy_terms(logits: np.ndarray, target: np.ndarray, gamma: float, include_background: bool):
    e = np.exp(logits - logits.max(0, keepdims=True))
    p = e / e.sum(0, keepdims=True)  # (C, X, Y, Z)
    onehot = np.stack([target == c for c in range(logits.shape[0])]).astype(float)
    classes = range(logits.shape[0]) if include_background else range(1, logits.shape[0])
    dice = []
    for c in classes:
        tp = (p[c] * onehot[c]).sum()
        fp = (p[c] * (1 - onehot[c])).sum()
        fn = ((1 - p[c]) * onehot[c]).sum()
        dice.append(1 - (2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5))
    pt = (p * onehot).sum(0)
    ce = -np.log(pt).mean()
    focal = (-((1 - pt) ** gamma) * np.log(pt)).sum() / (target.size * logits.shape[0])
    return float(np.mean(dice)), float(focal), float(ce)


def _tensors():
    return torch.tensor(LOGITS[None], dtype=torch.float32), torch.tensor(TARGET[None, None])


@pytest.mark.parametrize("include_background", [False, True])
def test_terms_match_hand_computation(include_background):
    logits, target = _tensors()
    dice, focal, ce = _numpy_terms(LOGITS, TARGET, 2.0, include_background)
    kw = dict(include_background=include_background)
    got_dice = DiceFocalCELoss(1, 0, 0, **kw)(logits, target).item()
    got_focal = DiceFocalCELoss(0, 1, 0, **kw)(logits, target).item()
    got_ce = DiceFocalCELoss(0, 0, 1, **kw)(logits, target).item()
    assert got_dice == pytest.approx(dice, rel=1e-5)
    assert got_focal == pytest.approx(focal, rel=1e-5)
    assert got_ce == pytest.approx(ce, rel=1e-5)
    total = DiceFocalCELoss(0.5, 2.0, 1.5, **kw)(logits, target).item()
    assert total == pytest.approx(0.5 * dice + 2.0 * focal + 1.5 * ce, rel=1e-5)


def test_gamma_zero_focal_is_ce_over_classes():
    logits, target = _tensors()
    focal = DiceFocalCELoss(0, 1, 0, gamma=0.0)(logits, target).item()
    ce = DiceFocalCELoss(0, 0, 1)(logits, target).item()
    assert focal == pytest.approx(ce / 2, rel=1e-5)


def test_perfect_prediction_is_near_zero():
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    logits = 30.0 * torch.nn.functional.one_hot(target[:, 0], 3).permute(0, 4, 1, 2, 3).float()
    assert DiceFocalCELoss()(logits, target).item() < 1e-4
    wrong = DiceFocalCELoss()(-logits, target).item()
    assert wrong > 1.0


def test_gradients_finite():
    logits = torch.randn(2, 5, 8, 8, 8, requires_grad=True)
    target = torch.randint(0, 5, (2, 1, 8, 8, 8))
    target[1] = 0  # a patch without foreground must not give NaN
    loss = DiceFocalCELoss()(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_deep_supervision_weighting():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (1, 1, 8, 8, 8))
    outs = [torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 2, 2, 2)]
    loss_fn = DiceFocalCELoss()
    per_scale = []
    for out in outs:
        s = 8 // out.shape[-1]
        t = target[..., ::s, ::s, ::s]  # nearest downsampling by an integer factor picks these voxels
        per_scale.append(loss_fn(out, t).item())
    expected = (per_scale[0] + 0.5 * per_scale[1] + 0.25 * per_scale[2]) / 1.75
    assert loss_fn(outs, target).item() == pytest.approx(expected, rel=1e-5)
    custom = DiceFocalCELoss(ds_weights=[1.0, 0.0, 3.0])(outs, target).item()
    assert custom == pytest.approx((per_scale[0] + 3 * per_scale[2]) / 4, rel=1e-5)
    assert loss_fn(outs[:1], target).item() == pytest.approx(per_scale[0], rel=1e-6)
    with pytest.raises(ValueError, match="ds_weights"):
        DiceFocalCELoss(ds_weights=[1.0, 1.0])(outs, target)


def test_bad_target_shape():
    with pytest.raises(ValueError, match="expected target"):
        DiceFocalCELoss()(torch.randn(1, 3, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.long))


def test_class_weights_weigh_ce_and_focal_per_class():
    logits, target = _tensors()
    w = [1.0, 3.0]
    plain = DiceFocalCELoss(dice_weight=0, focal_weight=0, ce_weight=1)(logits, target)
    weighted = DiceFocalCELoss(dice_weight=0, focal_weight=0, ce_weight=1, class_weights=w)(logits, target)
    # torch's weighted CE: sum_i w[y_i] * nll_i / sum_i w[y_i]
    e = np.exp(LOGITS - LOGITS.max(0, keepdims=True))
    pt = (e / e.sum(0, keepdims=True) * np.stack([TARGET == c for c in range(2)])).sum(0)
    wt = np.where(TARGET == 1, w[1], w[0])
    assert torch.isclose(weighted, torch.tensor((wt * -np.log(pt)).sum() / wt.sum(), dtype=torch.float32), atol=1e-5)
    assert not torch.isclose(weighted, plain)
    focal_w = DiceFocalCELoss(dice_weight=0, focal_weight=1, ce_weight=0, class_weights=w)(logits, target)
    focal = DiceFocalCELoss(dice_weight=0, focal_weight=1, ce_weight=0)(logits, target)
    assert focal_w > focal  # class 1 (weight 3) voxels count more
    with pytest.raises(ValueError, match="one weight > 0 per class"):
        DiceFocalCELoss(class_weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="3 class_weights for 2 classes"):
        DiceFocalCELoss(class_weights=[1.0, 1.0, 1.0])(logits, target)
