"""The lean GPT-2 path (`GPT2Forward`): a decode step over a GPT-2's own weights with a preallocated KV cache,
prefill arranged like a step, and the step itself in TorchScript (`_decode_step`)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from llmctl.core.decode.layout import TILE, _aligned, _attention_keeps_row_bits, _augmented, piece_widths, plan_rows
from llmctl.core.decode.rows import RowBatch, padded, round_up, tiled_offsets
from llmctl.core.decode.script import _scripted

# ---------------------------------------------------------------------------------------------------------------
# Forwards: prefill a left-padded batch, then one token per row per step


class GPT2Forward(RowBatch):
    """GPT-2 (`GPT2LMHeadModel`) decoding over the model's own weights with a preallocated KV cache.

    The same operations as transformers' GPT-2 with sdpa attention (addmm for its Conv1D layers, layer norms,
    scaled_dot_product_attention), minus the per-call machinery: no module calls, no per-step cache objects, the
    c_attn product written straight into the cache (out=), activations and residual additions in place, the two
    projections onto the residual stream adding their own bias (`_augmented`), the step in TorchScript. Logits may
    differ from transformers' in the last bits (the order of additions), so greedy output is token for token that
    of `model.generate` except where two logits tie within rounding (tested, and checked by the benchmark). On CPU
    it is arranged so that a row's arithmetic does not depend on the rest of its batch, which makes output
    independent of batching, bit for bit:
    - each prompt is prefilled on its own (no padding in any sum);
    - decode-step attention runs over exactly each row's own keys (rows with the same prompt length share a call);
    - decode-step matrix products always see at least 2 rows, because BLAS takes another code path (another order
      of additions) for a single row. A lone row goes through the matrix products with a copy of itself as second
      row (attention and sampling see it once);
    - which weight layout, and how many rows at most, keep every row's bits is measured on this machine, once per
      weight shape (see `_row_stable_layout`); big batches go through the products in pieces of that many rows.
      A layout is picked for speed where both keep the bits: with MKL on an AVX-512 Xeon, the transposed layout
      makes a 2-row product of the 384 x 1536 MLP weight about 15% faster than GPT-2's own, and is kept for any
      2-15 rows. (For some shapes, such as 384 x 1152 on 2 threads, the transposed layout keeps a row's bits for
      only 2-3 rows: batches would then go in pieces of 3, so it is not used there, though faster at batch 1.)
    """

    MIN_ROWS = 2
    AUGMENTED = (4, 10)
    """A block's attention and MLP output projections: multiplied with their bias as an extra row (`_augmented`)."""
    HEAD_CHUNK = 8192
    """The output projection's product goes in pieces of this many vocabulary columns, whose row-stability is
    measured (see `_plan_layouts`)."""

    @staticmethod
    def supports(model) -> bool:
        config = model.config
        return (
            type(model).__name__ == "GPT2LMHeadModel"
            and getattr(config, "model_type", None) == "gpt2"
            and not getattr(config, "add_cross_attention", False)
            and not getattr(config, "scale_attn_by_inverse_layer_idx", False)
            and not getattr(config, "reorder_and_upcast_attn", False)
            and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
            and all(_activation_name(block.mlp.act) for block in model.transformer.h)
            and not model.training
        )

    def __init__(self, model, *, batch_invariant: bool = True, batch_size: int | None = None, speculate: bool = True):
        """`batch_size`: the batch the caller will decode, at most (batches of 4 or more may go in whole tiles of
        rows: see `plan_rows`); `speculate`: keep a spare row for a lone row's guesses."""
        transformer = model.transformer
        config = model.config
        self.n_head = config.n_head
        self.width = config.n_embd
        self.head_dim = self.width // self.n_head
        self.eps = config.layer_norm_epsilon
        self.scale = transformer.h[0].attn.scaling
        self.activation = _activation_name(transformer.h[0].mlp.act)
        # The weights, detached, in aligned memory where they are not (see `_aligned`).
        self.wte = _aligned(transformer.wte.weight)
        self.wpe = _aligned(transformer.wpe.weight)
        self.ln_f = (_aligned(transformer.ln_f.weight), _aligned(transformer.ln_f.bias))
        tied = model.lm_head.weight.data_ptr() == transformer.wte.weight.data_ptr()
        self.lm_head = self.wte if tied else _aligned(model.lm_head.weight)  # (V, C)
        self.invariant = batch_invariant and self.wte.device.type == "cpu"
        blocks = [
            [b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
             b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
             b.mlp.c_proj.weight, b.mlp.c_proj.bias]
            for b in transformer.h
        ]
        head = self.lm_head.t()  # (C, V), a view
        transposed: dict[int, bool] = {}  # block matrix index -> store transposed (absent: keep the layout)
        self.max_rows, self.tile, self.min_rows = 0, 1, 1  # any number of rows in one product, as they come
        self.head_chunk = self.HEAD_CHUNK if self.invariant else head.shape[1]  # columns per output product
        if self.invariant:
            transposed, head = self._plan_layouts(blocks[0], head, (batch_size or 1) >= TILE, speculate)
        # What `_decode_step` reads: the embeddings, the final layer norm and the output projection (C, V); then per
        # block its 12 weights, in the order of `blocks` above, matrices (K, N) in either memory layout. The two
        # projections onto the residual stream come with their bias as an extra row, (K + 1, N) (see `_augmented`):
        # their inputs end in a column of ones, and the product adds the bias.
        self.weights = [self.wte, self.wpe, *self.ln_f, head]
        self.blocks = [
            [_augmented(w, _aligned(block[i + 1]), transposed.get(i, False)) if i in self.AUGMENTED
             else _aligned(w, transposed.get(i)) for i, w in enumerate(block)]
            for block in blocks
        ]
        self.n_layer = len(transformer.h)
        self.inner = self.blocks[0][8].size(1)  # the MLP's width: c_fc is (C, inner)
        # The c_attn and c_fc biases of all blocks, (L, 1, N): a step writes them into its products' outputs in two
        # ops, where addmm would copy each in after its product, with cold caches (see `_decode_step`).
        self.biases = [torch.stack([block[i] for block in self.blocks])[:, None] for i in (3, 9)]
        self.decode_step = None  # compiled at the first step, after the first token

    def _allocate(self, rows: int, columns: int) -> None:
        """The cache: per layer, the c_attn output of every token, (R, T, 3C), time-major, so that the query, key
        and value of one step are one row that addmm writes in place (out=) where every row is at the same column,
        and a row's keys are a strided view."""
        self.kv = self.wte.new_empty((self.n_layer, rows, columns, 3 * self.width))  # (L, R, T, 3C)

    def _caches(self) -> list[torch.Tensor]:
        return [self.kv]

    def _set_caches(self, caches: list[torch.Tensor]) -> None:
        (self.kv,) = caches

    def step(self, tokens: torch.Tensor, guess: int | None = None) -> torch.Tensor:
        """Logits (B, V) after feeding each row its next token, (B,). With a `guess` (a lone row, where
        `can_speculate`): logits (2, V) after the token and after the guessed token that follows it, which counts
        only once `accept` is called."""
        if self.decode_step is None:
            self.decode_step = _scripted(_decode_step)
        if self.lists is None:
            self.lists = self._pack(self.weights, self.layers, self.views, self.scratch, self.groups)
        weights, layers, views, scratch, groups = self.lists
        with torch.jit.optimized_execution(False):  # run the ops as written: no fusion, no specialisation
            row_base = self.row_base
            if guess is not None and self.rows > 2:  # the guess and spare rows written through the scratch buffer
                row_base = self.guess_base + (self.t - self.starts[0])
            logits = self.decode_step(tokens, self.start_columns, row_base, weights, layers, views, scratch,
                                      self.t, groups, self.rows, self.eps, self.scale, self.activation, self.max_rows,
                                      self.tile, self.head_chunk, -1 if guess is None else guess)
        self.t += 1
        return logits

    def _pack(self, *lists: list) -> tuple:
        """The step's list arguments as TorchScript lists where the step is scripted: a call then hands each over
        as one value rather than converting its items, about a hundred tensors (30 us a step, with the cold caches
        after the last step's matrix products)."""
        if not isinstance(self.decode_step, torch.jit.ScriptFunction):
            return lists
        return tuple(torch.jit.script(list(values)) for values in lists)

    @property
    def can_speculate(self) -> bool:
        """One row decoding, with a spare physical row whose arithmetic is what the row's own next step would be."""
        return self.invariant and len(self.starts) == 1 and self.rows >= 2

    def accept(self) -> None:
        """The guess of the last step was right: its key and value stay in the cache."""
        self.t += 1

    def _plan_layouts(self, block: list[torch.nn.Parameter], head: torch.Tensor, tiled: bool, speculate: bool
                      ) -> tuple[dict[int, bool], torch.Tensor]:
        """Each matrix's memory layout and the row counts for row-stable products (see `plan_rows`): which of a
        block's matrices to store transposed (re-laid out in place by `_aligned`: one copy) and the output
        projection (C, V) (a copy only where the embedding's own layout is not row-stable); sets max_rows, tile and
        min_rows (a lone row keeps a spare row for speculation). Turns batch invariance off, with a warning, where
        no layout keeps a row's bits."""
        indices = (2, 4, 8, 10)  # c_attn, attn c_proj, c_fc, mlp c_proj: the same shapes in every block
        shapes = [(block[i].shape[0] + (i in self.AUGMENTED), [block[i].shape[1]]) for i in indices]
        # The (V, C) embedding seen as (C, V) is already the transposed layout; the other one costs a copy. The
        # product goes in column pieces (see `_decode_step`), which are what gets measured: a vocabulary-wide
        # measurement would take most of a second for GPT-2's 50k tokens.
        (width, vocab), chunk = head.shape, self.head_chunk
        widths = piece_widths(vocab, chunk)
        plan = plan_rows([*shapes, (width, widths)], head.dtype, tiled)
        if not plan.invariant:
            self.invariant = False
            self.head_chunk = vocab
            return {}, self.lm_head.t()
        self.max_rows, self.tile = plan.max_rows, plan.tile
        self.min_rows = max(plan.min_rows, self.MIN_ROWS if speculate else 1)
        if not plan.transposed[-1]:
            head = head.contiguous()
        return dict(zip(indices, plan.transposed)), head

    def _arrange(self) -> None:
        # rows of equal length share attention calls where that keeps their bits (see `_attention_keeps_row_bits`)
        shared = not self.invariant or _attention_keeps_row_bits(self.n_head, self.head_dim, self.wte.dtype,
                                                                 torch.get_num_threads())
        self.groups = [list(run) for run in _runs(self.starts, shared)]
        self.start_columns = torch.tensor(self.starts, device=self.kv.device)  # (B,): a row's position is t - start
        # Rows at different columns (a prompt admitted into a running batch) write a step's query, key and value
        # through a scratch buffer and one index_copy per layer, at row * T + column of the cache seen as (R * T, 3C);
        # rows all at one column (a batch started together) write in place. Empty: all at one column.
        rows, columns = self.kv.size(1), self.kv.size(2)
        self.row_base = (torch.arange(rows, device=self.kv.device) * columns if len(set(self.starts)) > 1
                         else self.kv.new_empty(0, dtype=torch.long))
        # A lone row's guess step with spare rows beyond the guess's (whole tiles): the token and the guess go in
        # the row's own cache at its column and the next, each spare row in its own row.
        self.guess_base = torch.tensor([0, 1] + [r * columns for r in range(2, rows)], device=self.kv.device)
        self.lists = None  # the step's list arguments, packed at the next step (see `_pack`)
        # Per layer and group, the queries, keys and values of the group's rows as (b, H, T, D) views of the cache:
        # a step narrows them to its columns (one op each, not five).
        self.views = []
        for cache in self.kv.unbind(0):
            parts = cache.view(cache.size(0), cache.size(1), 3, self.n_head, self.head_dim).unbind(2)  # (R, T, H, D)
            self.views += [part.transpose(1, 2)[lo:end] for lo, end, _ in self.groups for part in parts]
        # A step's embeddings, MLP hidden layers and attention output, preallocated, and the views of them a step
        # uses made here once: an allocation or a view is a few microseconds of cold code after a matrix product.
        # (Layer norms allocate: their out= variant copies, and measured slower.) The inputs of the augmented
        # products end in a column of ones (see `_augmented`).
        rows, width, inner, new = self.rows, self.width, self.inner, self.wte.new_zeros
        hidden, attended = self._with_ones(self.n_layer, rows, inner), self._with_ones(rows, width)
        heads = attended[:, :width].view(rows, self.n_head, 1, self.head_dim)  # as attention returns it
        self.scratch = [hidden[..., :inner], new(rows, width), new(rows, width), attended, heads, *self.biases,
                        self.kv, new(self.n_layer, rows, 3 * width)]
        # Per block: ln_1, c_attn, attn c_proj (augmented), ln_2, c_fc, mlp c_proj (augmented); its hidden layer
        # with and without the ones.
        self.layers = [[w[0], w[1], w[2], w[4], w[6], w[7], w[8], w[10], h, h[:, :inner]]
                       for w, h in zip(self.blocks, hidden.unbind(0))]

    def _with_ones(self, *shape: int) -> torch.Tensor:
        """An input buffer for an augmented product (see `_augmented`): `shape` with one more last column, of ones.
        Its rows start on 64-byte boundaries (padded): where a row of a product's output or input started elsewhere,
        MKL rounded two equal rows of one product differently (AMD EPYC, measured), and a row's bits then depended
        on its place in the batch."""
        width = shape[-1] + 1
        padded = -(-width * self.wte.element_size() // 64) * 64 // self.wte.element_size()
        buffer = self.wte.new_zeros((*shape[:-1], padded))[..., :width]
        buffer[..., -1] = 1
        return buffer

    def _pass(self, prompts: list[tuple[int, torch.Tensor]], max_rows: int) -> torch.Tensor:
        """Prompts, (row, ids (P,)) each, through the blocks in one pass, filling their rows' first P cache columns
        (see `RowBatch._prefill`): the arrangement of a decode step (the projections onto x augmented and in place,
        the activation on a strided view), products in pieces of at most `max_rows` rows (0: all at once), each
        prompt's rows starting a tile and padded to whole tiles, attention per prompt. Logits (n, V)."""
        width, inner, heads, eps, tile = self.width, self.inner, self.n_head, self.eps, self.tile
        offsets, total = tiled_offsets(prompts, tile)
        x = self.wte.new_zeros((total, width))  # (M, C): padding rows stay finite (zeros in, biases out)
        for (_, ids), at in zip(prompts, offsets):
            x[at:at + ids.size(0)] = F.embedding(ids, self.wte) + self.wpe[:ids.size(0)]
        attended, hidden = self._with_ones(total, width), self._with_ones(total, inner)
        qkv = self.wte.new_zeros((total, 3 * width))
        for block, cache in zip(self.blocks, self.kv.unbind(0)):
            ln1_w, ln1_b, qkv_w, qkv_b, proj_w, _, ln2_w, ln2_b, fc_w, fc_b, out_w, _ = block
            _linear(qkv_b, torch.layer_norm(x, (width,), ln1_w, ln1_b, eps), qkv_w, max_rows, tile, qkv)
            for (row, ids), at in zip(prompts, offsets):
                length = ids.size(0)
                mine = qkv[at:at + length]  # (P, 3C)
                cache[row, :length] = mine
                q, k, v = mine.view(1, length, 3, heads, self.head_dim).transpose(1, 3).unbind(2)  # (1, H, P, D)
                a = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, scale=self.scale)
                attended[at:at + length, :width].view(1, length, heads, self.head_dim).copy_(a.transpose(1, 2))
            _linear(x, attended, proj_w, max_rows, tile, x)
            h = hidden[:, :inner]
            _linear(fc_b, torch.layer_norm(x, (width,), ln2_w, ln2_b, eps), fc_w, max_rows, tile, h)
            _activate(h, self.activation)
            _linear(x, hidden, out_w, max_rows, tile, x)
        last = torch.stack([x[at + ids.size(0) - 1] for (_, ids), at in zip(prompts, offsets)])  # (n, C)
        last = torch.layer_norm(padded(last, round_up(last.size(0), tile)), (width,), *self.ln_f, eps)
        head = self.weights[4]  # (C, V), as the step multiplies by it, in the same column pieces
        logits = torch.cat([_linear(None, last, head[:, j:j + self.head_chunk], max_rows, tile, None)
                            for j in range(0, head.size(1), self.head_chunk)], 1)
        return logits[:len(prompts)].float()


