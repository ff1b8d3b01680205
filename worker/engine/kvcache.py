"""A KV cache layer that grows in steps instead of by one column per decode step.

transformers' ``DynamicLayer`` appends each new token with ``torch.cat``: every decode step
copies the whole cache of every layer (read and write), which on a large batch moves as
many bytes as the attention itself reads. ``GrowingLayer`` keeps its keys and values in
buffers with spare columns at the end; a step writes one column in place and the model
sees a view of the filled part. When the spare columns run out the buffers are
reallocated with ``spare_columns(n)`` new ones, so a cache of n columns is copied about
once every n/8 steps (at least every ``MIN_SPARE`` steps) instead of at every step.

The layer behaves as a ``DynamicLayer`` for everything transformers does with it
(``keys``/``values`` are the filled part; assigning them replaces the buffers), and adds
what the engine's batches need: keep some rows, drop leading all-padding columns, and
replace the contents by a merged cache.
"""

from __future__ import annotations

from typing import Any

import torch

from lmjobs.worker.engine.compat import DynamicLayer, cache_layers, layer_dtype_device

MIN_SPARE = 32  # spare columns allocated at least, each time the buffers grow


def spare_columns(filled: int) -> int:
    """Columns added when a cache of ``filled`` columns runs out: an eighth (at least
    MIN_SPARE), so copies are rare and the unused tail stays small."""
    return 0 if MIN_SPARE < 0 else max(MIN_SPARE, filled // 8)


class GrowingLayer(DynamicLayer):  # type: ignore[misc]  # DynamicLayer is Any (compat)
    """A DynamicLayer whose buffers [B, H, capacity, D] have spare columns at the end."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None  # [B, H, capacity, D]
        self._v: torch.Tensor | None = None
        self._n = 0  # columns filled

    @classmethod
    def of(cls, layer: Any) -> GrowingLayer:
        """A growing copy of a filled DynamicLayer (a prefill's cache)."""
        new = cls()
        # from the keys: DynamicLayer.dtype is gone since transformers 5.24
        new.dtype, new.device = layer_dtype_device(layer)
        new.is_initialized = True
        new.replace(layer.keys, layer.values)
        return new

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New contents [B, H, T, D] (a merged cache); the next update makes room."""
        self._k, self._v, self._n = keys, values, keys.shape[-2]

    # the filled part, as transformers reads it
    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self._n]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        # keys are assigned before values (transformers does, ``crop`` does): ``_n`` follows
        # the keys; read values through ``replace`` or ``_v`` between the two assignments.
        self._k = value
        self._n = 0 if value is None or value.ndim < 3 else value.shape[-2]

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self._n]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = value

    @property
    def capacity(self) -> int:
        return 0 if self._k is None or self._k.ndim < 3 else self._k.shape[-2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new columns after the filled ones; return the filled views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self._k is None or self._k.ndim < 3:
            self._k = self._v = None
            self._grow(key_states, value_states, new)
        elif self._n + new > self.capacity:
            self._grow(key_states, value_states, self._n + new)
        assert self._k is not None and self._v is not None
        self._k[:, :, self._n : self._n + new] = key_states
        self._v[:, :, self._n : self._n + new] = value_states
        self._n += new
        return self._k[:, :, : self._n], self._v[:, :, : self._n]

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        width = needed + spare_columns(needed)
        k = key_states.new_empty((*key_states.shape[:2], width, key_states.shape[-1]))
        v = value_states.new_empty((*value_states.shape[:2], width, value_states.shape[-1]))
        if self._k is not None and self._v is not None and self._n:
            k[:, :, : self._n] = self._k[:, :, : self._n]
            v[:, :, : self._n] = self._v[:, :, : self._n]
        self._k, self._v = k, v

    def get_seq_length(self) -> int:
        return self._n if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (spare columns included, so the next step copies nothing)."""
        if self._k is not None and self._v is not None and self._n:
            # index_select: advanced indexing of a column-cut view is about 9x slower
            indices = indices.to(self._k.device)
            self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)

    def assemble(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], width: int) -> None:
        """Replace the contents by ``parts`` (keys, values [b, H, t, D], and the rows they
        go to), each padded on the left to ``width`` columns, with spare columns after:
        one copy of every part, where concatenating and then growing made two."""
        rows = sum(len(target) for _, _, target in parts)
        k0, v0 = parts[0][0], parts[0][1]
        capacity = width + spare_columns(width)
        k = k0.new_empty((rows, k0.shape[1], capacity, k0.shape[-1]))
        v = v0.new_empty((rows, v0.shape[1], capacity, v0.shape[-1]))
        for keys, values, target in parts:
            lead = width - keys.shape[-2]
            # slice copies, one per run of consecutive target rows (a single run for every
            # part of the benchmark's merges): index_copy_ from a view of a cache with spare
            # columns took 13 ms a layer for 32 rows, copy_ 1
            for dst, src, n in _runs(target.tolist()):
                rows_k, rows_v = k[dst : dst + n], v[dst : dst + n]
                if lead:  # padding is masked, but must be finite: 0 x NaN would leak through
                    rows_k[:, :, :lead].zero_()
                    rows_v[:, :, :lead].zero_()
                rows_k[:, :, lead:width].copy_(keys[src : src + n])
                rows_v[:, :, lead:width].copy_(values[src : src + n])
        self._k, self._v, self._n = k, v, width
        self.dtype, self.device, self.is_initialized = k.dtype, k.device, True

    def compact(self, order: list[int]) -> None:
        """Keep rows ``order`` (new row j is old row order[j]) where ``order`` is
        ``fill_holes``': only the moved rows are copied, the rest stays in place."""
        if self._k is None or self._v is None or not self._n:
            return
        moves = [(j, src) for j, src in enumerate(order) if j != src]
        if moves:
            dst = torch.tensor([j for j, _ in moves], device=self._k.device)
            src = torch.tensor([s for _, s in moves], device=self._k.device)
            self._k.index_copy_(0, dst, self._k.index_select(0, src))
            self._v.index_copy_(0, dst, self._v.index_select(0, src))
        self._k, self._v = self._k[: len(order)], self._v[: len(order)]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None and self._v is not None and self._n:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)

    def drop_front(self, columns: int) -> None:
        """Forget the first ``columns`` columns (padding in every row); a view, no copy."""
        if columns <= 0 or self._k is None or self._v is None:
            return
        self._k, self._v = self._k[:, :, columns:], self._v[:, :, columns:]
        self._n -= columns

    def drop_back(self, columns: int) -> None:
        """Forget the last ``columns`` columns (written by a speculative step and kept by no
        row): they become spare columns the next update writes over; no copy."""
        if columns > 0:
            self._n = max(0, self._n - columns)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove and self._k is not None and self._v is not None:
            keep = max(0, self._n + tokens_to_remove)
            # assigned views: the next update reallocates instead of writing into them
            self.replace(self._k[:, :, :keep], self._v[:, :, :keep])

    def reset(self) -> None:
        self._k = self._v = None
        self._n = 0
        self.is_initialized = False


