"""Mask builder on synthetic attention maps: threshold, overlaps, ties, priorities, resize."""

import pytest
import torch

from asyndm_fpdm.samplers.masks import (
    build_item_masks, initial_dynamic_masks, priority_map, resolve_priority, threshold_maps,
)
from asyndm_fpdm.samplers.tokens import UnknownWordError, locate_word, parse_targets


def test_threshold_at_mask_thr_times_mean():
    maps = torch.tensor([[[[0.1, 0.2], [0.3, 0.4]]]])  # mean 0.25
    assert threshold_maps(maps, 1.0).flatten().tolist() == [0, 0, 1, 1]
    assert threshold_maps(maps, 0.8).flatten().tolist() == [0, 1, 1, 1]  # >= 0.2 (ties count)
    assert threshold_maps(maps, 2.0).sum() == 0


def test_overlap_goes_to_the_larger_k_and_ties_to_the_first_item():
    both = torch.ones(1, 2, 1, 3)
    both[0, 1, 0, 2] = 0
    out = resolve_priority(both, [0.5, 0.9])
    assert out[0, 1, 0].tolist() == [1, 1, 0] and out[0, 0, 0].tolist() == [0, 0, 1]
    tie = resolve_priority(torch.ones(1, 2, 1, 1), [0.7, 0.7])
    assert tie.flatten().tolist() == [1, 0]
    assert resolve_priority(torch.zeros(1, 2, 1, 1), [0.7, 0.9]).sum() == 0


def test_build_item_masks_resizes_nearest_and_keeps_one_item_per_pixel():
    maps = torch.zeros(2, 2, 4, 4)
    maps[:, 0, :2, :2] = 1.0
    maps[:, 1, :3, :3] = 1.0
    masks = build_item_masks(maps, [0.3, 0.8], (16, 16))
    assert masks.shape == (2, 2, 16, 16)
    assert masks.sum(dim=1).max() == 1
    assert masks[0, 1, :12, :12].eq(1).all() and masks[0, 0].sum() == 0  # item 1 wins its overlap
    assert priority_map(masks, [0.3, 0.8])[0, 0, 0] == pytest.approx(0.8)


def test_initial_dynamic_mask_gives_everything_to_the_last_token():
    m = initial_dynamic_masks(2, [2, 5, 3], (4, 4))
    assert m[:, 1].eq(1).all() and m[:, 0].sum() == 0 and m[:, 2].sum() == 0


def test_parse_targets_and_locate_words():
    assert parse_targets("rabbit:0.7, basketball") == [("rabbit", 0.7), ("basketball", 0.7)]
    with pytest.raises(ValueError, match="between 0 and 1"):
        parse_targets("rabbit:3")
    ids = [49406, 320, 10274, 1629, 5326, 49407]
    assert locate_word(ids, [10274], word="rabbit") == [2]
    assert locate_word(ids, [1629, 5326], word="two tokens") == [3, 4]
    with pytest.raises(UnknownWordError, match="a rabbit playing"):
        locate_word(ids, [999], ["<start>", "a", "rabbit", "playing", "basketball", "<end>"], word="cat")
    assert locate_word([1, 7, 2, 7], [7], occurrence=-1) == [1, 3]
    assert locate_word([1, 7, 2, 7], [7], occurrence=1) == [3]