# The decode step, in TorchScript's subset of Python: run by its interpreter, its ~100 small ops cost about 10% less
# than from Python (measured at batch 1), and they are the same ops, so the same bits. Where TorchScript is missing
# (it is deprecated), the same functions run as plain Python.


def _decode_step(tokens: torch.Tensor, starts: torch.Tensor, row_base: torch.Tensor, weights: list[torch.Tensor],
                 layers: list[list[torch.Tensor]], views: list[torch.Tensor], scratch: list[torch.Tensor], t: int,
                 groups: list[list[int]], rows: int, eps: float, scale: float, activation: str, max_rows: int,
                 tile: int, head_chunk: int, guess: int) -> torch.Tensor:
    """Logits (B, V) of B rows after their next tokens (B,), each row at position t minus its start (`starts`,
    (B,)), which is also the cache column its token goes in (a row's tokens start at column 0). Matrix products see
    R >= B rows (a lone row doubled); each block writes the new tokens' query, key and value into its cache: in
    place where all rows are at one column (`row_base` empty), else through a scratch buffer at row_base + column
    of the cache seen as (R * T, 3C). `weights`: the embeddings, the final layer norm and the output projection
    (C, V); `layers`: per block its weights and hidden-layer views (see GPT2Forward._arrange). `groups`: [first
    row, end row, start] of the rows that share attention calls; `views`: their query, key and value parts of the
    cache as (b, H, T, D), three per group and layer. `scratch`: the MLP hidden layers without their column of ones
    (L, R, inner); x and position embeddings (R, C); attention output (R, C + 1) with a last column of ones, and the
    rest of it as (R, H, 1, D); the c_attn and c_fc biases (L, 1, N); the caches as one tensor (L, R, T, 3C); the
    scratch for c_attn outputs (L, R, 3C). The output projection goes in pieces of `head_chunk` vocabulary columns.
    With guess >= 0 (one row, R = 2): the spare row takes `guess` as the token after the row's next one, at the
    next column and position, and both rows' logits come back, (2, V). Each row's arithmetic is then what its own
    step would be: the same matrix-product rows, the same attention calls over the same keys."""
    hidden, x, embedded, attended, heads, qkv_bias, fc_bias, kv, fresh = scratch
    speculate = guess >= 0
    if speculate:
        tokens = torch.cat([tokens, tokens.new_full([1], guess)])
    batch = tokens.size(0)
    # spare rows (a lone row doubled, a batch padded to whole tiles) repeat the last row
    torch.index_select(weights[0], 0, tokens if rows == batch else padded(tokens, rows), out=x)  # (R, C)
    scattered = row_base.numel() > 0
    column = t - groups[0][2]  # the first row's column (every row's, where not scattered)
    if len(groups) == 1:  # one position for all rows (two in a row for a guess): a view of the table
        if speculate:
            x.narrow(0, 0, 2).add_(weights[1].narrow(0, column, 2))
        else:
            x += weights[1].narrow(0, column, 1)
        flat = row_base
    else:
        positions = t - starts
        if rows > batch:
            positions = padded(positions, rows)
        x += torch.index_select(weights[1], 0, positions, out=embedded)
        flat = row_base + positions if scattered else row_base
    width = x.size(1)
    # [group, first key column, query column] of each attention call
    calls = [[0, 0, column], [0, 0, column + 1]] if speculate else [[g, 0, t - groups[g][2]]
                                                                   for g in range(len(groups))]
    # where c_attn writes this step, (L, R, 3C)
    slots = fresh if scattered else kv[:, 0].narrow(1, column, 2) if speculate else kv.select(2, column)
    # The biases of every block's c_attn and c_fc products, in place in their outputs up front: the products then
    # add onto them (addmm with beta 1, as addmm does after copying a bias in), and no copy runs after a product.
    slots.copy_(qkv_bias)
    hidden.copy_(fc_bias)
    for layer in range(len(layers)):
        w = layers[layer]
        qkv = slots[layer]  # (R, 3C)
        _linear(qkv, torch.layer_norm(x, [width], w[0], w[1], eps), w[2], max_rows, tile, qkv)
        if scattered:
            kv[layer].view(-1, qkv.size(1)).index_copy_(0, flat, qkv)
        parts: list[torch.Tensor] = []
        for call in calls:
            at, length = 3 * (layer * len(groups) + call[0]), call[2] + 1 - call[1]
            q = views[at].narrow(2, call[2], 1)  # (b, H, 1, D)
            k = views[at + 1].narrow(2, call[1], length)  # (b, H, L, D)
            v = views[at + 2].narrow(2, call[1], length)
            parts.append(F.scaled_dot_product_attention(q, k, v, scale=scale))
        # (B, H, 1, D); spare rows keep what they hold (their results are dropped)
        heads.narrow(0, 0, batch).copy_(parts[0] if len(parts) == 1 else torch.cat(parts))
        # Residual additions: the products land on x directly (addmm onto itself) and add their bias themselves
        # (augmented: the input's column of ones times the bias row), so that no op runs between a matrix product
        # and the next layer norm, where ops run with cold caches.
        _linear(x, attended, w[3], max_rows, tile, x)
        h = w[9]  # (R, inner)
        _linear(h, torch.layer_norm(x, [width], w[4], w[5], eps), w[6], max_rows, tile, h)
        # In place on a strided view (rows of inner + 1): ATen's elementwise kernels then take their 2-D path for
        # every R >= 2, the same bits for a row whatever its batch (a contiguous tensor takes a 1-D path with other
        # bits), and for the GELU that path measured twice as fast.
        _activate(h, activation)
        _linear(x, w[8], w[7], max_rows, tile, x)
    x = torch.layer_norm(x, [width], weights[2], weights[3], eps)
    head = weights[4]  # (C, V)
    if head_chunk >= head.size(1):
        logits = _linear(None, x, head, max_rows, tile, None)  # (R, V)
    else:
        logits = torch.cat([_linear(None, x, head[:, j:j + head_chunk], max_rows, tile, None)
                            for j in range(0, head.size(1), head_chunk)], 1)
    return logits[:batch].float()


