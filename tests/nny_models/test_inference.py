"""predict(): input checks, clinical handling, and that the mask lands on the ORIGINAL voxel grid.

The alignment tests use a network whose output is a fixed function of each voxel's intensity
(a threshold), so the expected mask is known exactly: the bright cube of a synthetic CT.
"""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from nny_models.config import NnyNetConfig, PreprocessConfig
from nny_models.inference import check_ct_volume, predict

pytest.importorskip("nny_models.preprocessing")


class ThresholdNet(nn.Module):
    """Logits for label 1 where the (preprocessed) intensity exceeds a threshold, else label 0."""

    size_divisor = 1

    def __init__(self, config: NnyNetConfig, threshold: float = 0.15, clinical_features: int = 0):
        super().__init__()
        self.config = config
        self.threshold = threshold
        self.fusion = nn.Linear(clinical_features, 1) if clinical_features else None
        if self.fusion is not None:
            self.fusion.clinical_features = clinical_features
        self.seen_clinical: list = []
        self.seen_shapes: list = []

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        self.seen_clinical.append(None if clinical is None else clinical.clone())
        self.seen_shapes.append(tuple(image.shape))
        fg = (image > self.threshold).float() * 8.0 - 4.0
        others = torch.full_like(image, -10.0).expand(-1, len(self.config.label_names) - 2, -1, -1, -1)
        return torch.cat([-fg, fg, others], dim=1)


def make_config(patch: int = 16, spacing=(1.5, 1.5, 2.0)) -> NnyNetConfig:
    return NnyNetConfig(patch_size=(patch,) * 3, preprocessing=PreprocessConfig(spacing=spacing).to_dict())


def synthetic_ct(shape=(48, 40, 20)) -> tuple[np.ndarray, np.ndarray]:
    """Air around a soft-tissue body with an off-centre bright cube; returns (volume HU, cube mask)."""
    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[4:-4, 4:-4, 2:-2] = 40.0
    cube = np.zeros(shape, dtype=bool)
    cube[10:22, 8:20, 5:11] = True  # asymmetric position: a flipped axis would miss it
    vol[cube] = 300.0
    vol += np.random.default_rng(0).normal(0, 5, shape).astype(np.float32)
    return vol, cube


def assert_on_cube(mask: np.ndarray, cube: np.ndarray) -> None:
    assert mask.dtype == np.uint8 and mask.shape == cube.shape
    inner = ndimage.binary_erosion(cube, iterations=1)
    outer = ndimage.binary_dilation(cube, iterations=1)
    assert (mask[inner] == 1).all(), "cube interior not labelled"
    assert (mask[~outer] == 0).all(), "label outside the cube"
    dice = 2 * np.logical_and(mask == 1, cube).sum() / ((mask == 1).sum() + cube.sum())
    assert dice > 0.85, dice


