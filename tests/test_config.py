"""The project's shared settings (dcama/config.py) agree with the modules that use them."""

from pathlib import Path

import pytest

import kernels
from dcama.config import (AMP_MODES, ATTN_IMPLS, BENCHMARK_DEFAULTS, BENCHMARK_RULES, PUBLISHED_IMG_SIZE,
                          SAVE_EVERY_MIN, default_img_size)
from dcama.data import BENCHMARKS
from dcama.data.fss import IMAGES_PER_CLASS
from dcama.data.shapes import POOL_SIZE
from dcama.runtime import AMP_DTYPES
from dcama.train import TrainConfig


def test_the_one_list_of_attention_implementations():
    assert ATTN_IMPLS == kernels.IMPLS and "auto" in ATTN_IMPLS


def test_every_data_set_class_follows_its_benchmarks_rules():
    assert set(BENCHMARK_RULES) == set(BENCHMARKS)
    assert all(BENCHMARKS[name].rules is rules for name, rules in BENCHMARK_RULES.items())
    # The Ks the rules allow are what the data holds: each class's images less the query.
    assert BENCHMARK_RULES["shapes"].max_shot == min(POOL_SIZE.values()) - 1
    assert BENCHMARK_RULES["fss"].max_shot == IMAGES_PER_CLASS - 1


def test_every_benchmark_has_defaults_for_every_defaultable_setting():
    assert set(BENCHMARK_DEFAULTS) == set(BENCHMARKS)
    optional = {"datapath", "logdir", "resume", "init", "backbone_weights", "benchmark"}  # benchmark: DEFAULT_BENCHMARK
    defaultable = {name for name, value in vars(TrainConfig()).items() if value is None} - optional
    for name, defaults in BENCHMARK_DEFAULTS.items():
        assert set(defaults) == defaultable, name


def test_published_setting_and_image_sizes():
    assert all(BENCHMARK_DEFAULTS[b]["img_size"] == PUBLISHED_IMG_SIZE for b in ("coco", "pascal", "fss"))
    assert default_img_size("shapes") == 96
    with pytest.raises(ValueError, match="unknown benchmark"):
        default_img_size("imagenet")


def test_amp_modes():
    assert AMP_MODES == ("off", *AMP_DTYPES)


def test_the_training_doc_states_the_save_every_min_defaults_of_the_code():
    doc = " ".join((Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text().split())
    sentence = doc[doc.index("`--save-every-min` defaults to"):].split(". ")[0]
    saving, off = sentence.split(", and to 0, ")
    assert saving.startswith(f"`--save-every-min` defaults to {SAVE_EVERY_MIN:g} (`SAVE_EVERY_MIN`")
    for text, minutes in ((saving, SAVE_EVERY_MIN), (off, 0.0)):
        named = {name for name in BENCHMARK_DEFAULTS if f"`{name}`" in text}
        assert named == {name for name, d in BENCHMARK_DEFAULTS.items() if d["save_every_min"] == minutes}, text
