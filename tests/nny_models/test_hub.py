"""NnyNet Hub glue: local round trip, strict loading, safetensors only, and a Hub round trip
(push twice, pinned revision, offline reload) against the in-memory Hub of tests/hub_server.py.

huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE when it is imported, so the Hub client
side runs in a subprocess (``python -m tests.nny_models.test_hub STEP WORKDIR``) with its own environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from nny_models.config import NnyNetConfig
from nny_models.hub import NnyNet, WeightsMismatchError, load_config, load_state_dict
from nny_models.zoo import resolve_model_kwargs

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO_ID = "radiology-lab/nnynet-tiny"
METRICS = {"per_class": {"liver": {"dice": 0.9312, "iou": 0.8713, "hd95": 4.25},
                         "tumor": {"dice": 0.6021, "iou": 0.4307, "hd95": 11.5}},
           "mean_dice": 0.7666}


def tiny_config(model: str = "unet", out_channels: int = 5, **fields) -> NnyNetConfig:
    labels = ["background", "liver", "tumor", "portal_vein", "aorta"][:out_channels]
    kwargs = resolve_model_kwargs(model, "tiny", out_channels=out_channels, **fields.pop("model_kwargs", {}))
    patch = (64, 32, 32) if model == "nnynet" else (32, 32, 32)  # Swin-NeXt: a bottleneck of more than one voxel
    return NnyNetConfig(model=model, model_kwargs=kwargs, label_names=labels, patch_size=patch, **fields)


def fixed_input() -> torch.Tensor:
    return torch.randn(1, 1, 32, 16, 16, generator=torch.Generator().manual_seed(0))


def seeded_model(config: NnyNetConfig, seed: int) -> NnyNet:
    torch.manual_seed(seed)
    return NnyNet(config).eval()


@torch.no_grad()
def run(model: NnyNet, x: torch.Tensor) -> torch.Tensor:
    return model(x)


# ---- local directory ------------------------------------------------------------------------------


def test_local_round_trip_is_bitwise_and_writes_card(tmp_path: Path) -> None:
    config = tiny_config(metrics=METRICS)
    model = seeded_model(config, 0)
    x = fixed_input()
    model.save_pretrained(tmp_path, model_card_kwargs={"training": {"max_steps": 123}})

    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text()) == config.to_dict()

    loaded = NnyNet.from_pretrained(tmp_path)
    assert isinstance(loaded.config, NnyNetConfig) and loaded.config == model.config
    assert not loaded.training
    assert torch.equal(run(loaded, x), run(model, x))

    assert load_config(tmp_path) == model.config
    state = load_state_dict(tmp_path)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    card = (tmp_path / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "nnynet" and front["pipeline_tag"] == "image-segmentation"
    assert {"medical-imaging", "segmentation", "3d", "ct"} <= set(front["tags"])
    for text in ["portal_vein", "aorta", "| class | dice | iou | hd95 |", "| liver | 0.9312 | 0.8713 | 4.2500 |",
                 "mean_dice: 0.7666", "max_steps: 123", "32 x 32 x 32", "2501.01406", "2306.16925", "MedNeXt",
                 "Swin UNETR", "Not a medical device", "config.json does not record", "Post-processing: none"]:
        assert text in card, text

    # A re-save refreshes the card (the mixin alone would keep a stale README.md).
    model.config.metrics = None
    model.save_pretrained(tmp_path)
    assert "## Evaluation" not in (tmp_path / "README.md").read_text()


@pytest.mark.parametrize("ids, said", [
    (["phantom_000", "phantom_001"], "Trained on 2 synthetic CT phantoms"),
    (["liver_0", "liver_1", "liver_2", "liver_3"], "Trained on 4 cases of the publisher's own data set (case ids "
                                                   "liver_0, liver_1, liver_2, ...;"),
])
def test_card_says_what_the_plan_s_cases_were(tmp_path: Path, ids, said) -> None:
    # a model fine-tuned on a user's CT used to be carded "trained on synthetic phantoms, not on patient scans"
    config = NnyNetConfig(model_kwargs={"size": "tiny"}, patch_size=(64, 32, 32),
                          plan={"fingerprint": {"case_ids": ids}})
    NnyNet(config).save_pretrained(tmp_path)
    card = " ".join((tmp_path / "README.md").read_text().split())
    assert said in card
    assert ("not on patient scans" in card) == ids[0].startswith("phantom_")


def test_card_lists_clinical_inputs_of_a_fitted_schema(tmp_path: Path) -> None:
    """The card's clinical section from a schema fit_clinical_schema really wrote (not a made-up dict)."""
    import pandas as pd

    from finetune.clinical import fit_clinical_schema

    table = pd.DataFrame({"case_id": ["a", "b", "c", "d", "e"], "age": [61, 70, None, 55, 66],
                          "child_pugh": ["A", "B", "A", None, "C"], "cirrhosis": ["yes", "no", "yes", "yes", None]})
    schema = fit_clinical_schema(table)
    kwargs = {"fusion": "cross_attention", "clinical_features": schema.num_features}
    seeded_model(tiny_config(clinical_schema=schema.to_dict(), model_kwargs=kwargs), 0).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    section = card.split("## Clinical inputs")[1].split("\n## ")[0]
    items = [line for line in section.splitlines() if line.startswith("- ")]
    assert items == ["- age (numeric)", "- child_pugh (categorical: A, B, C)", "- cirrhosis (boolean)"]
    assert load_config(tmp_path).clinical_schema == schema.to_dict()


