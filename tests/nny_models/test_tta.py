"""Mirror test-time augmentation (nny_models.tta): the flip average, un-mirrored; only along the axes config.json
lists as trained-mirrored (NnyNetConfig.tta_mirror_axes); predict's tta argument; TTA with ensembles; the CLI flags."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from nny_models import NnyNet, NnyNetConfig, predict
from nny_models.config import PreprocessConfig
from nny_models.ensemble import Ensemble
from nny_models.tta import MirrorTTA, mirror_combinations

SPACING = (1.5, 1.5, 2.0)
# No body crop, and the CT already on the model grid: preprocessing is the identity up to the HU mapping, so a
# mirrored CT gives exactly the mirrored network input (and one 32^3 window covers it).
FLAT = PreprocessConfig(spacing=SPACING, crop_foreground=False).to_dict()


def _model(seed: int = 0, axes=(), **overrides) -> NnyNet:
    torch.manual_seed(seed)
    kwargs = {"model": "unet", "model_kwargs": {"size": "tiny"}, "patch_size": (32, 32, 32), "preprocessing": FLAT,
              "tta_mirror_axes": list(axes), **overrides}
    return NnyNet(NnyNetConfig(**kwargs)).eval()


def _ct(seed: int = 0, shape=(32, 32, 32)) -> np.ndarray:
    ct = np.random.default_rng(seed).normal(40, 60, shape).astype(np.float32)
    ct[:3] = -1000.0  # air, fat-free body: enough for the HU check under force=True
    ct[-3:, :, :5] = 900.0
    return ct


KW = dict(spacing=SPACING, overlap=0.25, precision="fp32", force=True, return_probabilities=True)


def test_mirror_combinations_are_all_subsets():
    assert mirror_combinations([0, 2]) == [(), (0,), (2,), (0, 2)]
    assert len(mirror_combinations([0, 1, 2])) == 8


def test_forward_is_the_unmirrored_flip_average(one_thread):
    model = _model(0, axes=(0, 2))
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        manual = sum(model(x.flip(d)).softmax(1).flip(d) for d in ([], [2], [4], [2, 4])) / 4
        got = MirrorTTA(model)(x).softmax(1)
        plain = model(x).softmax(1)
    torch.testing.assert_close(got, manual, atol=1e-5, rtol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # an untrained net is not mirror-symmetric: TTA changed something


def test_predict_tta_equals_predictions_on_mirrored_ct(one_thread):
    """End to end: predict(tta=True) = mean of predict on the CT and on its mirror (mirrored back)."""
    model = _model(1, axes=(1,))
    ct = _ct(1)
    _, p = predict(model, ct, tta=False, **KW)
    _, p_mirror = predict(model, np.ascontiguousarray(ct[:, ::-1]), tta=False, **KW)
    mask, p_tta = predict(model, ct, tta=True, **KW)
    expected = (p + p_mirror[:, :, ::-1]) / 2
    np.testing.assert_allclose(p_tta, expected, atol=1e-4)
    np.testing.assert_array_equal(mask, expected.argmax(0))
    assert np.abs(p_tta - p).max() > 1e-3


def _count_forwards(model: NnyNet) -> list[int]:
    calls = [0]
    model.net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_tta_none_follows_config_json(one_thread):
    ct = _ct(2)
    with_axes = _model(2, axes=(0, 1))
    calls = _count_forwards(with_axes)
    predict(with_axes, ct, **KW)  # tta=None: config says [0, 1] -> 4 passes on the one window
    assert calls[0] == 4
    predict(with_axes, ct, tta=False, **KW)
    assert calls[0] == 5
    without = _model(2)
    calls = _count_forwards(without)
    predict(without, ct, **KW)  # tta=None, no axes in config.json: one pass
    assert calls[0] == 1


def test_tta_true_without_safe_axes_is_refused():
    model = _model(3)
    with pytest.raises(ValueError, match="tta=True.*no tta_mirror_axes"):
        predict(model, _ct(3), tta=True, **KW)
    with pytest.raises(ValueError, match="no tta_mirror_axes"):
        MirrorTTA(model)
    with pytest.raises(ValueError, match=r"axes \[0\] are not in the model's config.json tta_mirror_axes \[2\]"):
        MirrorTTA(_model(3, axes=(2,)), (0, 2))
    assert MirrorTTA(model, (0,), unsafe=True).axes == (0,)
    with pytest.raises(ValueError, match="already mirrors"):
        MirrorTTA(MirrorTTA(_model(3, axes=(2,))))
    with pytest.raises(ValueError, match="tta must be None, True or False"):
        predict(model, _ct(3), tta="yes", **KW)


@pytest.mark.parametrize("axes", [[3], [0, 0], [True], "0", [0.0], None])
def test_config_field_is_validated(axes):
    with pytest.raises(ValueError, match="NnyNetConfig.tta_mirror_axes"):
        NnyNetConfig(model="unet", model_kwargs={"size": "tiny"}, tta_mirror_axes=axes)


def test_config_field_round_trips_and_defaults_for_old_files(tmp_path):
    config = NnyNetConfig(model="unet", model_kwargs={"size": "tiny"}, tta_mirror_axes=(2, 0))
    assert config.tta_mirror_axes == [0, 2]
    assert NnyNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    old = config.to_dict()
    del old["tta_mirror_axes"]  # a config.json written before the field existed
    assert NnyNetConfig.from_dict(old).tta_mirror_axes == []


def test_finetune_states_its_flip_axes(one_thread):
    from finetune.run import FinetuneConfig, build_model

    labels = ["background", "liver", "tumor"]
    data = {"schema": None, "labels": labels}
    for flips, augment, expected in [((2, 0), True, [0, 2]), ((), True, []), ((1,), False, [])]:
        cfg = FinetuneConfig(model="unet", size="tiny", patch_size=(32, 32, 32), flip_axes=flips, augment=augment,
                             fusion="none")
        model, _ = build_model(cfg, None, data, PreprocessConfig(), accelerator=None)
        assert model.config.tta_mirror_axes == expected, (flips, augment)


def test_tta_of_an_ensemble_equals_an_ensemble_of_tta_members(one_thread):
    a, b = _model(4, axes=(0, 2)), _model(5, axes=(2,))
    ensemble = Ensemble([a, b])
    assert ensemble.config.tta_mirror_axes == [2]  # only the axes every member was trained mirrored on
    assert a.config.tta_mirror_axes == [0, 2]  # the member's own config is untouched
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        outer = MirrorTTA(ensemble)(x).softmax(1)
        inner = Ensemble([MirrorTTA(a, (2,)), MirrorTTA(b)])(x).softmax(1)
        manual = sum(m(x.flip(d)).softmax(1).flip(d) for m in (a, b) for d in ([], [4])) / 4
    torch.testing.assert_close(outer, manual, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(inner, manual, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"tta_mirror_axes \[0\] are not all safe"):
        Ensemble([a, b], tta_mirror_axes=[0])


def test_predict_with_ensembles_and_tta(one_thread):
    a, b = _model(6, axes=(1,)), _model(7, axes=(1,))
    ct = _ct(4)
    _, p_outer = predict(Ensemble([a, b]), ct, **KW)  # tta=None: the ensemble's config says [1]
    _, p_inner = predict(Ensemble([MirrorTTA(a), MirrorTTA(b)]), ct, **KW)  # already mirrors: not wrapped again
    _, p_off = predict(Ensemble([a, b]), ct, tta=False, **KW)
    np.testing.assert_allclose(p_outer, p_inner, atol=1e-5)
    assert np.abs(p_outer - p_off).max() > 1e-3
    with pytest.raises(ValueError, match="already mirrors"):
        predict(Ensemble([MirrorTTA(a), MirrorTTA(b)]), ct, tta=False, **KW)


def test_clinical_vector_passes_through(one_thread):
    from nny_models.inference import clinical_vector

    model = _model(8, axes=(2,), model_kwargs={"size": "tiny", "fusion": "concat", "clinical_features": 3})
    tta = MirrorTTA(model)
    assert tta.fusion is model.net.fusion
    row = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    vector = clinical_vector(tta, row)
    torch.testing.assert_close(vector, clinical_vector(model, row))
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        manual = (model(x, vector).softmax(1) + model(x.flip(4), vector).softmax(1).flip(4)) / 2
        torch.testing.assert_close(tta(x, vector).softmax(1), manual, atol=1e-5, rtol=1e-4)


def test_cli_tta_flags(tmp_path, capsys, one_thread):
    from nny_models.cli import main, parse_args

    base = ["--model", "m", "--input", "x.nii.gz", "--output", "y.nii.gz"]
    assert parse_args(base).tta is None
    assert parse_args(base + ["--tta"]).tta is True
    assert parse_args(base + ["--no-tta"]).tta is False
    nib.save(nib.Nifti1Image(_ct(5), np.diag([*SPACING, 1.0])), tmp_path / "ct.nii.gz")
    _model(9).save_pretrained(tmp_path / "plain")
    _model(9, axes=(2,)).save_pretrained(tmp_path / "mirrored")
    args = ["--input", str(tmp_path / "ct.nii.gz"), "--precision", "fp32", "--force", "--device", "cpu"]
    code = main(["--model", str(tmp_path / "plain"), "--output", str(tmp_path / "a.nii.gz"), "--tta", *args])
    assert code == 2 and "no tta_mirror_axes" in capsys.readouterr().err
    assert not (tmp_path / "a.nii.gz").exists()
    for flag, name in [("--tta", "b"), ("--no-tta", "c")]:
        code = main(["--model", str(tmp_path / "mirrored"), "--output", str(tmp_path / f"{name}.nii.gz"), flag, *args])
        assert code == 0, capsys.readouterr().err
    b = np.asarray(nib.load(tmp_path / "b.nii.gz").dataobj)
    mirrored = NnyNet.from_pretrained(tmp_path / "mirrored")
    expected = predict(mirrored, tmp_path / "ct.nii.gz", tta=True, precision="fp32", force=True, device="cpu")
    np.testing.assert_array_equal(b, expected)
