"""GrowingLayer: the same keys and values as transformers' DynamicLayer, without a copy of
the whole cache at every decode step."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lmjobs.worker.engine.kvcache import (
    MIN_SPARE,
    GrowingLayer,
    _runs,
    fill_holes,
    make_growing,
    spare_columns,
)


def states(batch: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, columns, 4, generator=g), torch.randn(batch, 2, columns, 4, generator=g)


def filled(batch: int = 3, columns: int = 5) -> tuple[DynamicLayer, GrowingLayer]:
    plain = DynamicLayer()
    plain.update(*states(batch, columns, seed=0))
    return plain, GrowingLayer.of(plain)


def same(plain: DynamicLayer, grown: GrowingLayer) -> None:
    assert grown.get_seq_length() == plain.get_seq_length()
    assert torch.equal(grown.keys, plain.keys)
    assert torch.equal(grown.values, plain.values)


def test_decode_steps_write_in_place_until_the_spare_columns_run_out():
    plain, grown = filled(columns=5)
    grown.update(*states(3, 1, seed=1))
    plain.update(*states(3, 1, seed=1))
    buffer, capacity = grown._k, grown.capacity
    assert capacity == 6 + spare_columns(6) and capacity - 6 >= MIN_SPARE
    for step in range(capacity - 6):
        k, v = grown.update(*states(3, 1, seed=10 + step))
        plain.update(*states(3, 1, seed=10 + step))
        assert grown._k is buffer  # no reallocation, no copy
        assert torch.equal(k, plain.keys) and torch.equal(v, plain.values)
    grown.update(*states(3, 1, seed=99))  # one past the capacity: a new, larger buffer
    plain.update(*states(3, 1, seed=99))
    assert grown._k is not buffer and grown.capacity > capacity
    same(plain, grown)


def test_rows_kept_front_cut_and_replaced_like_a_dynamic_layer():
    plain, grown = filled(batch=4, columns=6)
    for layer in (plain, grown):
        layer.update(*states(4, 1, seed=1))
    index = torch.tensor([0, 2, 3])
    plain.batch_select_indices(index)
    grown.batch_select_indices(index)
    same(plain, grown)
    assert grown.capacity > grown.get_seq_length()  # the spare columns survive the selection

    plain.keys, plain.values = plain.keys[:, :, 2:], plain.values[:, :, 2:]
    grown.drop_front(2)
    same(plain, grown)

    for layer in (plain, grown):
        layer.update(*states(3, 1, seed=2))
    same(plain, grown)


def test_replace_reads_both_tensors_before_the_length_changes():
    """A merge pads the running cache on the left to a wider one: reading ``values`` after
    assigning ``keys`` would take spare columns as cache (the bug this guards against)."""
    plain, grown = filled(batch=2, columns=4)
    for layer in (plain, grown):
        layer.update(*states(2, 1, seed=1))  # grown now has spare columns
    pad = torch.zeros(2, 2, 3, 4)
    keys, values = torch.cat([pad, grown.keys], 2), torch.cat([pad, grown.values], 2)
    grown.replace(keys, values)
    plain.keys, plain.values = torch.cat([pad, plain.keys], 2), torch.cat([pad, plain.values], 2)
    same(plain, grown)
    for layer in (plain, grown):
        layer.update(*states(2, 1, seed=2))
    same(plain, grown)


def test_crop_never_writes_into_the_cropped_buffer():
    plain, grown = filled(columns=6)
    for layer in (plain, grown):
        layer.update(*states(3, 1, seed=1))
    before = grown._k.clone()
    plain.crop(-2)
    grown.crop(-2)
    same(plain, grown)
    for layer in (plain, grown):
        layer.update(*states(3, 1, seed=2))
    same(plain, grown)
    assert torch.equal(before[:, :, :5], grown.keys[:, :, :5])
    with pytest.raises(ValueError, match="negative"):
        grown.crop(1)


def test_make_growing_converts_plain_layers_only():
    cache = DynamicCache()
    cache.update(*states(2, 3, seed=0), layer_idx=0)
    cache.update(*states(2, 3, seed=1), layer_idx=1)
    assert make_growing(cache)
    assert all(type(x) is GrowingLayer for x in cache.layers)
    assert cache.get_seq_length() == 3

    other = DynamicCache()
    other.update(*states(2, 3, seed=0), layer_idx=0)
    other.layers.append(object())  # a kind of layer the engine cannot pad or cut
    assert not make_growing(other)
    assert not make_growing(DynamicCache())  # nothing to convert


def test_fill_holes_moves_the_last_rows_into_the_gaps():
    assert fill_holes([0, 1, 2]) == [0, 1, 2]
    assert fill_holes([0, 2, 3, 4]) == [0, 4, 2, 3]  # row 1 left: row 4 takes its place
    assert fill_holes([3, 4]) == [3, 4]
    assert fill_holes([]) == []


def test_compact_keeps_the_rows_it_is_told_and_copies_only_movers():
    plain, grown = filled(batch=5, columns=4)
    for layer in (plain, grown):
        layer.update(*states(5, 1, seed=1))
    order = fill_holes([0, 2, 4])  # [0, 4, 2]
    plain.batch_select_indices(torch.tensor(order))
    buffer = grown._k
    grown.compact(order)
    same(plain, grown)
    assert grown._k.data_ptr() == buffer.data_ptr()  # a view of the same buffer
    for layer in (plain, grown):
        layer.update(*states(3, 1, seed=2))
    same(plain, grown)


def test_assemble_pads_on_the_left_with_zeros_and_places_rows():
    wide, narrow = states(2, 6, seed=3), states(1, 4, seed=4)
    layer = GrowingLayer()
    # rows of the narrow part go to row 0, the wide part's to rows 2 and 1
    layer.assemble([(wide[0], wide[1], torch.tensor([2, 1])), (narrow[0], narrow[1], torch.tensor([0]))], 6)
    assert layer.get_seq_length() == 6 and layer.capacity > 6
    assert torch.equal(layer.keys[2], wide[0][0]) and torch.equal(layer.values[1], wide[1][1])
    assert torch.equal(layer.keys[0, :, 2:], narrow[0][0])
    assert torch.equal(layer.keys[0, :, :2], torch.zeros(2, 2, 4))
    assert torch.equal(layer.values[0, :, :2], torch.zeros(2, 2, 4))


@pytest.mark.parametrize("targets", [([0, 1], [2, 3, 4]), ([3, 4], [0, 1, 2]), ([1, 3], [0, 2, 4])])
def test_assemble_places_views_of_growing_caches_in_runs_of_rows(targets):
    # the parts a merge hands over are views of caches with spare columns (not contiguous);
    # each run of consecutive target rows is one slice copy, scattered rows one each
    first, second = GrowingLayer(), GrowingLayer()
    first.update(*states(2, 7, seed=5))
    second.update(*states(3, 4, seed=6))
    assert not first.keys.is_contiguous() and first.capacity > 7
    layer = GrowingLayer()
    parts = [(first.keys, first.values, torch.tensor(targets[0]))]
    parts.append((second.keys, second.values, torch.tensor(targets[1])))
    layer.assemble(parts, 7)
    for source, rows in ((first, targets[0]), (second, targets[1])):
        lead = 7 - source.get_seq_length()
        for j, row in enumerate(rows):
            assert torch.equal(layer.keys[row, :, lead:], source.keys[j])
            assert torch.equal(layer.values[row, :, lead:], source.values[j])
            assert torch.equal(layer.keys[row, :, :lead], torch.zeros(2, lead, 4))
            assert torch.equal(layer.values[row, :, :lead], torch.zeros(2, lead, 4))


def test_runs_cut_an_index_into_consecutive_runs():
    assert _runs([2, 3, 4]) == [(2, 0, 3)]
    assert _runs([1, 3, 4, 0]) == [(1, 0, 1), (3, 1, 2), (0, 3, 1)]
    assert _runs([]) == []
