"""Weight layouts for the lean GPT-2 step: aligned and augmented (bias as a last row) copies of the weights, and
the probes that find for how many rows a matrix product keeps each row's bits (batch invariance)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def _aligned(weight: torch.nn.Parameter, transposed: bool | None = None) -> torch.Tensor:
    """`weight`, detached, moved once into 64-byte-aligned memory where it is not; a matrix also into the transposed
    memory layout (the same (K, N) matrix, stored as (N, K)) for `transposed` True, the row-major one for False, and
    either for None. transformers maps safetensors weights straight from the file at 8-byte alignment: vector loads
    then straddle cache lines, which makes a decode step about 10% slower (measured on the benchmark's model). The
    parameter itself is changed (same values, same Parameter, so tied weights stay tied and the model still works),
    so the model holds one copy, not two."""
    tensor = weight.detach()
    if tensor.device.type != "cpu":
        return tensor
    is_transposed = tensor.dim() == 2 and tensor.stride() == (1, tensor.size(0)) and not tensor.is_contiguous()
    if transposed is None:
        transposed = is_transposed
    if transposed != is_transposed or tensor.data_ptr() % 64 or not (tensor.is_contiguous() or is_transposed):
        with torch.no_grad():
            weight.data = tensor.t().contiguous().t() if transposed else tensor.clone(
                memory_format=torch.contiguous_format)
    return weight.detach()


def _augmented(weight: torch.nn.Parameter, bias: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The (K + 1, N) matrix of `weight` (K, N) with `bias` (N,) as its last row, in the given memory layout: times
    an input whose last column is ones, the product adds the bias itself. That saves a separate bias addition
    after the product before it, which with cold caches cost about as much as a layer norm (about 30 us at batch 1
    on the benchmark's model). The bias goes in as the last term of each sum, so a row's result can differ from
    transformers' addmm(bias, ...) by rounding, as with any other order of additions (the products themselves
    already differ: see GPT2Forward). The parameter becomes a view of the first K rows (one copy in memory); a
    later decoder finds it so."""
    tensor = weight.detach()
    (k, n), dtype, device = tensor.shape, tensor.dtype, tensor.device
    strides = (1, k + 1) if transposed else (n, 1)
    storage = tensor.untyped_storage()
    if (tensor.storage_offset() == 0 and tensor.stride() == strides
            and storage.nbytes() == (k + 1) * n * tensor.element_size()):
        full = tensor.new_empty(0).set_(storage, 0, (k + 1, n), strides)
        if torch.equal(full[k], bias):
            return full
    full = torch.empty_strided((k + 1, n), strides, dtype=dtype, device=device)
    with torch.no_grad():
        full[:k] = tensor
        full[k] = bias
        weight.data = full[:k]
    return full


def _row_stable_layout(rows_in: int, widths: Sequence[int], dtype: torch.dtype) -> tuple[bool, int]:
    """How to multiply by a (K, N) matrix, K = rows_in, in products as wide as each of `widths`, so that a row's
    result does not depend on the rows around it: whether to store it transposed ((N, K) in memory), and the most
    rows one product may take (1 where even 3 rows change a row's bits). The transposed layout wins where it keeps a
    row's bits for up to 8 rows or more (faster for few rows, see GPT2Forward); measured once per shape, type and
    thread count."""
    threads = torch.get_num_threads()
    transposed_rows = min(_stable_rows(rows_in, n, dtype, True, threads) for n in widths)
    if transposed_rows >= 8:
        return True, transposed_rows
    rows = min(_stable_rows(rows_in, n, dtype, False, threads) for n in widths)
    return (False, rows) if rows >= transposed_rows else (True, transposed_rows)


@functools.cache
def _stable_rows(k: int, n: int, dtype: torch.dtype, transposed: bool, threads: int, limit: int = 16) -> int:
    """The most rows m <= limit such that bias + x @ w, w (K, N) in the given memory layout, gives each row of x
    (1 < rows <= m) the bits it gets in a product of two rows. Each row count is tried from the first row, and the
    smallest ones and the largest also from the second (a piece can start anywhere; trying every count from both
    would double the time before a first token for no case seen)."""
    w, bias, x = _operands(k, n, limit + 1, dtype, transposed)
    pairs = torch.cat([torch.addmm(bias, x[i:i + 2], w) for i in range(0, limit, 2)])  # (limit, N)
    pairs = torch.cat([pairs, torch.addmm(bias, x[limit - 1:], w)[1:]])  # the last row, paired too
    for m in range(2, limit + 1):
        for start in (0, 1) if m <= 4 or m == limit else (0,):
            if not torch.equal(torch.addmm(bias, x[start:start + m], w), pairs[start:start + m]):
                return m - 1
    return limit


def _operands(k: int, n: int, rows: int, dtype: torch.dtype, transposed: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A probe's product: w (K, N) in the given memory layout, bias (N,) and x (rows, K), views of one draw of
    noise (random numbers cost more than the products)."""
    noise = _noise(k * n + n + rows * k, dtype)
    w = noise[:k * n].view((n, k) if transposed else (k, n))
    return (w.t() if transposed else w), noise[k * n:k * n + n], noise[k * n + n:].view(rows, k)


def _noise(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """`numel` standard normal numbers of `dtype`, the same every time: the start of one draw kept for the process."""
    global _NOISE
    if _NOISE.numel() < numel or _NOISE.dtype != dtype:
        _NOISE = torch.randn(max(numel, _NOISE.numel()), generator=torch.Generator().manual_seed(0), dtype=dtype)
    return _NOISE[:numel]


_NOISE = torch.empty(0)


@functools.cache
def _attention_keeps_row_bits(heads: int, head_dim: int, dtype: torch.dtype, threads: int,
                              kv_heads: int | None = None) -> bool:
    """Whether one attention call over several rows (a query each, as a decode step makes them, over the same number
    of keys) gives each row the bits it gets alone. Where it does not (torch's CPU kernel on an AMD EPYC, measured),
    rows of equal length get an attention call each. Tried at a few key counts, on views of a cache-like layout;
    `kv_heads` fewer than `heads`: grouped-query attention (SDPA's enable_gqa)."""
    rows, lengths, kv_heads = 4, (1, 7, 40, 300), kv_heads or heads
    noise = _noise(rows * max(lengths) * (heads + 2 * kv_heads) * head_dim, dtype)
    cache = noise.view(rows, max(lengths), heads + 2 * kv_heads, head_dim)  # (R, T, H + 2 KV, D)
    q, k, v = (part.transpose(1, 2) for part in cache.split([heads, kv_heads, kv_heads], 2))  # (R, heads, T, D)
    for length in lengths:
        args = q.narrow(2, length - 1, 1), k.narrow(2, 0, length), v.narrow(2, 0, length)
        gqa = {"enable_gqa": True} if kv_heads != heads else {}
        together = torch.nn.functional.scaled_dot_product_attention(*args, **gqa)
        for row in range(rows):
            alone = torch.nn.functional.scaled_dot_product_attention(*(a[row:row + 1] for a in args), **gqa)
            if not torch.equal(alone[0], together[row]):
                return False
    return True


@functools.cache
def _single_row_keeps_bits(k: int, n: int, dtype: torch.dtype, transposed: bool, threads: int) -> bool:
    """Whether bias + x @ w, w (K, N) in the given memory layout, gives a row alone (a matrix-vector product) the
    bits it gets in a product of two rows. Where it does (MKL on an AMD EPYC: rows of products of up to 3 rows are
    summed alike), a lone row needs no second row, and its products cost half."""
    w, bias, x = _operands(k, n, 4, dtype, transposed)
    pairs = torch.cat([torch.addmm(bias, x[i:i + 2], w) for i in (0, 2)])
    return all(torch.equal(torch.addmm(bias, x[i:i + 1], w)[0], pairs[i]) for i in range(4))


TILE = 4
"""Rows per tile where a BLAS sums a product's rows in tiles (see `_tile_rows`)."""


@functools.cache
def _tile_rows(k: int, n: int, dtype: torch.dtype, transposed: bool, threads: int, limit: int = 32) -> int:
    """The most rows m <= limit, a multiple of TILE, such that products of any multiple of TILE rows up to m give
    each row the bits it gets in a product of TILE rows; 0 where even two tiles change a row's bits. MKL on an AMD
    EPYC (measured) sums the rows of a product of up to 3 rows one way and those of larger products in tiles of 4,
    the same for any multiple of 4: a batch padded to whole tiles keeps each row's bits, and goes through one
    product instead of pieces of 3 rows (about twice as fast at 8 rows)."""
    w, bias, x = _operands(k, n, limit, dtype, transposed)
    tiles = torch.cat([torch.addmm(bias, x[i:i + TILE], w) for i in range(0, limit, TILE)])  # (limit, N)
    for m in range(2 * TILE, limit + 1, TILE):
        for start in (0, TILE) if m + TILE <= limit else (0,):
            if not torch.equal(torch.addmm(bias, x[start:start + m], w), tiles[start:start + m]):
                return m - TILE if m > 2 * TILE else 0
    return limit


def piece_widths(vocab: int, chunk: int) -> list[int]:
    """The widths of the pieces an output product of `vocab` columns goes in, `chunk` columns at most (the last
    piece narrower): what the row probes measure, as a vocabulary-wide measurement would take most of a second for
    GPT-2's 50k tokens."""
    return [min(vocab, chunk)] + ([vocab % chunk] if vocab > chunk and vocab % chunk else [])


@dataclass(frozen=True)
class RowPlan:
    """How a decode step's matrix products keep each row's bits whatever its batch (see `plan_rows`)."""

    transposed: tuple[bool, ...]
    """Per matrix: store it transposed ((N, K) in memory)."""
    max_rows: int
    """The most rows one product may take (0: any)."""
    tile: int
    """Above 1: every product takes a whole number of tiles of this many rows (a batch padded with spare rows)."""
    min_rows: int
    """The fewest rows a product takes (a lone row doubled where 2)."""
    invariant: bool = True


def plan_rows(shapes: Sequence[tuple[int, Sequence[int]]], dtype: torch.dtype, tiled: bool) -> RowPlan:
    """The layouts and row counts that keep a row's bits, for matrices (K, N) given as (K, [widths of the pieces the
    product goes in]). Where products of up to 8 rows or more keep them (MKL on Intel Xeons), rows go as they are,
    a lone row doubled unless a matrix-vector product keeps its bits too. Where only products of up to 3 rows do
    and whole tiles of 4 keep them too (MKL on AMD EPYC), `tiled` (batches of 4 or more) pads every batch to whole
    tiles: one product for 8 rows instead of three. Not invariant, with a warning, where neither holds."""
    threads = torch.get_num_threads()
    layouts, limits = zip(*(_row_stable_layout(k, widths, dtype) for k, widths in shapes))
    if tiled and min(limits) < 8:
        tiles = [[min(_tile_rows(k, n, dtype, t, threads) for n in widths) for t in (False, True)]
                 for k, widths in shapes]
        if min(max(pair) for pair in tiles) >= 2 * TILE:
            return RowPlan(tuple(pair[1] >= pair[0] for pair in tiles), min(max(pair) for pair in tiles), TILE, TILE)
    if min(limits) < 3:
        log.warning("this machine's BLAS rounds a row differently depending on the rows around it: output may "
                    "depend on how prompts are batched (generate.batch_invariant: false silences this)")
        return RowPlan(tuple(layouts), 0, 1, 1, invariant=False)
    lone = all(_single_row_keeps_bits(k, n, dtype, t, threads) for (k, widths), t in zip(shapes, layouts)
               for n in widths)
    return RowPlan(tuple(layouts), min(limits), 1, 1 if lone else 2)
