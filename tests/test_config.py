"""The project's shared settings (dcama/config.py) agree with the modules that use them."""

import pytest

import kernels
from dcama.config import (AMP_DTYPES, AMP_MODES, ATTN_IMPLS, BENCHMARK_DEFAULTS, PUBLISHED_IMG_SIZE,
                          default_img_size)
from dcama.data import BENCHMARKS
from dcama.train import TrainConfig


def test_the_one_list_of_attention_implementations():
    assert ATTN_IMPLS is kernels.IMPLS and "auto" in ATTN_IMPLS


def test_every_benchmark_has_defaults_for_every_defaultable_setting():
    assert set(BENCHMARK_DEFAULTS) == set(BENCHMARKS)
    defaultable = {name for name, value in vars(TrainConfig()).items() if value is None} - {"datapath", "logdir",
                                                                                             "resume",
                                                                                             "backbone_weights"}
    for name, defaults in BENCHMARK_DEFAULTS.items():
        assert set(defaults) == defaultable, name


def test_published_setting_and_image_sizes():
    assert all(BENCHMARK_DEFAULTS[b]["img_size"] == PUBLISHED_IMG_SIZE for b in ("coco", "pascal", "fss"))
    assert default_img_size("shapes") == 96
    with pytest.raises(ValueError, match="unknown benchmark"):
        default_img_size("imagenet")


def test_amp_modes():
    assert AMP_MODES == ("off", *AMP_DTYPES)
