"""`alloc_conf`: PYTORCH_CUDA_ALLOC_CONF parsed, refused with the option named, written one way."""

from __future__ import annotations

import pytest

from tuner.alloc_conf import MIB, AllocatorSettings, canonical_alloc_conf, parse_alloc_conf
from tuner.errors import SpecError


def test_the_default_allocator_is_none_or_empty() -> None:
    assert parse_alloc_conf(None) == parse_alloc_conf("") == AllocatorSettings()
    assert parse_alloc_conf(None).is_default
    assert canonical_alloc_conf(" ") is None


def test_options_are_parsed_and_written_in_one_canonical_form() -> None:
    settings = parse_alloc_conf(" max_split_size_mb:128 , expandable_segments : true")
    assert settings == AllocatorSettings(expandable_segments=True, max_split_size_bytes=128 * MIB)
    assert canonical_alloc_conf("max_split_size_mb:128,expandable_segments:True") == (
        "expandable_segments:True,max_split_size_mb:128"
    )
    assert canonical_alloc_conf("expandable_segments:False") is None
    assert canonical_alloc_conf("release_lock_on_cudamalloc:True") is None  # no device-memory effect


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("expandable_segment:True", "unknown option 'expandable_segment'"),
        ("expandable_segments:maybe", "expandable_segments must be True or False"),
        ("expandable_segments", "must look like 'option:value'"),
        ("max_split_size_mb:10", "max_split_size_mb must be greater than 20"),
        ("roundup_power2_divisions:3", "roundup_power2_divisions must be a power of two"),
        ("garbage_collection_threshold:1.5", "garbage_collection_threshold must be in (0, 1)"),
        ("backend:cudaMallocAsync", "backend 'cudaMallocAsync' is not modelled"),
        ("expandable_segments:True,expandable_segments:False", "given twice"),
    ],
)
def test_a_bad_setting_is_refused_naming_the_option(text: str, named: str) -> None:
    with pytest.raises(SpecError, match="alloc_conf") as caught:
        parse_alloc_conf(text)
    assert named in str(caught.value)
