"""Fixtures the reliability tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nny_models.config import NnyNetConfig, PreprocessConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny untrained nnynet saved with save_pretrained (3 x 3 x 4 mm grid, 64^3 windows), for the CLI tests."""
    from nny_models import hub

    torch.manual_seed(0)
    config = NnyNetConfig(model_kwargs={"size": "tiny"}, patch_size=(64, 64, 64),
                          preprocessing=PreprocessConfig(spacing=(3.0, 3.0, 4.0)).to_dict())
    path = tmp_path_factory.mktemp("model") / "tiny"
    hub.NnyNet(config).save_pretrained(path)
    return path
