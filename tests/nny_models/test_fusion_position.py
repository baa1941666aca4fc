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


def test_finetune_build_model_sets_the_position_for_nnynet_only():
    from types import SimpleNamespace

    from finetune.run import FinetuneConfig, build_model

    with pytest.raises(ValueError, match="--fusion_position: expected"):
        FinetuneConfig(fusion_position="middle")
    data = {"labels": ["background", "liver"], "schema": None}
    pre = __import__("nny_models.config", fromlist=["PreprocessConfig"]).PreprocessConfig()
    acc = SimpleNamespace(print=lambda *a, **k: None)
    model, _ = build_model(FinetuneConfig(fusion="none", patch_size=(64, 64, 32)), None, data, pre, acc)
    assert model.config.model_kwargs["fusion_position"] == "after_bottleneck"
    with pytest.raises(ValueError, match="applies to nnynet only"):
        build_model(FinetuneConfig(model="unet", fusion="none", fusion_position="after_bottleneck",
                                   patch_size=(64, 64, 32)), None, data, pre, acc)