def _linear(bias: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, max_rows: int, tile: int,
            out: torch.Tensor | None) -> torch.Tensor:
    """bias + x @ weight, (M, K) @ (K, N), into `out` if given; in pieces of at most max_rows rows (0: no limit):
    whole tiles of rows where tile > 1 (M is then a whole number of tiles), else none of them a single row when
    M > max_rows. `bias` is (N,) or, to accumulate onto it, (M, N)."""
    if max_rows == 0 or x.size(0) <= max_rows:
        return _addmm(bias, x, weight, out)
    if tile > 1:
        pieces = x.split(max_rows)  # max_rows is whole tiles, and so is the rest
    else:
        pieces = x.tensor_split((x.size(0) + max_rows - 1) // max_rows)  # sizes differ by one at most
    results: list[torch.Tensor] = []
    start = 0
    for piece in pieces:
        end = start + piece.size(0)
        piece_bias, piece_out = bias, out
        if out is not None:
            piece_out = out[start:end]
        if bias is not None and bias.dim() == 2:
            # onto the output itself: the same piece, so that addmm sees one tensor and copies nothing
            piece_bias = piece_out if bias is out else bias[start:end]
        results.append(_addmm(piece_bias, piece, weight, piece_out))
        start = end
    return torch.cat(results) if out is None else out


def _addmm(bias: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return torch.mm(x, weight) if out is None else torch.mm(x, weight, out=out)
    return torch.addmm(bias, x, weight) if out is None else torch.addmm(bias, x, weight, out=out)


def _activate(h: torch.Tensor, name: str) -> torch.Tensor:
    """GPT-2's MLP activation of h, in place: the same ops as transformers' (see `_activation_name`)."""
    if name == "gelu_new":  # NewGELUActivation, op for op: (0.5 * h) * (1 + tanh(...))
        gate = 1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0)))
        return h.mul_(0.5).mul_(gate)
    return torch.ops.aten.gelu_(h, approximate=name)  # the same kernel as F.gelu, the same bits


def _activation_name(act) -> str | None:
    """`none` (exact GELU), `tanh` (torch's tanh GELU) or `gelu_new` (transformers' formula) for the activation
    modules `_activate` reproduces exactly; None for any other."""
    from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation

    inner = getattr(act, "act", None)
    if type(act) is GELUActivation and inner is F.gelu:
        return "none"
    if (type(act) is GELUTanh and isinstance(inner, functools.partial) and inner.func is F.gelu
            and not inner.args and inner.keywords == {"approximate": "tanh"}):
        return "tanh"
    if type(act) is NewGELUActivation:
        return "gelu_new"
    return None


def _runs(starts: list[int], shared: bool = True) -> list[tuple[int, int, int]]:
    """(first row, end row, start) for each run of consecutive rows with the same start column (each row on its own
    where not `shared`)."""
    runs, lo = [], 0
    for i in range(1, len(starts) + 1):
        if i == len(starts) or not shared or starts[i] != starts[lo]:
            runs.append((lo, i, starts[lo]))
            lo = i
    return runs
