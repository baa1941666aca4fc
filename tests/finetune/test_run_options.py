import json
import os

import numpy as np
import pytest
import torch

from finetune.augment import AugmentedPatches


def _patches(n: int = 16) -> list[dict]:
    """Patches with a 'liver' block on the low-x side (RAS: the patient's right)."""
    label = torch.zeros(1, 24, 16, 8, dtype=torch.long)
    label[:, 2:9, 4:12, 2:6] = 1
    image = label.float() * 0.5 - 0.2
    return [{"image": image.clone(), "label": label.clone()} for _ in range(n)]


def _x_centroids(dataset) -> np.ndarray:
    return np.array([torch.nonzero(dataset[i]["label"][0] == 1)[:, 0].float().mean().item() for i in range(len(dataset))])


def test_default_keeps_the_side_and_flip_axes_mirrors_it():
    kept = _x_centroids(AugmentedPatches(_patches(), seed=0, clinical_dropout=0.0))
    assert (kept < 12).all()  # rotation / scaling move the block, never across the midline
    mirrored = _x_centroids(AugmentedPatches(_patches(), seed=0, clinical_dropout=0.0, flip_axes=(0,)))
    assert (mirrored > 12).any() and (mirrored < 12).any()
    again = _x_centroids(AugmentedPatches(_patches(), seed=0, clinical_dropout=0.0, flip_axes=(0,)))
    np.testing.assert_array_equal(mirrored, again)  # seeded per index: resume replays the same patches


def test_bad_flip_axis_is_refused():
    with pytest.raises(ValueError, match="flip_axes"):
        AugmentedPatches(_patches(1), seed=0, clinical_dropout=0.0, flip_axes=(3,))


def test_keep_largest_default_adapts_but_a_typo_is_an_error():
    from finetune.run import FinetuneConfig, _label_list

    def keep(cfg, labels):
        return _label_list(cfg, "keep_largest", labels)

    assert keep(FinetuneConfig(), ["background", "liver", "tumor"]) == ["liver", "tumor"]
    assert keep(FinetuneConfig(), ["background", "liver", "spleen"]) == ["liver"]  # no tumor class
    assert keep(FinetuneConfig(keep_largest=()), ["background", "liver"]) == []
    with pytest.raises(ValueError, match="livr"):
        keep(FinetuneConfig(keep_largest=("livr",)), ["background", "liver"])


# ---- no surprises on the command line


def _export_config(model: str = "unet", size: str = "tiny"):
    from nny_models.config import NnyNetConfig
    from nny_models.zoo import resolve_model_kwargs

    return NnyNetConfig(model=model, model_kwargs=resolve_model_kwargs(model, size, out_channels=5))


def test_architecture_comes_from_the_export_and_a_conflict_is_an_error():
    from finetune.run import FinetuneConfig, architecture
    from nny_models.zoo import resolve_model_kwargs

    source = _export_config("unet", "tiny")
    name, kwargs = architecture(FinetuneConfig(pretrained="x"), source)
    assert name == "unet" and kwargs == resolve_model_kwargs("unet", "tiny", out_channels=5)
    assert architecture(FinetuneConfig(pretrained="x", model="unet", size="tiny"), source)[0] == "unet"  # confirms
    with pytest.raises(ValueError, match="--model nnynet conflicts with --pretrained x"):
        architecture(FinetuneConfig(pretrained="x", model="nnynet"), source)
    with pytest.raises(ValueError, match="--size base conflicts with --pretrained x"):
        architecture(FinetuneConfig(pretrained="x", size="base"), source)
    assert architecture(FinetuneConfig(), None) == ("nnynet", resolve_model_kwargs("nnynet", "tiny"))  # scratch
    assert architecture(FinetuneConfig(model="unet", size="small"), None) == ("unet", resolve_model_kwargs("unet", "small"))


