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
from tests.reliability.test_model_config import edit_config  # noqa: E402

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


# ---- a model.onnx runs only with the config.json and weights it was exported from (audit finding 2) ---------


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


def _ct(tmp_path, seed=9):
    from nny_models.phantoms import generate_phantom

    case = generate_phantom(seed, preset="test")
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(case.image.astype(np.float32), case.affine), ct)
    return ct


@pytest.mark.parametrize("field, changes", [
    ("preprocessing.spacing", {"preprocessing_spacing": [2.0, 2.0, 2.5]}),
    ("preprocessing.hu_window", {"preprocessing_hu_window": [-200.0, 300.0]}),
    ("label_names", {"label_names": ["background", "liver", "tumor", "hepatic_vein", "spleen"]}),
    ("keep_largest", {"keep_largest": ["liver"]}),
    ("single_component", {"single_component": ["aorta"]}),
    ("tta_mirror_axes", {"tta_mirror_axes": [2]}),
])  # fmt: skip
def test_onnx_exported_from_another_config_is_refused(exported, tmp_path, capsys, field, changes):
    model, folder = exported
    folder = _copy(folder, tmp_path)
    edit_config(folder, **changes)  # a newer config.json beside the old export
    with pytest.raises(ValueError) as info:
        export.load_onnx_network(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(folder / "model.onnx"))
    assert str(folder / "config.json") in message and f"field '{field}'" in message and "nnynet-export" in message
    code = cli.main(["--model", str(folder), "--input", str(_ct(tmp_path)), "--output", str(tmp_path / "m.nii.gz"),
                     "--backend", "onnxruntime"])  # fmt: skip
    assert code == 2 and f"field '{field}'" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()


def test_onnx_check_ignores_descriptive_fields(exported, tmp_path):
    """Guard (passes before and after the fix): new metrics in the card do not make the export stale."""
    model, folder = exported
    folder = _copy(folder, tmp_path)
    edit_config(folder, metrics={"mean_foreground_dice": 0.9})
    assert export.load_onnx_network(folder).config.metrics == {"mean_foreground_dice": 0.9}


def test_onnx_exported_from_other_weights_is_refused(exported, tmp_path, caplog):
    import onnx
    import safetensors.torch

    model, folder = exported
    folder = _copy(folder, tmp_path)
    meta = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert meta["nnynet_weights_sha256"] == export.weights_fingerprint(model.inference_state_dict())
    state = safetensors.torch.load_file(folder / "model.safetensors")
    key = sorted(state)[0]
    state[key] = state[key] + 0.01  # retrained: same config.json, other weights
    safetensors.torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        export.load_onnx_network(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(folder / "model.onnx"))
    assert str(folder / "model.safetensors") in message and "nnynet-export" in message
    # an export written before the fingerprint existed: only its config can be checked, and that is said
    proto = onnx.load(str(folder / "model.onnx"))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != "nnynet_weights_sha256"]
    del proto.metadata_props[:]
    for k, v in kept:
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(folder / "model.onnx"))
    with caplog.at_level("WARNING", logger="nny_models.export"):
        assert export.load_onnx_network(folder).patch_size == PATCH
    assert "no weights fingerprint" in caplog.text


def test_save_pretrained_removes_a_stale_onnx(exported, tmp_path):
    from nny_models.hub import NnyNet

    model, folder = exported
    folder = _copy(folder, tmp_path)
    torch.manual_seed(1)
    retrained = NnyNet(NnyNetConfig.from_dict({**model.config.to_dict(), "label_names": [
        "background", "liver", "tumor", "hepatic_vein", "spleen"]}))
    retrained.save_pretrained(folder)
    assert not (folder / "model.onnx").exists()
    with pytest.raises(ValueError, match="no such ONNX file.*nnynet-export"):
        export.load_onnx_network(folder)


def test_export_is_written_aside_and_swapped_in(tmp_path):
    """A failed check (or a crash) never leaves a half-written or unverified file under the final name."""
    from nny_models.hub import NnyNet
    from nny_models.zoo import resolve_model_kwargs

    torch.manual_seed(0)
    model = NnyNet(NnyNetConfig(model="unet", model_kwargs=resolve_model_kwargs("unet", "tiny", out_channels=3),
                                label_names=["background", "liver", "tumor"], patch_size=(32, 32, 32)))
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(RuntimeError, match="differ from torch"):
        export.export_onnx(model, target, atol=-1.0)  # no graph passes: the check fails
    assert target.read_bytes() == b"previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    export.export_onnx(model, target)
    assert export.load_onnx_network(None, target).patch_size == (32, 32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
