"""parse_config: precedence, every argparse form, presets, nested dataclasses and help from field comments."""

from __future__ import annotations

import dataclasses
import json

import pytest

from nny_models.training import build_config, parse_config, tracker_config


@dataclasses.dataclass
class Inner:
    variant: str = "grid"  # which variant
    ratio: float = 0.7  # a fraction


@dataclasses.dataclass
class Cfg:
    preset: str | None = None  # named set of values
    data_dir: str | None = None  # where the data lives
    max_steps: int = 10  # optimizer steps
    patch_size: tuple[int, int, int] = (32, 32, 32)  # patch
    amp: bool = False  # mixed precision
    lr: float = 1e-3  # learning rate, a long comment that the author
    # wrapped onto a second line, which must reach --help
    names: tuple[str, ...] = ("a", "b")  # any number of names
    inner: Inner = dataclasses.field(default_factory=Inner)  # nested options


PRESETS = {"big": {"max_steps": 1000, "lr": 0.1, "inner": {"ratio": 0.5}}}


def test_precedence_and_types(tmp_path):
    cfg = parse_config(Cfg, ["--max_steps", "5", "--patch_size", "16", "16", "16", "--amp"])
    assert cfg == Cfg(max_steps=5, patch_size=(16, 16, 16), amp=True)
    assert parse_config(Cfg, ["--names"]).names == ()  # a bare flag empties a variable-length tuple
    assert parse_config(Cfg, ["--names", "c"]).names == ("c",)
    with pytest.raises(SystemExit):  # a fixed-length tuple needs exactly its values
        parse_config(Cfg, ["--patch_size", "16", "16"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.5, "max_steps": 7, "data_dir": "x"}))
    assert parse_config(Cfg, ["--config", str(path), "--max_steps", "3"]) == Cfg(data_dir="x", max_steps=3, lr=0.5)
    path.write_text(json.dumps({"learning_rate": 0.5}))
    with pytest.raises(ValueError, match="learning_rate"):
        parse_config(Cfg, ["--config", str(path)])
    path.write_text("{not json")
    with pytest.raises(ValueError, match="c.json"):
        parse_config(Cfg, ["--config", str(path)])


def test_equals_forms(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"preset": "big", "lr": 0.5}))
    cfg = parse_config(Cfg, [f"--config={path}", "--max_steps=9"], presets=PRESETS)
    assert (cfg.lr, cfg.max_steps, cfg.inner.ratio) == (0.5, 9, 0.5)  # JSON beats preset, flag beats JSON


def test_presets_fill_only_what_the_user_did_not_set():
    assert parse_config(Cfg, ["--preset", "big"], presets=PRESETS).max_steps == 1000
    cfg = parse_config(Cfg, ["--preset=big", "--lr=0.01", "--inner.ratio", "0.9"], presets=PRESETS)
    assert (cfg.max_steps, cfg.lr, cfg.inner.ratio, cfg.inner.variant) == (1000, 0.01, 0.9, "grid")
    with pytest.raises(ValueError, match="preset"):
        parse_config(Cfg, ["--preset", "huge"], presets=PRESETS)


def test_nested_dataclass_flags_json_and_unknown_fields(tmp_path):
    cfg = parse_config(Cfg, ["--inner.variant", "boxes"])
    assert cfg.inner == Inner(variant="boxes")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"inner": {"ratio": 0.2}}))
    assert parse_config(Cfg, ["--config", str(path), "--inner.variant=boxes"]).inner == Inner("boxes", 0.2)
    path.write_text(json.dumps({"inner": {"ratoi": 0.2}}))
    with pytest.raises(ValueError, match=r"inner.*ratoi"):
        parse_config(Cfg, ["--config", str(path)])
    with pytest.raises(ValueError, match="patch_size needs 3 values"):
        build_config(Cfg, {"patch_size": [1, 2]})
    assert tracker_config(cfg)["inner.variant"] == "boxes"


def test_help_includes_wrapped_comment_lines(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "learning rate, a long comment that the author wrapped onto a second line, which must reach --help" in text
    assert "--inner.variant" in text and "which variant (default: grid)" in text


def test_stage_help_texts_keep_their_continuation_lines(capsys):
    from finetune.run import FinetuneConfig

    with pytest.raises(SystemExit):
        parse_config(FinetuneConfig, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the one cue between liver and spleen" in text  # flip_axes' second comment line