def test_config_v0_fixture_loads_with_identical_outputs() -> None:
    """A fine-tuning export written by nnynet 0.1 (config.json with "size": "tiny", training switches in
    model_kwargs, deep-supervision heads in the weights; see fixtures/make_config_v0.py) loads strictly
    and gives the logits that code computed."""
    folder = FIXTURES / "config_v0"
    raw = json.loads((folder / "config.json").read_text())
    assert "format_version" not in raw and raw["model_kwargs"]["size"] == "tiny"  # it is the old format
    assert raw["model_kwargs"]["deep_supervision"] is True
    model = NnyNet.from_pretrained(folder)
    assert model.config.format_version == 1 and "size" not in model.config.model_kwargs
    assert not {"deep_supervision", "use_checkpoint"} & set(model.config.model_kwargs)
    assert model.config.model_kwargs["window_size"] == 4  # the tiny preset of 0.1, resolved
    expected = safetensors.torch.load_file(folder / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["image_int8"].float() / 32, expected["clinical"])
    torch.testing.assert_close(logits[:, :, ::4, ::4, ::4], expected["logits_every_4th"], atol=1e-6, rtol=0)
    # each channel sums 262,144 fp32 logits (about 1.4e5): oneDNN rounds differently per CPU (the fixture was made on
    # a Xeon with AMX; on an AMD EPYC the sums differ by 1.7e-3, 1.2e-8 of their size), so the bound is relative too
    torch.testing.assert_close(logits.double().sum(dim=(2, 3, 4)), expected["logits_channel_sum"], atol=1e-3, rtol=1e-7)
    card = model.generate_model_card().content
    for text in ["- child_pugh (categorical: A, B, C)", "- cirrhosis (boolean)", "- afp_ng_ml (numeric)",
                 "| liver | 0.9000 |", "mean_foreground_dice: 0.5000", "largest connected component of liver"]:
        assert text in card, text


def test_training_switches_stay_out_of_the_saved_model(tmp_path: Path) -> None:
    config = tiny_config("nnynet")
    torch.manual_seed(0)
    model = NnyNet(config, deep_supervision=True, grad_checkpointing=True)
    assert model.deep_supervision and model.grad_checkpointing and model.net.use_checkpoint
    assert any(k.startswith("net.ds_heads.") for k in model.state_dict())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {"deep_supervision", "use_checkpoint", "size"} & set(saved["model_kwargs"])
    assert not any(k.startswith("net.ds_heads.") for k in load_state_dict(tmp_path))
    loaded = NnyNet.from_pretrained(tmp_path, strict=True)
    assert not loaded.deep_supervision and not hasattr(loaded.net, "ds_heads")
    x = torch.randn(1, 1, 64, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(loaded, x), run(model.eval(), x))
    # A network without deep-supervision heads ignores the switch, and says so.
    assert not NnyNet(tiny_config("unet"), deep_supervision=True).deep_supervision


def test_inference_never_imports_accelerate(tmp_path: Path) -> None:
    seeded_model(tiny_config(), 0).save_pretrained(tmp_path)
    code = ("import sys, torch; from nny_models.hub import NnyNet; import nny_models.zoo, nny_models.config; "
            f"m = NnyNet.from_pretrained({str(tmp_path)!r}); m(torch.zeros(1, 1, 32, 32, 32)); "
            "assert 'accelerate' not in sys.modules, 'accelerate imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0, proc.stderr


def test_card_states_post_processing(tmp_path: Path) -> None:
    seeded_model(tiny_config(keep_largest=["liver", "tumor"]), 0).save_pretrained(tmp_path)
    assert "largest connected component of liver + tumor" in (tmp_path / "README.md").read_text()
    assert load_config(tmp_path).keep_largest == ["liver", "tumor"]
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "keep_largest": ["spleen"]}))
    with pytest.raises(ValueError, match=r"keep_largest.*spleen"):
        load_config(tmp_path)
    del config["keep_largest"]  # a config.json written before the field existed: no post-processing
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_config(tmp_path).keep_largest == []


def test_other_architecture_fails_strictly_naming_keys(tmp_path: Path) -> None:
    unet = seeded_model(tiny_config("unet"), 0)
    unet.save_pretrained(tmp_path)
    nnynet_config = tiny_config("nnynet")
    with pytest.raises(WeightsMismatchError) as info:
        NnyNet.from_pretrained(tmp_path, config=nnynet_config)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'model.safetensors'}: weights do not fit the model: ")
    assert "model is 'nnynet'" in message
    assert "missing in checkpoint: " in message and "unexpected in checkpoint: " in message
    assert next(iter(unet.state_dict())) in message  # a unet key is named as unexpected
    assert next(iter(NnyNet(nnynet_config).state_dict())) in message  # an nnynet key is named as missing
    # The cause (key names) comes before the long model_kwargs context, so a one-line summary keeps it.
    assert message.index("unexpected in checkpoint") < message.index("model_kwargs")