def test_pretrained_is_never_looked_up_implicitly(tmp_path, monkeypatch):
    from finetune.run import FinetuneConfig

    (tmp_path / "runs" / "pretrain" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # an export where "auto" used to look
    assert FinetuneConfig().pretrained is None and FinetuneConfig(pretrained="none").pretrained is None
    with pytest.raises(ValueError, match="auto is gone"):
        FinetuneConfig(pretrained="auto")


def test_preprocessing_defaults_come_from_the_export_or_preprocess_config():
    from finetune.run import FinetuneConfig, preprocess_config
    from nny_models.config import NnyNetConfig, PreprocessConfig

    assert preprocess_config(FinetuneConfig(), None) == PreprocessConfig()
    source = NnyNetConfig(preprocessing=PreprocessConfig(spacing=(3.0, 3.0, 4.0), hu_window=(-200.0, 300.0)).to_dict())
    assert preprocess_config(FinetuneConfig(), source) == source.preprocess
    assert preprocess_config(FinetuneConfig(spacing=(2, 2, 2)), source).spacing == (2, 2, 2)


@pytest.mark.parametrize("flag, value", [
    ("grad_clip", -1.0), ("freeze_encoder_steps", -1), ("max_steps", 0),
    ("val_overlap", 1.0), ("val_overlap", 0.99),  # failed after the training
    # accepted until 2026-12-06, each training wrongly or failing late without naming the flag:
    ("fg_prob", 1.5), ("clinical_dropout", -0.2), ("min_encoder_loaded", 2.0), ("lesion_min_contact", 1.5),
    ("encoder_lr_scale", -1.0), ("weight_decay", -1.0), ("focal_weight", -1.0), ("val_every", -5),
    ("fold", 7), ("folds", 1), ("mixed_precision", "fp4"), ("patch_size", (64, 64)), ("spacing", (0.0, 1.0, 1.0)),
    ("hu_window", (300.0, -200.0)),
])  # fmt: skip
def test_bad_run_values_are_refused(flag, value):
    from finetune.run import FinetuneConfig

    with pytest.raises(ValueError, match=f"--{flag}"):
        FinetuneConfig(**{flag: value})


def test_a_loss_of_all_zero_weights_is_refused():
    from finetune.run import FinetuneConfig

    with pytest.raises(ValueError, match="all 0: there is no loss"):
        FinetuneConfig(dice_weight=0.0, focal_weight=0.0, ce_weight=0.0)
    FinetuneConfig(dice_weight=0.0, focal_weight=1.0, ce_weight=0.0)  # one term is enough


@pytest.mark.parametrize("flag, value", [("log_every", 0), ("patch_size", (8, 8)), ("weight_decay", -0.1)])
def test_bad_pretraining_values_are_refused(flag, value):
    from pretrain.run import PretrainConfig

    with pytest.raises(ValueError, match=f"--{flag}"):
        PretrainConfig(**{flag: value})


def test_pipeline_stage_configs_are_valid_stage_configs_with_the_pipeline_values(tmp_path):
    from finetune.pipeline import PipelineConfig, stage_configs
    from finetune.run import FinetuneConfig
    from nny_models.training import build_config
    from pretrain.run import PretrainConfig

    configs = stage_configs(PipelineConfig(finetune_processes=1), tmp_path)
    pre = build_config(PretrainConfig, configs["pretrain"])
    fine = build_config(FinetuneConfig, configs["finetune"])
    assert (pre.spacing, pre.hu_window, pre.patch_size, pre.batch_size) == ((3.0, 3.0, 4.0), (-200.0, 300.0), (96, 96, 32), 1)
    assert (pre.model, pre.size, pre.max_steps, fine.max_steps, fine.val_every) == ("nnynet", "tiny", 80, 1800, 600)
    assert pre.feature_size == 24 and fine.folds == 19  # 96 cases: the wider network, about 5 validating
    assert (fine.patch_size, fine.batch_size, fine.fusion) == ((64, 64, 32), 1, "cross_attention_film")
    split = stage_configs(PipelineConfig(finetune_batch=2, finetune_processes=2), tmp_path)["finetune"]
    assert build_config(FinetuneConfig, split).batch_size == 1  # two DDP processes share the step's two patches
    assert split["num_workers"] == 1  # one augmenting worker beside each process
    assert fine.class_weights == (1.0, 1.0, 5.0, 2.0, 1.0) and fine.fg_class_weights == (1.0, 4.0, 1.5, 1.0)
    assert fine.pretrained == str(tmp_path / "pretrain" / "model") and fine.spacing is None  # from the export
    assert pre.overwrite and fine.overwrite  # a re-run retrains, explicitly
    resumed = stage_configs(PipelineConfig(resume=True), tmp_path)
    assert resumed["pretrain"]["resume"] and "overwrite" not in resumed["finetune"]
    assert (fine.lr, fine.encoder_lr_scale) == (4e-3, 1.0)


def test_pipeline_splits_the_fine_tuning_batch_over_cpu_processes_only_without_a_gpu(monkeypatch):
    from finetune.pipeline import finetune_processes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert finetune_processes(None, 2) == 2
    assert finetune_processes(None, 3) == 1  # an odd batch cannot be split into whole patches
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert finetune_processes(None, 2) == 1  # one core: one process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert finetune_processes(None, 2) == 1  # a GPU takes the whole batch
    assert finetune_processes(2, 4) == 2
    for bad in (0, 3):
        with pytest.raises(ValueError, match=f"--finetune_processes {bad}: expected a divisor of --finetune_batch 4"):
            finetune_processes(bad, 4)


def test_pipeline_fine_tunes_in_bf16_only_where_the_hardware_is_fast_at_it(monkeypatch):
    import nny_models.inference
    from finetune.pipeline import finetune_precision

    assert finetune_precision("no") == "no" and finetune_precision("bf16") == "bf16"
    monkeypatch.setattr(nny_models.inference, "bf16_is_fast", lambda device: False)
    assert finetune_precision("auto") == "no"
    monkeypatch.setattr(nny_models.inference, "bf16_is_fast", lambda device: True)
    assert finetune_precision("auto") == "bf16"
    with pytest.raises(ValueError, match="--finetune_precision: expected 'auto', 'bf16' or 'no', got 'fp16'"):
        finetune_precision("fp16")


def test_pipeline_pretrains_in_the_precision_its_option_picks(monkeypatch, tmp_path):
    import nny_models.inference
    from finetune.pipeline import PipelineConfig, main, stage_configs

    monkeypatch.setattr(nny_models.inference, "bf16_is_fast", lambda device: True)
    assert stage_configs(PipelineConfig(finetune_processes=1), tmp_path)["pretrain"]["mixed_precision"] == "bf16"
    fp32 = PipelineConfig(finetune_processes=1, pretrain_precision="no")
    assert stage_configs(fp32, tmp_path)["pretrain"]["mixed_precision"] == "no"
    monkeypatch.setattr(nny_models.inference, "bf16_is_fast", lambda device: False)
    assert stage_configs(PipelineConfig(finetune_processes=1), tmp_path)["pretrain"]["mixed_precision"] == "no"
    with pytest.raises(ValueError, match="--pretrain_precision: expected 'auto', 'bf16' or 'no', got 'fp16'"):
        main(["--output_dir", str(tmp_path / "p"), "--pretrain_precision", "fp16"])
    assert not (tmp_path / "p" / "data").exists()  # refused before any phantom was written


def test_per_label_weights_need_one_positive_value_per_label():
    from finetune.run import _per_label

    labels = ["background", "liver", "tumor"]
    assert _per_label(None, labels, "class_weights") is None
    assert _per_label((1.0, 1.0, 5.0), labels, "class_weights") == {0: 1.0, 1: 1.0, 2: 5.0}
    assert _per_label((1.0, 4.0), labels[1:], "fg_class_weights", first=1) == {1: 1.0, 2: 4.0}
    with pytest.raises(ValueError, match=r"--class_weights: expected 3 values > 0, one per label"):
        _per_label((1.0, 5.0), labels, "class_weights")
    with pytest.raises(ValueError, match="--fg_class_weights"):
        _per_label((1.0, -1.0), labels[1:], "fg_class_weights", first=1)


def test_balance_lesions_names_foreground_labels():
    from finetune.run import _label_index

    labels = ["background", "liver", "tumor"]
    assert _label_index((), labels, "balance_lesions") == []
    assert _label_index(("tumor",), labels, "balance_lesions") == [2]
    for bad in (("lesion",), ("background",)):
        with pytest.raises(ValueError, match=r"--balance_lesions: \['\w+'\] are not foreground labels"):
            _label_index(bad, labels, "balance_lesions")


@pytest.mark.parametrize("precision, amp", [("bf16", True), ("no", False)])
def test_validation_runs_in_the_precision_the_run_trains_in(monkeypatch, precision, amp):
    """A bf16 run picks its best model from bf16 predictions, as predict makes them on bf16 hardware."""
    from types import SimpleNamespace

    import finetune.run as run
    from nny_models.config import DEFAULT_LABELS, PreprocessConfig

    seen = []

    def fake_probs(model, image, patch_size, clinical, **kwargs):
        seen.append(kwargs["amp"])
        background = torch.zeros(image.shape[2:], dtype=torch.long)
        return torch.nn.functional.one_hot(background, len(DEFAULT_LABELS)).movedim(-1, 0)[None].float()

    monkeypatch.setattr(run, "sliding_window_probs", fake_probs)
    cache = SimpleNamespace(image=lambda cid: np.zeros((1, 8, 8, 8), np.float32),
                            label=lambda cid: np.zeros((1, 8, 8, 8), np.uint8))
    data = {"val_ids": ["a"], "cache": cache, "vectors": {}, "labels": DEFAULT_LABELS}
    model = SimpleNamespace(config=SimpleNamespace(keep_largest=()), train=lambda: None)
    cfg = run.FinetuneConfig(mixed_precision=precision, patch_size=(8, 8, 8))
    run.validate(model, data, cfg, PreprocessConfig(), "cpu")
    assert seen == [amp]


def test_pipeline_regenerates_phantoms_of_another_count_or_seed_and_refuses_foreign_folders(tmp_path):
    from finetune.pipeline import prepare_phantoms

    folder = tmp_path / "train"
    assert prepare_phantoms(folder, 2, 0, False, "train")
    assert not prepare_phantoms(folder, 2, 0, False, "train")  # the same set: reused
    assert prepare_phantoms(folder, 1, 0, False, "train")  # fewer cases: no leftovers of the earlier two
    assert len(list((folder / "imagesTr").iterdir())) == 1 and len(list((folder / "labelsTr").iterdir())) == 1
    first = (folder / "imagesTr" / "phantom_000.nii.gz").read_bytes()
    assert prepare_phantoms(folder, 1, 5, False, "train")  # another seed
    assert (folder / "imagesTr" / "phantom_000.nii.gz").read_bytes() != first
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "scan.nii.gz").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="nnynet-phantoms"):
        prepare_phantoms(foreign, 1, 0, False, "train")
    assert (foreign / "scan.nii.gz").read_bytes() == b"not ours"
    (foreign / "imagesTr").mkdir()  # our layout, but not our files: refused too
    (foreign / "imagesTr" / "ct_001.nii.gz").write_bytes(b"not ours")
    (foreign / "scan.nii.gz").unlink()
    with pytest.raises(ValueError, match="nnynet-phantoms"):
        prepare_phantoms(foreign, 1, 0, False, "train")
    assert (foreign / "imagesTr" / "ct_001.nii.gz").is_file()
    (folder / "dataset.json").unlink()  # a generation killed before its last file: generated again, not refused
    assert prepare_phantoms(folder, 1, 5, False, "train") and (folder / "dataset.json").is_file()