# Voxel -> world maps: RAS-diagonal, LPS (x and y flipped), and permuted axes with a flip,
# all anisotropic (0.9 x 0.9 x 3.0 mm) so resampling to the model spacing is exercised.
AFFINES = {
    "ras": np.diag([0.9, 0.9, 3.0, 1.0]),
    "lps": np.array([[-0.9, 0, 0, 20.0], [0, -0.9, 0, 15.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]]),
    "permuted": np.array([[0, 0, 3.0, 0], [-0.9, 0, 0, 30.0], [0, 0.9, 0, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_mask_lands_on_cube_in_original_grid(name):
    vol, cube = synthetic_ct()
    model = ThresholdNet(make_config())
    mask = predict(model, vol, affine=AFFINES[name], overlap=0.25, device="cpu")
    assert_on_cube(mask, cube)
    assert len(model.seen_shapes) > 1 and all(s[2:] == (16, 16, 16) for s in model.seen_shapes)


def test_file_input_and_probabilities(tmp_path):
    vol, cube = synthetic_ct()
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, AFFINES["lps"]), path)
    model = ThresholdNet(make_config())
    mask, probs = predict(model, path, device="cpu", return_probabilities=True)
    assert_on_cube(mask, cube)
    assert probs.shape == (5, *vol.shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    assert (probs[1][ndimage.binary_erosion(cube)] > 0.5).all()


def test_keep_largest_from_the_config_drops_a_second_blob():
    vol, cube = synthetic_ct()
    vol[30:36, 28:34, 12:16] = 300.0  # a second, smaller bright blob: label 1 too without post-processing
    raw = predict(ThresholdNet(make_config()), vol, spacing=(0.9, 0.9, 3.0), device="cpu")
    assert (raw[30:36, 28:34, 12:16] == 1).any()
    config = make_config()
    config.keep_largest = ["liver", "tumor"]  # label 1 is "liver" in the default label map
    mask = predict(ThresholdNet(config), vol, spacing=(0.9, 0.9, 3.0), device="cpu")
    assert (mask[30:36, 28:34, 12:16] == 0).all()
    assert_on_cube(mask, cube)


def test_label_resampling_from_probabilities_follows_a_round_edge_and_keeps_post_processing():
    """config.label_resampling: "probabilities" draws a bright ball on the 1 mm CT from the 3 mm model grid's
    softmax, closer to the ball than the model grid's voxel steps ("nearest", the default of files without the
    field); what keep_largest removed on the model grid stays removed."""
    shape, centre, radius = (60, 60, 40), np.array([28.3, 30.6, 19.2]), 9.0
    grid = np.stack(np.indices(shape), -1).astype(np.float32)
    ball = np.linalg.norm(grid - centre, axis=-1) < radius
    vol = np.full(shape, 40.0, np.float32)
    vol[ball] = 300.0
    vol[2:6, 2:6, 2:6] = 300.0  # a second, small bright blob that keep_largest drops
    masks = {}
    for mode in ("nearest", "probabilities"):
        config = make_config(patch=16, spacing=(3.0, 3.0, 3.0))
        config.keep_largest = ["liver"]
        config.label_resampling = mode
        masks[mode] = predict(ThresholdNet(config), vol, spacing=(1.0, 1.0, 1.0), device="cpu", overlap=0.25,
                                 force=True)  # a ball in soft tissue: no air or fat for the CT check
    dice = {m: 2 * ((k == 1) & ball).sum() / ((k == 1).sum() + ball.sum()) for m, k in masks.items()}
    assert dice["probabilities"] > dice["nearest"] + 0.02 and dice["probabilities"] > 0.9, dice
    assert not (masks["probabilities"][:10, :10, :10] == 1).any()  # the dropped blob did not come back
    assert NnyNetConfig.from_dict({k: v for k, v in make_config().to_dict().items()
                                   if k != "label_resampling"}).label_resampling == "nearest"


class NaNNet(ThresholdNet):
    """Finite logits except NaN on the cube: argmax would call those voxels background, silently."""

    def forward(self, image, clinical=None):
        out = super().forward(image, clinical)
        return torch.where(image > self.threshold, torch.nan, out)


def test_non_finite_network_output_is_an_error_not_an_empty_mask(tmp_path):
    vol, _ = synthetic_ct()
    with pytest.raises(RuntimeError, match="probabilities for input array hold NaN / Inf .*no mask was written"):
        predict(NaNNet(make_config()), vol, spacing=(0.9, 0.9, 3.0), device="cpu")


def test_array_with_spacing_only():
    vol, cube = synthetic_ct()
    mask = predict(ThresholdNet(make_config()), vol, spacing=(0.9, 0.9, 3.0), device="cpu")
    assert_on_cube(mask, cube)
    with pytest.raises(ValueError, match="spacing"):
        predict(ThresholdNet(make_config()), vol, device="cpu")


def test_bf16_autocast_matches_fp32():
    vol, cube = synthetic_ct()
    mask = predict(ThresholdNet(make_config()), vol, spacing=(0.9, 0.9, 3.0), device="cpu", amp=True)
    assert_on_cube(mask, cube)


@pytest.mark.parametrize(
    "volume, match",
    [
        (np.zeros((64, 64), np.float32), "3D CT"),  # 2D image
        (np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8), "at least 8 voxels"),  # RGB
        (np.random.default_rng(0).random((32, 32, 32)).astype(np.float32), "Hounsfield"),  # [0, 1]
        (np.random.default_rng(0).integers(0, 256, (32, 32, 32)).astype(np.uint8), "Hounsfield"),  # [0, 255]
        (np.full((32, 32, 32), -1000.0, np.float32), "Hounsfield"),  # constant
        (np.where(np.eye(32)[..., None] > 0, np.nan, -1000.0) * np.ones((1, 1, 32)), "NaN"),
    ],
)
def test_rejects_non_ct(volume, match):
    with pytest.raises(ValueError, match=match):
        check_ct_volume(volume, "scan.png")
    with pytest.raises(ValueError, match=match):
        predict(ThresholdNet(make_config()), volume, spacing=(1.0, 1.0, 1.0), device="cpu")


def test_clinical_none_vector_and_no_fusion_warning():
    vol, _ = synthetic_ct()
    fused = ThresholdNet(make_config(), clinical_features=3)
    predict(fused, vol, spacing=(0.9, 0.9, 3.0), device="cpu")
    assert all(c is None for c in fused.seen_clinical)  # learned "no clinical" embedding

    fused.seen_clinical.clear()
    predict(fused, vol, spacing=(0.9, 0.9, 3.0), clinical=np.array([1.0, 2.0, 3.0]), device="cpu")
    for c in fused.seen_clinical:  # one row per window in the batch
        assert c.shape[1] == 3 and torch.equal(c, torch.tensor([[1.0, 2.0, 3.0]]).expand(c.shape[0], -1))
    with pytest.raises(ValueError, match="expects 3 features"):
        predict(fused, vol, spacing=(0.9, 0.9, 3.0), clinical=[1.0, 2.0], device="cpu")

    plain = ThresholdNet(make_config())
    with pytest.warns(UserWarning, match="without clinical fusion"):
        predict(plain, vol, spacing=(0.9, 0.9, 3.0), clinical={"age": 60}, device="cpu")
    assert all(c is None for c in plain.seen_clinical)


def test_tiny_nnynet_end_to_end():
    hub = pytest.importorskip("nny_models.hub")
    torch.manual_seed(0)
    config = make_config(patch=64, spacing=(3.0, 3.0, 3.0))  # 32 leaves a 1^3 bottleneck: GroupNorm fails
    config.model_kwargs = {"size": "tiny"}
    model = hub.NnyNet(config)
    vol, _ = synthetic_ct((40, 36, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no silent fallbacks
        # an untrained model finds a few mL of 'liver': that warning is about its mask, not a fallback
        warnings.filterwarnings("ignore", message=r".*mL of liver found")
        mask = predict(model, vol, affine=AFFINES["permuted"], device="cpu")
    assert mask.shape == vol.shape and mask.dtype == np.uint8
    assert mask.max() < len(config.label_names)


def test_clinical_row_sources_agree_and_missing_columns_are_imputed(tmp_path):
    import pandas as pd

    clinical = pytest.importorskip("finetune.clinical")
    from nny_models.clinical import ClinicalSchema

    df = pd.DataFrame({"case_id": ["a", "b", "c", "d", "e"], "age": [50.0, 61.0, None, 70.0, 44.0],
                       "afp": [10.0, 400.0, 25.0, None, 8.0], "sex": ["M", "F", "M", "M", "F"]}).set_index("case_id")
    schema = clinical.fit_clinical_schema(df)
    config = make_config()
    config.clinical_schema = schema.to_dict()
    model = ThresholdNet(config, clinical_features=schema.num_features)
    vol, cube = synthetic_ct()
    row = {"age": 58.0, "afp": None, "sex": "F"}
    expected = ClinicalSchema.from_dict(config.clinical_schema).transform(row)
    (tmp_path / "row.json").write_text(json.dumps(row))
    (tmp_path / "row.csv").write_text("age,afp,sex\n58,,F\n")
    for source in (row, pd.DataFrame([row]), pd.Series(row), tmp_path / "row.json", str(tmp_path / "row.csv")):
        model.seen_clinical.clear()
        mask = predict(model, vol, spacing=(0.9, 0.9, 3.0), clinical=source, device="cpu")
        assert_on_cube(mask, cube)
        np.testing.assert_allclose(model.seen_clinical[0][:1].numpy(), expected, rtol=1e-6)

    with pytest.warns(UserWarning, match="afp"):
        predict(model, vol, spacing=(0.9, 0.9, 3.0), clinical={"age": 58.0, "sex": "F"}, device="cpu")
    with pytest.raises(ValueError, match="one data row"):
        (tmp_path / "two.csv").write_text("age,afp,sex\n58,,F\n60,3,M\n")
        predict(model, vol, spacing=(0.9, 0.9, 3.0), clinical=tmp_path / "two.csv", device="cpu")


def row_major(t: torch.Tensor) -> tuple[int, ...]:
    """The strides of a plain (contiguous_format) tensor of t's shape."""
    return tuple(int(np.prod(t.shape[k + 1:])) for k in range(t.dim()))


def test_channels_last_windows_match_and_the_model_gets_its_layout_back():
    """predict runs the network with channels-last weights on a CPU (faster oneDNN convs) and restores the
    model's layout, even when a window fails: fine-tuning validates through predict and then trains on."""
    from nny_models.hub import NnyNet
    from nny_models.inference import channels_last_on_cpu, sliding_window_probs

    torch.manual_seed(0)
    model = NnyNet(NnyNetConfig(model_kwargs={"size": "tiny"}, patch_size=(64, 64, 32))).eval()
    x = torch.randn(1, 1, 80, 72, 40)
    with torch.inference_mode():
        plain = model(x[..., :64, :64, :32])
        with channels_last_on_cpu(model, torch.device("cpu")):
            weights = [w for w in model.parameters() if w.dim() == 5]
            assert all(w.stride() == w.contiguous(memory_format=torch.channels_last_3d).stride() for w in weights)
            assert any(w.stride() != row_major(w) for w in weights)
            fast = model(x[..., :64, :64, :32])
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
        assert all(w.stride() == row_major(w) for w in model.parameters())
        with pytest.raises(RuntimeError, match="boom"), channels_last_on_cpu(model, torch.device("cpu")):
            raise RuntimeError("boom")
        assert all(w.stride() == row_major(w) for w in model.parameters())
        probs = sliding_window_probs(model, x, (64, 64, 32), overlap=0.25)
    assert probs.shape == (1, 5, 80, 72, 40) and all(w.stride() == row_major(w) for w in model.parameters())
