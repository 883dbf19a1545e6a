"""What the lean forwards share (`RowBatch`): the rows of a batch, their cache columns, prompts prefilled into
rows as they come (continuous batching) and rows dropped, whatever the architecture's cache holds."""

from __future__ import annotations

import torch


class RowBatch:
    """Rows decoding together, each with its own cache row. A row's tokens sit in its cache from column 0; `t`
    counts steps the same for every row, and a row's start is t minus its length: its position, and the column its
    next token goes in, is t - start. Physical rows (R) may outnumber the batch's (B): a lone row doubled, a batch
    padded to whole tiles (see `plan_rows`); spare rows repeat the last row.

    A subclass sets `invariant`, `tile` and `min_rows` (its row plan) and provides `_caches()` (its cache tensors,
    each (L, R, T, N)), `_allocate(rows, columns)` (new empty caches), `_set_caches(caches)`, `_pass(prompts,
    max_rows)` (prompts (row, ids) through the blocks in one pass, filling their cache rows: logits (n, V)) and
    `_arrange()` (what a step needs, after the rows change)."""

    invariant: bool
    tile: int
    min_rows: int

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, max_new: int) -> torch.Tensor:
        """Start decoding a left-padded batch (B, P) to make up to `max_new` tokens a row: logits (B, V). Rows
        should come longest prompt first (so that rows of equal length sit together)."""
        batch, length = ids.shape
        self.starts = [length - n for n in mask.sum(-1).tolist()]
        self.rows = self._rows(batch)
        self._allocate(self.rows, length + max_new)
        self.t = length
        logits = self._prefill([(row, ids[row, start:]) for row, start in enumerate(self.starts)])
        self._arrange()
        return logits

    def admit(self, row: int, ids: torch.Tensor, max_new: int) -> torch.Tensor:
        """Prefill the prompt `ids` (P,) into `row`, a finished row's (its cache is overwritten) or, with row equal
        to the number of rows, a new last one, to decode `max_new` tokens with the others: its logits (1, V). The
        prompt is prefilled as `prefill` does each row, so the row's bits are what a batch of its own gives."""
        (length,), batch = ids.shape, len(self.starts) + (row == len(self.starts))
        rows, need = self._rows(batch), length + max_new
        old = self._caches()
        if rows > old[0].size(1) or need > old[0].size(2):
            # grown by whole blocks of columns, so that a run of longer prompts copies the cache a few times only
            self._allocate(max(rows, old[0].size(1)), max(old[0].size(2), round_up(need, 64)))
            for grown, cache in zip(self._caches(), old):
                grown[:, :cache.size(1), :cache.size(2)] = cache
        self.rows = rows
        if row == len(self.starts):
            self.starts.append(self.t - length)
        else:
            self.starts[row] = self.t - length
        logits = self._prefill([(row, ids)])
        self._arrange()
        return logits

    def select(self, rows: torch.Tensor) -> None:
        """Keep these rows (B',), dropping the others' caches."""
        self.starts = [self.starts[i] for i in rows.tolist()]
        self.rows = self._rows(len(rows))
        index = padded(rows, self.rows)
        self._set_caches([cache[:, index] for cache in self._caches()])
        self._arrange()

    def _rows(self, batch: int) -> int:
        """Physical rows for a batch of `batch`."""
        if not self.invariant:
            return batch
        return round_up(batch, self.tile) if self.tile > 1 else max(batch, self.min_rows)

    def _prefill(self, prompts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Logits (n, V) of prompts (row, ids) prefilled into their rows. Where rows go in whole tiles, every prompt
        goes through the products in one pass, its rows starting a tile and padded to whole tiles: each row gets
        the bits it gets alone, and the weights stream once per piece of rows instead of once per prompt.
        Elsewhere each prompt goes alone, its products taking all its rows at once."""
        if self.tile > 1:
            return self._pass(prompts, self.max_rows)
        return torch.cat([self._pass([prompt], 0) for prompt in prompts])


def padded(values: torch.Tensor, rows: int) -> torch.Tensor:
    """`values` (B, ...) with its last row repeated up to `rows` rows."""
    if values.size(0) >= rows:
        return values
    return torch.cat([values, values[-1:].expand([rows - values.size(0)] + list(values.shape[1:]))])


def tiled_offsets(prompts: list[tuple[int, torch.Tensor]], tile: int) -> tuple[list[int], int]:
    """Where each prompt's rows start in a pass over several, each padded to whole tiles; and the rows in all."""
    offsets, total = [], 0
    for _, ids in prompts:
        offsets.append(total)
        total += round_up(ids.size(0), tile)
    return offsets, total


def round_up(n: int, multiple: int) -> int:
    """The least multiple of `multiple` that is at least n."""
    return -(-n // multiple) * multiple