def test_pipeline_validates_on_about_five_cases_whatever_the_case_count():
    from finetune.pipeline import validation_folds

    assert [validation_folds(n) for n in (6, 24, 48, 96)] == [5, 5, 10, 19]
    from sklearn.model_selection import KFold

    for n in (24, 48, 96):  # the split fine-tuning makes with that k
        val = next(KFold(validation_folds(n), shuffle=True, random_state=0).split(range(n)))[1]
        assert 4 <= len(val) <= 6


@pytest.mark.parametrize("names, contact, labels, expected", [
    (("tumor", "liver"), 0.5, ["background", "liver", "tumor"], {"lesion": "tumor", "organ": "liver", "min_contact": 0.5}),
    (("tumor", "liver"), 0.0, ["background", "liver", "tumor"], None),  # 0 turns it off
    (("tumor", "liver"), 0.5, ["background", "kidney"], None),  # the default skips a label map without them
])
def test_fine_tuning_stores_the_lesion_rule(names, contact, labels, expected):
    from finetune.run import FinetuneConfig, _lesion_in_organ

    assert _lesion_in_organ(FinetuneConfig(lesion_in_organ=names, lesion_min_contact=contact), labels) == expected


def test_fine_tuning_refuses_a_lesion_rule_naming_no_label():
    from finetune.run import FinetuneConfig, _lesion_in_organ

    with pytest.raises(ValueError, match="--lesion_in_organ"):
        _lesion_in_organ(FinetuneConfig(lesion_in_organ=("tumour", "liver")), ["background", "liver", "tumor"])
    with pytest.raises(ValueError, match="--lesion_min_contact"):
        _lesion_in_organ(FinetuneConfig(lesion_min_contact=1.5), ["background", "liver", "tumor"])


