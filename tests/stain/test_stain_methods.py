"""data.stain.method is a look-up in STAIN_NORMALIZERS: config choices, the run's stain step
and the mask_pairs check all read that one table."""

import pytest

from histokd.config import load_config
from histokd.data.datasets import stain_fn
from histokd.errors import ConfigError, StainError
from histokd.stain import STAIN_NORMALIZERS, MacenkoNormalizer, make_stain_fn, stain_normalizes


def test_table_drives_every_use():
    assert STAIN_NORMALIZERS == {"none": None, "macenko": MacenkoNormalizer}
    assert not stain_normalizes("none") and stain_normalizes("MACENKO")
    with pytest.raises(StainError, match="unknown stain method 'reinhard'"):
        stain_normalizes("reinhard")
    with pytest.raises(StainError, match="unknown stain method"):
        make_stain_fn("reinhard")
    assert stain_fn(load_config("default", ["data.stain.method=none"])) is None
    assert stain_fn(load_config("default", ["data.stain.method=macenko"])).normalizer is not None
    with pytest.raises(ConfigError, match=r"data.stain.method must be one of \['macenko', 'none'\]"):
        load_config("default", ["data.stain.method=reinhard"])