def test_shape_mismatch_strict_and_lenient(tmp_path: Path) -> None:
    source = seeded_model(tiny_config(out_channels=5), 0)
    source.save_pretrained(tmp_path)
    three_labels = tiny_config(out_channels=3)
    cause = (r"4 shape mismatch\(es\): net\.model\.2\.0\.conv\.weight \[16, 5, 3, 3, 3\] in checkpoint "
             r"vs \[16, 3, 3, 3, 3\]")
    with pytest.raises(WeightsMismatchError, match=cause):
        NnyNet.from_pretrained(tmp_path, config=three_labels)

    lenient = NnyNet.from_pretrained(tmp_path, config=three_labels, strict=False)
    src, dst = source.state_dict(), lenient.state_dict()
    same = [k for k in dst if src[k].shape == dst[k].shape]
    assert len(same) < len(dst) and all(torch.equal(src[k], dst[k]) for k in same)


def test_safetensors_only_and_clear_missing_files(tmp_path: Path) -> None:
    model = seeded_model(tiny_config(), 0)
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        NnyNet.from_pretrained(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        NnyNet.from_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "nowhere")


def test_save_pretrained_refuses_a_different_config(tmp_path: Path) -> None:
    model = seeded_model(tiny_config(), 0)
    with pytest.raises(ValueError, match="mirrors model.config"):
        model.save_pretrained(tmp_path, config=tiny_config(out_channels=3))


# ---- Hub round trip against a local Hub-compatible server --------------------------------------------


def _client(step: str, work: Path, endpoint: str, offline: bool) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(work / "hf_home"), HF_HUB_DISABLE_XET="1", HF_TOKEN="dummy",
               HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.nny_models.test_hub", step, str(work)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"client step {step!r} failed:\n{proc.stdout}\n{proc.stderr}"


def test_push_to_hub_pinned_revision_and_offline_reload(tmp_path: Path) -> None:
    from tests.hub_server import HubServer

    with HubServer() as hub:
        _client("online", tmp_path, hub.url, offline=False)
        log = list(hub.state.requests)
    result = json.loads((tmp_path / "online.json").read_text())
    outs = safetensors.torch.load_file(tmp_path / "online.safetensors")

    assert result["first"] != result["second"] and result["main_sha"] == result["second"]
    assert {"model.safetensors", "config.json", "README.md"} <= set(result["files"])
    assert result["config_equal"] and "portal_vein" in result["readme"]
    assert not torch.equal(outs["first"], outs["second"])
    assert torch.equal(outs["latest"], outs["second"])
    assert torch.equal(outs["pinned"], outs["first"])
    assert any(line.startswith("HEAD /" + REPO_ID + "/resolve/" + result["first"]) for line in log)

    # Server gone: both revisions come back from the cache the downloads filled.
    _client("offline", tmp_path, hub.url, offline=True)
    offline = safetensors.torch.load_file(tmp_path / "offline.safetensors")
    assert torch.equal(offline["latest"], outs["second"])
    assert torch.equal(offline["pinned"], outs["first"])


def _client_main(step: str, work: Path) -> None:
    """Runs in the subprocess started by _client, with HF_* set before huggingface_hub is imported."""
    from huggingface_hub import HfApi, hf_hub_download

    config, x = tiny_config(metrics=METRICS), fixed_input()
    if step == "online":
        first, second = seeded_model(config, 1), seeded_model(config, 2)
        commit1 = first.push_to_hub(REPO_ID, commit_message="first weights")
        commit2 = second.push_to_hub(REPO_ID, commit_message="second weights")
        latest = NnyNet.from_pretrained(REPO_ID)
        pinned = NnyNet.from_pretrained(REPO_ID, revision=commit1.oid)
        info = HfApi().model_info(REPO_ID)
        (work / "online.json").write_text(json.dumps({
            "first": commit1.oid, "second": commit2.oid, "main_sha": info.sha,
            "files": [s.rfilename for s in info.siblings], "config_equal": latest.config == first.config,
            "readme": Path(hf_hub_download(REPO_ID, "README.md")).read_text(),
        }))
        outs = {"first": run(first, x), "second": run(second, x), "latest": run(latest, x), "pinned": run(pinned, x)}
        safetensors.torch.save_file(outs, work / "online.safetensors")
    elif step == "offline":
        first_sha = json.loads((work / "online.json").read_text())["first"]
        latest = NnyNet.from_pretrained(REPO_ID)
        pinned = NnyNet.from_pretrained(REPO_ID, revision=first_sha)
        assert load_config(REPO_ID) == latest.config
        assert load_state_dict(REPO_ID, revision=first_sha).keys() == pinned.state_dict().keys()
        safetensors.torch.save_file({"latest": run(latest, x), "pinned": run(pinned, x)}, work / "offline.safetensors")
    else:
        raise ValueError(f"unknown client step {step!r}")


if __name__ == "__main__":
    _client_main(sys.argv[1], Path(sys.argv[2]))
