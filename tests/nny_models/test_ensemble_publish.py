"""Publishing ensembles (nny_models.ensemble.save_ensemble / load_model): one save_pretrained folder per member
plus a top-level config.json and card; strict loading with errors naming the member folder and field; refusal by
NnyNet.from_pretrained; the Hub path (snapshot_download restricted to the members' files); nnynet-predict."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from nny_models import Ensemble, MirrorTTA, NnyNet, NnyNetConfig, load_model, predict, save_ensemble

FIXTURES = Path(__file__).parent / "fixtures"
SPACING = (1.5, 1.5, 2.0)
KW = dict(spacing=SPACING, overlap=0.25, precision="fp32", force=True, return_probabilities=True, device="cpu")


def _model(seed: int, axes=(), **overrides) -> NnyNet:
    torch.manual_seed(seed)
    kwargs = {"model": "unet", "model_kwargs": {"size": "tiny"}, "patch_size": (32, 32, 32),
              "tta_mirror_axes": list(axes), **overrides}
    return NnyNet(NnyNetConfig(**kwargs)).eval()


def _ct(seed: int = 0) -> np.ndarray:
    ct = np.random.default_rng(seed).normal(40, 60, (40, 36, 32)).astype(np.float32)
    ct[:4] = -1000.0
    ct[-4:, :, :6] = 800.0
    return ct


@pytest.fixture()
def saved(tmp_path):
    members = [_model(0, axes=(2,)), _model(1, axes=(1, 2))]
    folder = save_ensemble(members, tmp_path / "ens")
    return folder, members


def test_saved_ensemble_reloads_and_predicts_like_the_in_memory_one(saved, one_thread):
    folder, members = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "member_0", "member_1"]
    config = json.loads((folder / "config.json").read_text())
    assert config["ensemble"] == {"format_version": 1, "members": ["member_0", "member_1"], "combine": "mean_softmax"}
    assert config["tta_mirror_axes"] == [2] and config["patch_size"] == [32, 32, 32]
    assert NnyNet.from_pretrained(folder / "member_1").config.tta_mirror_axes == [1, 2]  # a normal saved model
    loaded = load_model(folder)
    assert isinstance(loaded, Ensemble) and len(loaded.members) == 2
    assert loaded.config.tta_mirror_axes == [2]
    ct = _ct(0)
    for tta in (False, None):
        mask, probs = predict(loaded, ct, tta=tta, **KW)
        mask_ref, probs_ref = predict(Ensemble(members), ct, tta=tta, **KW)
        np.testing.assert_allclose(probs, probs_ref, atol=1e-6)
        np.testing.assert_array_equal(mask, mask_ref)


def test_saved_tta_axes_may_restrict_the_members(tmp_path):
    folder = save_ensemble([_model(0, axes=(2,)), _model(1, axes=(2,))], tmp_path / "ens", tta_mirror_axes=[])
    assert load_model(folder).config.tta_mirror_axes == []
    with pytest.raises(ValueError, match="not all safe"):
        save_ensemble([_model(0, axes=(2,)), _model(1)], tmp_path / "bad", tta_mirror_axes=[2])


def test_load_model_returns_a_single_model_for_a_save_pretrained_folder(tmp_path):
    _model(3, axes=(0,)).save_pretrained(tmp_path / "one")
    model = load_model(tmp_path / "one")
    assert type(model) is NnyNet and model.config.tta_mirror_axes == [0]
    old = load_model(FIXTURES / "config_v0")  # a 0.1 config.json (no tta_mirror_axes field) loads unchanged
    assert type(old) is NnyNet and old.config.tta_mirror_axes == []


def test_from_pretrained_refuses_an_ensemble_folder(saved):
    folder, _ = saved
    with pytest.raises(ValueError, match=r"config.json: invalid config: this config.json describes an ensemble.*"
                                         r"nny_models.load_model"):
        NnyNet.from_pretrained(folder)


def test_missing_member_is_named(saved):
    folder, _ = saved
    shutil.rmtree(folder / "member_1")
    with pytest.raises(FileNotFoundError, match=r"ensemble member folder 'member_1' \(field 'ensemble.members'\)"):
        load_model(folder)


def test_corrupted_member_is_named(saved):
    folder, _ = saved
    weights = folder / "member_0" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"member 'member_0' cannot be loaded: .*member_0/model.safetensors"):
        load_model(folder)


@pytest.mark.parametrize("field, value", [("patch_size", [64, 64, 64]), ("keep_largest", ["liver"])])
def test_member_that_differs_in_a_shared_field_is_named(saved, field, value):
    folder, _ = saved
    path = folder / "member_1" / "config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"member_1/config.json: field '{field}' is .* but the ensemble's"):
        load_model(folder)


@pytest.mark.parametrize("change, words", [
    ({"ensemble": {"format_version": 1, "members": ["../member_0"], "combine": "mean_softmax"}}, "folder names"),
    ({"ensemble": {"format_version": 2, "members": ["member_0"], "combine": "mean_softmax"}}, "format_version"),
    ({"ensemble": {"format_version": 1, "members": ["member_0"], "combine": "max"}}, "ensemble.combine"),
    ({"tta_mirror_axes": [5]}, "tta_mirror_axes"),
    ({"extra": 1}, r"unknown field\(s\) \['extra'\]"),
])
def test_bad_ensemble_config_json_is_named(saved, change, words):
    folder, _ = saved
    config = {**json.loads((folder / "config.json").read_text()), **change}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=words):
        load_model(folder)


def test_tta_axes_the_members_do_not_allow_are_refused(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    config["tta_mirror_axes"] = [1, 2]  # member_0 was only trained mirrored along 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: Ensemble: tta_mirror_axes \[1, 2\] are not all safe"):
        load_model(folder)


def test_save_ensemble_refuses_what_it_cannot_state(tmp_path):
    with pytest.raises(ValueError, match="member 1 is a MirrorTTA"):
        save_ensemble([_model(0, axes=(2,)), MirrorTTA(_model(1, axes=(2,)))], tmp_path / "a")
    with pytest.raises(ValueError, match="2 names for 3 members"):
        save_ensemble([_model(0), _model(1), _model(2)], tmp_path / "b", names=["x", "y"])
    with pytest.raises(ValueError, match="unique plain folder names"):
        save_ensemble([_model(0), _model(1)], tmp_path / "c", names=["x", "x"])
    _model(0).save_pretrained(tmp_path / "single")
    with pytest.raises(ValueError, match="holds a single model"):
        save_ensemble([_model(0), _model(1)], tmp_path / "single")
    with pytest.raises(ValueError, match="member 1 differs from member 0 .* 'patch_size'"):
        save_ensemble([_model(0), _model(1, patch_size=(64, 64, 64))], tmp_path / "d")
    assert not (tmp_path / "d" / "config.json").exists()


def test_cards_state_the_ensemble_and_tta(saved, tmp_path):
    folder, _ = saved
    card = (folder / "README.md").read_text()
    assert "# nnynet: ensemble of 2 models" in card
    assert "**ensemble of 2 members**" in card and "`member_0/`, `member_1/`" in card
    assert "model = load_model(" in card
    assert "- Test-time augmentation: mirroring along axis 2 (z, S-I)" in card and "2 passes averaged" in card
    _model(0).save_pretrained(tmp_path / "plain")
    plain = (tmp_path / "plain" / "README.md").read_text()
    assert "- Test-time augmentation: none" in plain and "ensemble" not in plain
    _model(0, axes=(0, 2)).save_pretrained(tmp_path / "mirrored")
    mirrored = (tmp_path / "mirrored" / "README.md").read_text()
    assert "mirroring along axes 0 (x, R-L), 2 (z, S-I)" in mirrored and "4 passes averaged" in mirrored


def test_ensemble_metrics_go_to_its_own_card(tmp_path):
    metrics = {"mean_foreground_dice": 0.75, "per_class": {"liver": {"dice": 0.9}}}
    folder = save_ensemble([_model(0, metrics={"per_class": {"liver": {"dice": 0.1}}}), _model(1)], tmp_path / "e",
                           metrics=metrics)
    card = (folder / "README.md").read_text()
    assert "| liver | 0.9000 |" in card and "0.1000" not in card
    assert json.loads((folder / "config.json").read_text())["metrics"] == metrics


def test_hub_repo_downloads_only_the_members_safetensors(saved, tmp_path, monkeypatch):
    """A Hub repo id: config.json first (hf_hub_download), then one snapshot_download of the listed files."""
    import huggingface_hub

    from nny_models import hub

    remote, _ = saved
    (remote / "pytorch_model.bin").write_bytes(b"pickle")  # never fetched
    (remote / "member_0" / "pytorch_model.bin").write_bytes(b"pickle")
    fetched: list[str] = []

    def fake_file(repo_id, filename, revision=None, **kwargs):
        assert repo_id == "org/ens"
        return str(remote / filename)

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, **kwargs):
        assert repo_id == "org/ens"
        local = tmp_path / "snapshot"
        for path in remote.rglob("*"):
            rel = path.relative_to(remote).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, local / rel)
                fetched.append(rel)
        return str(local)

    monkeypatch.setattr(hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    model = load_model("org/ens")
    assert isinstance(model, Ensemble) and len(model.members) == 2
    assert sorted(fetched) == ["README.md", "config.json", "member_0/config.json", "member_0/model.safetensors",
                               "member_1/config.json", "member_1/model.safetensors"]


def test_encoded_clinical_vector_of_two_fusion_members():
    a = _model(0, model_kwargs={"size": "tiny", "fusion": "concat", "clinical_features": 3})
    b = _model(1, model_kwargs={"size": "tiny", "fusion": "concat", "clinical_features": 2})
    ensemble = Ensemble([a, b])
    vector = ensemble.encode_clinical(np.arange(5, dtype=np.float32))  # what encode_clinical itself returns
    assert vector.shape == (1, 5)
    with pytest.raises(ValueError, match=r"\[3, 2\] features, 5 in all\); got 3"):
        ensemble.encode_clinical(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="itself an Ensemble"):
        Ensemble([ensemble, _model(2)])


def test_cli_predicts_with_an_ensemble_folder(saved, tmp_path, capsys, one_thread):
    from nny_models.cli import main

    folder, members = saved
    ct = _ct(1)
    nib.save(nib.Nifti1Image(ct, np.diag([*SPACING, 1.0])), tmp_path / "ct.nii.gz")
    code = main(["--model", str(folder), "--input", str(tmp_path / "ct.nii.gz"), "--output",
                 str(tmp_path / "mask.nii.gz"), "--precision", "fp32", "--force", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    expected = predict(Ensemble(members), tmp_path / "ct.nii.gz", precision="fp32", force=True, device="cpu")
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj), expected)
    shutil.rmtree(folder / "member_0")
    code = main(["--model", str(folder), "--input", str(tmp_path / "ct.nii.gz"), "--output",
                 str(tmp_path / "mask2.nii.gz"), "--force", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "member folder 'member_0'" in err and not (tmp_path / "mask2.nii.gz").exists()
