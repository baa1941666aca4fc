"""Where nnynet applies its clinical fusion: after the bottleneck for new fine-tunes, before it for old files.
(Why: `python -m nny_models.fusion_capacity --models nnynet` fails before the bottleneck and passes after it;
that run takes minutes, so the suite checks the wiring.)"""

import pytest
import torch

from nny_models.config import NnyNetConfig
from nny_models.hub import NnyNet
from nny_models.zoo import create_model, resolve_model_kwargs


def test_a_config_without_the_field_keeps_the_old_position_and_new_finetunes_get_the_new_one():
    kwargs = resolve_model_kwargs("nnynet", "tiny", fusion="cross_attention_film", clinical_features=2)
    assert "fusion_position" not in kwargs  # files written before the field existed look like this
    old = NnyNet(NnyNetConfig(model="nnynet", model_kwargs=kwargs, patch_size=(64, 64, 32)))
    assert old.net.fusion_position == "before_bottleneck"  # they predict exactly as they did
    new = NnyNet(NnyNetConfig(model="nnynet", model_kwargs={**kwargs, "fusion_position": "after_bottleneck"},
                              patch_size=(64, 64, 32)))
    assert new.net.fusion_position == "after_bottleneck"
    assert set(old.state_dict()) == set(new.state_dict())  # same tensors: only the order of two modules differs
    with pytest.raises(ValueError, match="fusion_position must be one of"):
        create_model("nnynet", "tiny", fusion_position="middle")


def test_finetune_build_model_sets_the_position_for_nnynet_and_swinunetr_only():
    from types import SimpleNamespace

    from finetune.run import FinetuneConfig, build_model

    with pytest.raises(ValueError, match="--fusion_position: expected"):
        FinetuneConfig(fusion_position="middle")
    data = {"labels": ["background", "liver"], "schema": None}
    pre = __import__("nny_models.config", fromlist=["PreprocessConfig"]).PreprocessConfig()
    acc = SimpleNamespace(print=lambda *a, **k: None)
    model, _ = build_model(FinetuneConfig(fusion="none", patch_size=(64, 64, 32)), None, data, pre, acc)
    assert model.config.model_kwargs["fusion_position"] == "after_bottleneck"
    swin, _ = build_model(FinetuneConfig(model="swinunetr", fusion="none", patch_size=(64, 64, 32)), None, data, pre, acc)
    assert swin.config.model_kwargs["fusion_position"] == "after_bottleneck" and swin.net.fusion_position == "after_bottleneck"
    with pytest.raises(ValueError, match="applies to nnynet and swinunetr only"):
        build_model(FinetuneConfig(model="unet", fusion="none", fusion_position="after_bottleneck",
                                   patch_size=(64, 64, 32)), None, data, pre, acc)


def test_swinunetr_old_files_fuse_before_monais_bottleneck_block_and_new_finetunes_after_it():
    kwargs = resolve_model_kwargs("swinunetr", "tiny", fusion="cross_attention_film", clinical_features=3)
    old = create_model("swinunetr", **kwargs)
    assert old.fusion_position == "before_bottleneck"  # a config.json without the field predicts as it did
    new = create_model("swinunetr", **kwargs, fusion_position="after_bottleneck")
    assert set(old.state_dict()) == set(new.state_dict())
    with torch.no_grad():
        torch.nn.init.normal_(old.fusion.film.weight, std=0.5)  # a FiLM that acts (it starts as the identity)
        new.load_state_dict(old.state_dict())
        image, clinical = torch.randn(1, 1, 64, 32, 32), torch.randn(1, 3)
        assert not torch.allclose(old.eval()(image, clinical), new.eval()(image, clinical))
    with pytest.raises(ValueError, match="swinunetr: fusion_position must be one of"):
        create_model("swinunetr", "tiny", fusion_position="middle")
