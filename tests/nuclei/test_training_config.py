"""`histokd hovernet-train`: packaged configs of the official schedule, overrides, clear errors."""

import json

import cv2
import numpy as np
import pytest

from histokd.errors import ConfigError
from histokd.nuclei.training import hovernet_config_names, load_hovernet_config


def test_packaged_configs_hold_the_official_schedule():
    assert {"hovernet_fast", "hovernet_original"} <= set(hovernet_config_names())
    kw = load_hovernet_config("hovernet_fast")
    assert (kw["mode"], kw["num_types"], kw["lr"], kw["frozen_epochs"], kw["epochs"], kw["lr_step"]) == \
        ("fast", 6, 1e-4, 50, 50, 25)
    assert load_hovernet_config("hovernet_original")["mode"] == "original"


def test_overrides_types_and_unknown_keys(tmp_path):
    kw = load_hovernet_config("hovernet_fast", ["epochs=3", "lr=1e-3", "msge_axes=official"])
    assert kw["epochs"] == 3 and kw["lr"] == pytest.approx(1e-3) and kw["msge_axes"] == "official"
    with pytest.raises(ConfigError, match="valid keys: .*frozen_epochs"):
        load_hovernet_config("hovernet_fast", ["epoch=3"])
    with pytest.raises(ConfigError, match="epochs must be int"):
        load_hovernet_config("hovernet_fast", ["epochs=many"])
    with pytest.raises(ConfigError, match="no HoVer-Net config 'nope'.*hovernet_fast"):
        load_hovernet_config("nope")
    own = tmp_path / "mine.yaml"
    own.write_text("mode: fast\nnum_types: 0\nepochs: 2\n")
    assert load_hovernet_config(str(own)) == {"mode": "fast", "num_types": 0, "epochs": 2}


@pytest.mark.slow
def test_cli_trains_and_saves(tmp_path, capsys):
    from histokd.cli import main
    from histokd.nuclei.synthetic import synthetic_he_tile

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    img, inst = synthetic_he_tile(0, size=120, n_nuclei=8)
    cv2.imwrite(str(pairs / "a.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    np.save(pairs / "a_inst.npy", inst)
    rc = main(["--quiet", "hovernet-train", str(pairs), str(tmp_path / "out"), "--set", "num_types=0",
               "--set", "frozen_epochs=0", "--set", "epochs=1", "--set", "steps_per_epoch=1",
               "--set", "batch_size=1", "--set", "input_size=104"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert np.isfinite(out["last"]["full_loss"])
    assert (tmp_path / "out" / "hovernet.keras").exists()
    assert main(["hovernet-train", str(pairs), str(tmp_path / "o2"), "--set", "epoch=1"]) == 2