def test_fewer_cases_than_folds_uses_a_fold_per_case_and_never_wraps_round(tmp_path):
    from finetune.run import FinetuneConfig, split_cases

    ids = ["a", "b", "c", "d"]
    cfg = FinetuneConfig(folds=5, fold=3)
    with pytest.warns(UserWarning, match="--folds 5: .* has 4 labeled cases; the split uses 4 folds"):
        train, val, folds = split_cases(ids, cfg, tmp_path)
    assert folds == 4 and len(val) == 1 and sorted(train + val) == ids
    with pytest.raises(ValueError, match="--fold 4: .* has 4 labeled cases, so at most 4 folds"):
        split_cases(ids, FinetuneConfig(folds=5, fold=4), tmp_path)  # used to wrap round onto fold 0
    vals = {split_cases(ids, FinetuneConfig(folds=4, fold=k), tmp_path)[1][0] for k in range(4)}
    assert vals == set(ids)  # each case validates in exactly one fold


@pytest.mark.parametrize("labels, match", [
    (["background", "tumor", "liver"], "expected an object"),  # a list was ignored: the default names were used
    ({"background": 0, "liver": [1, 2]}, "region-based labels are not supported"),
    ({"0": "background", "1": "liver", "3": "tumor"}, "must name each value 0..2 once"),
    ({"0": "background", "1": "liver", "2": "liver"}, "distinct names"),
])
def test_dataset_json_labels_in_another_form_are_refused(tmp_path, labels, match):
    from finetune.run import _label_names

    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    with pytest.raises(ValueError, match=match) as err:
        _label_names(tmp_path)
    assert "dataset.json" in str(err.value)


def test_dataset_json_labels_of_msd_and_nnunet_v2(tmp_path):
    from finetune.run import _label_names

    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "2": "cancer", "1": "liver"}}))
    assert _label_names(tmp_path) == ["background", "liver", "cancer"]
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumor": 2, "liver": 1}}))
    assert _label_names(tmp_path) == ["background", "liver", "tumor"]
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset.json: not valid JSON"):
        _label_names(tmp_path)
