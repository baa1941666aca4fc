"""ONNX export (nnynet-export) and the ONNX Runtime backend of predict / nnynet-predict.

One tiny nnynet with clinical fusion ("add": a strong clinical effect, so the clinical input is tested) is saved, exported once through the CLI (module fixture,
~15 s: the TorchScript exporter is slow on Swin graphs), and reused by every test.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from nny_models import cli, export  # noqa: E402
from nny_models.config import NnyNetConfig, PreprocessConfig  # noqa: E402
from nny_models.inference import predict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PATCH = (64, 32, 32)
FEATURES = 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from nny_models.hub import NnyNet

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = NnyNetConfig(
        model_kwargs={"size": "tiny", "fusion": "add", "clinical_features": FEATURES},
        patch_size=PATCH, preprocessing=PreprocessConfig(spacing=(4.0, 4.0, 4.0)).to_dict(),
    )  # fmt: skip
    model = NnyNet(config)
    model.save_pretrained(folder)
    assert export.main(["--model", str(folder)]) == 0  # default output: MODEL/model.onnx
    assert (folder / "model.onnx").is_file()
    return model.eval(), folder


def test_onnx_logits_equal_torch_dynamic_batch_and_clinical(exported):
    model, folder = exported
    net = export.load_onnx_network(folder)
    assert net.patch_size == PATCH and net.clinical_features == FEATURES and not net.supports_bf16
    gen = torch.Generator().manual_seed(3)
    for batch in (1, 3):  # dynamic batch: 3 was never traced
        image = torch.rand(batch, 1, *PATCH, generator=gen) * 2 - 1
        rows = torch.randn(batch, FEATURES, generator=gen)
        rows[0, 1] = float("nan")  # a missing value
        for clinical in (None, rows):
            with torch.no_grad():
                ref = model.net(image, clinical)
            out = net(image, clinical)
            assert out.shape == ref.shape
            assert float((out - ref).abs().max()) < 1e-3
    with torch.no_grad():  # the clinical input matters, so the comparison above covers the fusion path
        assert not torch.allclose(model.net(image, None), model.net(image, rows), atol=1e-3)


def test_onnx_metadata_carries_the_config(exported):
    import onnx

    model, folder = exported
    meta = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert NnyNetConfig.from_dict(json.loads(meta["nnynet_config"])) == model.config
    alone = export.load_onnx_network(None, folder / "model.onnx")  # no config.json needed
    assert alone.config == model.config


def test_predict_onnxruntime_mask_equals_torch(exported):
    from nny_models.phantoms import generate_phantom

    model, folder = exported
    case = generate_phantom(7, preset="test")
    clinical = np.array([0.5, np.nan, -1.0], dtype=np.float32)
    mask_t, probs_t = predict(model, case.image, affine=case.affine, clinical=clinical, precision="fp32",
                              device="cpu", return_probabilities=True)  # fmt: skip
    mask_o, probs_o = predict(export.load_onnx_network(folder), case.image, affine=case.affine, clinical=clinical,
                              device="cpu", return_probabilities=True)  # fmt: skip
    assert np.abs(probs_o - probs_t).max() < 1e-3
    # equal wherever torch's decision is not a numerical tie (top-2 probabilities within 1e-4)
    top2 = np.sort(probs_t, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 1e-4
    assert decided.mean() > 0.99
    assert np.array_equal(mask_o[decided], mask_t[decided])
    assert len(np.unique(mask_t)) > 1  # an untrained net still splits the volume: not a constant mask


def test_cli_backend_onnxruntime_writes_the_torch_mask(exported, tmp_path, capsys):
    from nny_models.phantoms import generate_phantom

    model, folder = exported
    case = generate_phantom(8, preset="test")
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(case.image.astype(np.float32), case.affine), ct)
    outs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.nii.gz"
        argv = ["--model", str(folder), "--input", str(ct), "--output", str(out), "--backend", backend]
        argv += ["--precision", "fp32"] if backend == "torch" else []
        assert cli.main(argv) == 0, capsys.readouterr().err
        outs[backend] = np.asarray(nib.load(out).dataobj)
    agree = np.mean(outs["torch"] == outs["onnxruntime"])
    assert agree > 0.999, agree  # identical up to numerical ties (see the test above)


def test_onnx_errors_are_clear(exported, tmp_path, capsys):
    model, folder = exported
    empty = tmp_path / "no_onnx"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(model.config.to_dict()))
    with pytest.raises(ValueError, match="no such ONNX file.*nnynet-export"):
        export.load_onnx_network(empty)
    other = NnyNetConfig.from_dict({**model.config.to_dict(), "patch_size": [32, 32, 32]})
    with pytest.raises(ValueError, match="patch_size"):
        export.OnnxRuntimeNetwork(folder / "model.onnx", other)
    with pytest.raises(ValueError, match="bf16"):
        predict(export.load_onnx_network(folder), np.full((40, 40, 40), -1000.0), spacing=(4, 4, 4),
                precision="bf16", device="cpu")  # fmt: skip
    from nny_models.phantoms import generate_phantom

    case = generate_phantom(9, preset="test")
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(case.image.astype(np.float32), case.affine), ct)
    code = cli.main(["--model", str(empty), "--input", str(ct), "--output", str(tmp_path / "m.nii.gz"),
                     "--backend", "onnxruntime"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "model.onnx" in err and "nnynet-export" in err, err