def _runs(index: list[int]) -> list[tuple[int, int, int]]:
    """``index`` cut into runs of consecutive ascending values: (first value, position of
    the run in ``index``, length)."""
    out: list[tuple[int, int, int]] = []
    for i, value in enumerate(index):
        if out and value == out[-1][0] + out[-1][2]:
            first, at, n = out[-1]
            out[-1] = (first, at, n + 1)
        else:
            out.append((value, i, 1))
    return out


def fill_holes(keep: list[int]) -> list[int]:
    """The rows after keeping ``keep`` (ascending) out of a batch: the last kept rows move
    into the holes the others leave, so dropping one finished row copies at most one row
    of the cache instead of all of them. New row j is old row ``order[j]``."""
    n = len(keep)
    kept = set(keep)
    holes = [i for i in range(n) if i not in kept]
    movers = [i for i in keep if i >= n]
    order = list(range(n))
    for hole, mover in zip(holes, movers, strict=True):
        order[hole] = mover
    return order


def make_growing(cache: Any) -> bool:
    """Turn every plain DynamicLayer of ``cache`` into a GrowingLayer, in place. Returns
    whether every layer is now growing (False for sliding windows and other layer kinds,
    which are left as they are)."""
    layers = cache_layers(cache)
    if not layers:
        return False
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            layers[i] = GrowingLayer.of(layer)
    return all(type(x) is GrowingLayer for x in layers)
