"""The typed config: defaults, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from hcformer.config import (
    Config,
    build_config,
    flatten,
    load_config,
    merge,
    parse_overrides,
    to_dict,
)
from hcformer.errors import ConfigError, HCFormerError


def test_defaults_are_the_papers_coco_model():
    cfg = Config()
    assert cfg.model.backbone.hierarchy_level == 3
    assert cfg.model.backbone.cluster_dim == 128
    assert cfg.model.backbone.scale_init == pytest.approx(0.1)
    assert cfg.model.head.queries == 100
    assert cfg.model.head.decoder_layers == 8
    assert cfg.loss.reg_weight == pytest.approx(0.1)


def test_dotted_overrides_reach_nested_keys():
    cfg = build_config(
        merge({"model": {"head": {"queries": 50}}}, parse_overrides(["model.head.queries=20"]))
    )
    assert cfg.model.head.queries == 20
    # YAML 1.1 reads "2e-3" as a string: a float key takes it as the number it means.
    assert build_config(parse_overrides(["solver.lr=2e-3"])).solver.lr == 0.002
    with pytest.raises(ConfigError, match=r"solver\.lr: expected a number, got 'fast'"):
        build_config(parse_overrides(["solver.lr=fast"]))
    assert build_config({"model.backbone.depths": [1, 1, 1, 1]}).model.backbone.depths == [
        1,
        1,
        1,
        1,
    ]


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        build_config({"model": {"head": {"querys": 50}}})
    msg = str(err.value)
    assert "'model.head.querys'" in msg
    assert "did you mean 'queries'" in msg
    assert "decoder_layers" in msg  # lists the valid keys


def test_wrong_types_and_choices_are_named():
    with pytest.raises(ConfigError, match=r"model\.head\.queries: expected an integer, got 'many'"):
        build_config({"model.head.queries": "many"})
    with pytest.raises(ConfigError, match=r"model\.backbone\.name: 'resnet5' is not one of"):
        build_config({"model.backbone.name": "resnet5"})
    with pytest.raises(ConfigError, match=r"model\.backbone\.dcnv2: expected true or false"):
        build_config({"model.backbone.dcnv2": 1})
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["model.head.queries"])


def test_train_image_pad_is_a_number_or_the_mean():
    assert Config().data.train_image_pad == 128.0  # the authors' mapper / FixedSizeCrop value
    assert build_config({"data.train_image_pad": "mean"}).data.train_image_pad == "mean"
    assert build_config(parse_overrides(["data.train_image_pad=0"])).data.train_image_pad == 0.0
    with pytest.raises(ConfigError, match=r"data\.train_image_pad: 'grey' matches none of"):
        build_config({"data.train_image_pad": "grey"})


def test_config_errors_are_user_errors():
    assert issubclass(ConfigError, HCFormerError)


def test_roundtrip_through_yaml(tmp_path):
    cfg = build_config({"model.head.encoder_layers": 6, "data.dataset": "ade20k"})
    path = tmp_path / "c.yaml"
    from hcformer.config import save_config

    save_config(cfg, path)
    again = load_config(path, ["solver.lr=0.001"])
    assert again.model.head.encoder_layers == 6
    assert again.data.dataset == "ade20k"
    assert again.solver.lr == pytest.approx(1e-3)
    assert flatten(to_dict(again))["model.head.encoder_layers"] == 6


def test_missing_or_bad_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  head:\n    decoder_layerz: 3\n")
    with pytest.raises(
        ConfigError, match=r"wrong\.yaml: unknown key 'model\.head\.decoder_layerz'"
    ):
        load_config(wrong)
