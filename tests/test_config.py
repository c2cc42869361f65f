"""Config schema: YAML → dataclasses, overrides, validation with clear messages."""

import pytest
import yaml

import histokd  # noqa: F401
from histokd.config import (RunConfig, config_from_dict, list_configs, load_config,
                            resolve_config_path)
from histokd.errors import ConfigError


def test_default_loads_and_roundtrips():
    cfg = load_config("default")
    assert isinstance(cfg, RunConfig)
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and again.hash() == cfg.hash()


def test_overrides_parse_yaml_values():
    cfg = load_config("default", ["train.epochs=3", "model.expander_dims=[16, 8]", "views.downsample=null",
                                  "train.lr=0.01", "data.stain.method=macenko"])
    assert cfg.train.epochs == 3 and cfg.model.expander_dims == [16, 8]
    assert cfg.views.downsample is None and cfg.train.lr == 0.01
    assert cfg.data.stain.method == "macenko"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("default", ["train.epoch=3"])
    msg = str(e.value)
    assert "train.epoch" in msg and "Did you mean 'epochs'" in msg and "batch_size" in msg
    with pytest.raises(ConfigError, match="Valid keys"):
        config_from_dict({"trian": {}})


@pytest.mark.parametrize("override, match", [
    ("train.epochs=ten", "integer"),
    ("train.lr=-1", "positive"),
    ("views.kind=sideways", "one of"),
    ("model.method=byol", "one of"),
    ("train.batch_size=1", "batch_size"),
    ("views.augment=maybe", "true or false"),
    ("data.source=folder", "data.path"),
    ("model.method=supervised", "identity"),
    ("epochs", "section.key=value"),
])
def test_bad_values_rejected(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("default", [override])


def test_hash_ignores_name_but_not_training():
    a = load_config("default")
    assert a.hash() == load_config("default", ["name=other"]).hash()
    assert a.hash() != load_config("default", ["train.lr=0.5"]).hash()


def test_packaged_configs_cover_the_paper_tables():
    names = list_configs()
    assert "default" in names
    for r in (224, 112, 56, 28, 14, 7):
        for kind in ("asymmetric", "symmetric", "supervised"):
            assert f"more_from_less/table1_{kind}_{r}px" in names
    for enc in ("mobilenet_v2", "efficientnet_b0", "xception"):
        assert f"more_from_less/tableS2_{enc}_asymmetric" in names
    assert "more_from_less/tableS3_simclr_shared_symmetric" in names


def test_paper_scale_values():
    cfg = load_config("more_from_less/table1_asymmetric_7px")
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.lr, cfg.train.warmup_epochs) == (128, 100, 1e-4, 0.1)
    assert (cfg.loss.invariance, cfg.loss.variance, cfg.loss.covariance, cfg.loss.temperature) == (25, 25, 1, 0.5)
    assert cfg.model.expander_dims == [8192] * 3 and cfg.model.backbone == "resnet50"
    assert cfg.data.image_size == 224 and cfg.views.downsample == 7 and cfg.data.stain.method == "macenko"
    assert (cfg.eval.probe_epochs, cfg.eval.probe_lr) == (100, 1e-3)
    sup = load_config("more_from_less/table1_supervised_28px")
    assert sup.model.method == "supervised" and sup.views.kind == "identity" and sup.views.downsample == 28
    s3 = load_config("more_from_less/tableS3_simclr_shared_asymmetric")
    assert s3.model.method == "simclr" and s3.model.shared


def test_missing_config_suggests():
    with pytest.raises(ConfigError, match="histokd configs"):
        resolve_config_path("defualt")


def test_user_yaml_with_base(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: default\nname: mine\ntrain:\n  epochs: 2\n")
    cfg = load_config(str(p))
    assert cfg.name == "mine" and cfg.train.epochs == 2 and cfg.data.source == "synthetic"


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 parses 1e-3 as a string; `--set train.lr=1e-3` must still work
    cfg = load_config("default", ["train.lr=1e-3"])
    assert cfg.train.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        load_config("default", ["train.lr=fast"])


def test_augment_schema_matches_runtime_config():
    """The YAML schema (config.AugmentConfig, lists) and the runtime augmentation config
    (data.augment.AugmentConfig, frozen, tuples) are two classes; they must name the same
    keys with the same defaults, so a YAML file means what the pipeline does."""
    import dataclasses

    from histokd import config as C
    from histokd.data import augment as A

    schema = C.AugmentConfig()
    runtime = A.AugmentConfig()
    schema_fields = [f.name for f in dataclasses.fields(C.AugmentConfig)]
    assert schema_fields == [f.name for f in dataclasses.fields(A.AugmentConfig)]
    for name in schema_fields:
        want, got = getattr(runtime, name), getattr(schema, name)
        if isinstance(want, tuple):
            got = tuple(got)
        assert got == want, f"augment.{name}: schema default {got!r} != runtime default {want!r}"
    # and the schema's dict is accepted as is by the runtime config
    assert A.AugmentConfig.from_dict(dataclasses.asdict(schema)) == runtime


def test_one_augment_config_class():
    """One dataclass is both the YAML schema and the runtime augmentation config."""
    from histokd import config as C
    from histokd.data import augment as A
    from histokd.data import augment_config

    assert C.AugmentConfig is A.AugmentConfig is augment_config.AugmentConfig
    cfg = load_config("default", ["augment.crop_scale=[0.5, 1.0]", "augment.p_rotate=0.5"])
    assert isinstance(cfg.augment, A.AugmentConfig) and cfg.augment.crop_scale == (0.5, 1.0)
    assert A.resolve_config(cfg.augment) is cfg.augment
    assert "crop_scale:\n  - 0.5" in cfg.to_yaml()
    with pytest.raises(ConfigError, match="augment.p_noise"):
        load_config("default", ["augment.p_noise=1.5"])


def test_config_modules_do_not_import_tensorflow():
    """config.py and the augment dataclass's module import no TensorFlow at module level."""
    import ast

    from histokd import config as C
    from histokd.data import augment_config

    for mod in (C, augment_config):
        tree = ast.parse(open(mod.__file__).read())
        names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module]
        assert not [n for n in names if n.split(".")[0] in ("tensorflow", "keras")], mod.__name__


def test_image_size_int_or_sides_with_the_backbones_rank():
    from histokd.backbones._common import backbone_spatial_rank

    assert load_config("default", ["data.image_size=[48, 48]"]).data.image_size == 48
    assert load_config("default", ["data.image_size=48"]).data.image_size == 48
    assert backbone_spatial_rank("resnet18") == backbone_spatial_rank("swinv2_tiny") == 2
    with pytest.raises(ConfigError, match="square tiles"):
        load_config("default", ["data.image_size=[32, 48]"])
    with pytest.raises(ConfigError, match="3-D size but model.backbone=resnet18 reads 2-D"):
        load_config("default", ["data.image_size=[16, 32, 32]"])
    for bad in ("true", "[32]", "[32, 32, 32, 32]", "'64'"):
        with pytest.raises(ConfigError, match="data.image_size must be"):
            load_config("default", [f"data.image_size={bad}"])
    with pytest.raises(ConfigError, match=">= 8"):
        load_config("default", ["data.image_size=[4, 4]"])
