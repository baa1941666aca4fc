"""Ensembles (nny_models.ensemble, nnynet-predict --model A --model B): mean probabilities, one clinical
encoding per member, and refusal of members that disagree on what predict reads from config.json."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nny_models import NnyNet, NnyNetConfig
from nny_models.ensemble import Ensemble


def _model(seed: int, **overrides) -> NnyNet:
    torch.manual_seed(seed)
    kwargs = {"model": "unet", "model_kwargs": {"size": "tiny"}, "patch_size": (32, 32, 32), **overrides}
    return NnyNet(NnyNetConfig(**kwargs)).eval()


def test_forward_is_the_log_of_the_mean_probability(one_thread):
    a, b = _model(0), _model(1)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        mean = (a(x).softmax(1) + b(x).softmax(1)) / 2
        got = Ensemble([a, b])(x).softmax(1)
    torch.testing.assert_close(got, mean, atol=1e-5, rtol=1e-4)


def test_predict_with_an_ensemble_is_the_argmax_of_the_mean(one_thread):
    from nny_models.inference import predict

    a, b = _model(0), _model(1)
    ct = np.random.default_rng(0).normal(40, 30, (40, 40, 36)).astype(np.float32)
    ct[:4] = -1000.0
    kw = dict(spacing=(1.5, 1.5, 2.0), overlap=0.25, precision="fp32", force=True, return_probabilities=True)
    _, pa = predict(a, ct, **kw)
    _, pb = predict(b, ct, **kw)
    mask, pe = predict(Ensemble([a, b]), ct, **kw)
    np.testing.assert_allclose(pe, (pa + pb) / 2, atol=1e-4)
    assert mask.shape == ct.shape


def test_members_must_agree_on_what_predict_reads():
    with pytest.raises(ValueError, match="member 1 differs .* 'patch_size'"):
        Ensemble([_model(0), _model(1, patch_size=(64, 64, 64))])
    with pytest.raises(ValueError, match="'label_names'"):
        Ensemble([_model(0), _model(1, label_names=["background", "a", "b", "c", "d"][::-1])])


def test_clinical_rows_are_encoded_per_member():
    a = _model(0, model_kwargs={"size": "tiny", "fusion": "concat", "clinical_features": 3})
    b = _model(1)  # no fusion: takes no clinical part
    ensemble = Ensemble([a, b])
    assert ensemble.feature_sizes == [3, 0]
    vector = ensemble.encode_clinical(np.array([0.1, 0.2, 0.3], dtype=np.float32))
    assert vector.shape == (1, 3)
    with torch.no_grad():
        out = ensemble(torch.randn(1, 1, 32, 32, 32), vector)
    assert torch.isfinite(out).all()


def test_cli_averages_several_models(tmp_path, one_thread):
    import nibabel as nib

    from nny_models.cli import main

    ct = np.random.default_rng(1).normal(40, 30, (40, 40, 36)).astype(np.float32)
    ct[:4] = -1000.0
    ct[-4:] = 700.0
    nib.save(nib.Nifti1Image(ct, np.diag([1.5, 1.5, 2.0, 1.0])), tmp_path / "ct.nii.gz")
    for k in range(2):
        _model(k).save_pretrained(tmp_path / f"m{k}")
    code = main(["--model", str(tmp_path / "m0"), "--model", str(tmp_path / "m1"), "--input", str(tmp_path / "ct.nii.gz"),
                 "--output", str(tmp_path / "mask.nii.gz"), "--precision", "fp32", "--force"])  # fmt: skip
    assert code in (0, None)
    assert nib.load(tmp_path / "mask.nii.gz").shape == ct.shape
