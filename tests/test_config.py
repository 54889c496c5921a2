from __future__ import annotations

from pathlib import Path

import pytest

from sdlora.config.train_config import ConfigError, TrainConfig, config_from_preset, make_config, save_preset

PRESETS = sorted((Path(__file__).resolve().parents[1] / "presets").glob("*.toml"))


def test_required_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"demo", "sd15-character", "sd15-style", "sd15-low-vram"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_are_complete_and_valid(preset):
    cfg = config_from_preset(preset)
    text = preset.read_text()
    assert text.lstrip().startswith("#")  # commented
    for key in ("base_model", "data_dir", "rank", "alpha", "targets", "lr", "resolution", "save_precision"):
        assert key in text, key
    assert isinstance(cfg, TrainConfig)


def test_unknown_key_in_preset_is_named(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("rank = 4\n[training]\nlearning_rate = 1e-4\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        config_from_preset(p)


def test_bad_values_are_named():
    for field, value in [("rank", 0), ("alpha", -1), ("resolution", 500), ("lr", "x"), ("optimizer", "sgd"),
                         ("caption_dropout", 1.5), ("output_name", "../../x")]:
        with pytest.raises(ConfigError, match=field):
            make_config(**{field: value})
    with pytest.raises(ConfigError, match="text_encoder_lr"):
        make_config(text_encoder_lr=1e-5)


def test_save_preset_roundtrip(tmp_path):
    cfg = make_config(rank=12, targets=["attn2", "ff.net.2"], sample_prompts=["a --d 1"])
    path = save_preset(cfg, tmp_path / "mine.toml", header="my preset")
    assert config_from_preset(path) == cfg
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
