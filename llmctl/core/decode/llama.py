"""The lean Llama-family path (`LlamaForward`): RMSNorm, rotary positions, SwiGLU and grouped-query attention over
the model's own weights, with a preallocated KV cache, fused projections and the row-by-row arrangement of the
GPT-2 path (rows prefilled alone, matrix products in row-stable pieces, a lone row doubled), so that continuous
batching gives every completion the bits of a batch of its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmctl.core.decode.gpt2 import _linear, _runs
from llmctl.core.decode.layout import TILE, _attention_keeps_row_bits, piece_widths, plan_rows
from llmctl.core.decode.rows import RowBatch, padded, round_up, tiled_offsets


class LlamaForward(RowBatch):
    """`LlamaForCausalLM` decoding without the per-call machinery of transformers' forward (module calls, mask
    building, cache objects, output classes: about half a small model's step).

    The same operations as transformers' Llama with sdpa attention, but for three things that can move a logit in its
    last bits (so greedy output is token for token that of `model.generate` except where two logits tie within
    rounding: tested): the query, key and value projections are one matrix product, and so are the gate and up
    projections (the weights are stored fused once; the model's parameters become views of them, so there is one
    copy); RMSNorm is torch's fused `rms_norm`; attention shares the key/value heads through SDPA's `enable_gqa`.

    Batch invariance on CPU as in GPT2Forward: each prompt prefilled on its own, attention over exactly a row's own
    keys, matrix products of at least two rows in pieces whose row-stability is measured, elementwise activations on
    strided views (ATen's 2-D loop: the same bits for a row wherever it sits)."""

    MIN_ROWS = 2
    HEAD_CHUNK = 8192

    @staticmethod
    def supports(model) -> bool:
        config = model.config
        return (
            type(model).__name__ == "LlamaForCausalLM"
            and getattr(config, "model_type", None) == "llama"
            and getattr(config, "hidden_act", None) == "silu"
            and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False)
            and getattr(config, "pretraining_tp", 1) == 1
            and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
            and not model.training
        )

    def __init__(self, model, *, batch_invariant: bool = True, batch_size: int | None = None):
        config, inner = model.config, model.model
        self.n_head, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_head
        self.width = config.hidden_size
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.rotary = inner.rotary_emb
        self.embed = inner.embed_tokens.weight.detach()  # (V, C)
        self.norm = inner.norm.weight.detach()
        head = model.lm_head.weight.detach().t()  # (C, V), a view
        self.invariant = batch_invariant and self.embed.device.type == "cpu"
        self.q_out, self.kv_out = self.n_head * self.head_dim, self.n_kv * self.head_dim
        layers = inner.layers
        self.inner = layers[0].mlp.gate_proj.weight.shape[0]
        shapes = {"qkv": (self.width, self.q_out + 2 * self.kv_out), "o": (self.q_out, self.width),
                  "gate_up": (self.width, 2 * self.inner), "down": (self.inner, self.width)}
        transposed = {name: True for name in shapes}  # nn.Linear's own layout: (K, N) stored as (N, K)
        self.max_rows, self.tile, self.min_rows, self.head_chunk = 0, 1, 1, head.shape[1]
        if self.invariant:
            vocab, chunk = head.shape[1], self.HEAD_CHUNK
            widths = piece_widths(vocab, chunk)
            plan = plan_rows([(k, [n]) for k, n in shapes.values()] + [(self.width, widths)], self.embed.dtype,
                             (batch_size or 1) >= TILE)
            if plan.invariant:
                transposed = dict(zip(shapes, plan.transposed))
                self.max_rows, self.tile, self.min_rows = plan.max_rows, plan.tile, plan.min_rows
                self.head_chunk = chunk
                if not plan.transposed[-1]:
                    head = head.contiguous()
            else:
                self.invariant = False
        self.head = head
        self.layers = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight.detach(),
                _fused([attn.q_proj, attn.k_proj, attn.v_proj], transposed["qkv"]),
                _fused([attn.o_proj], transposed["o"]),
                layer.post_attention_layernorm.weight.detach(),
                _fused([mlp.gate_proj, mlp.up_proj], transposed["gate_up"]),
                _fused([mlp.down_proj], transposed["down"]),
            ))
        self.n_layer = len(self.layers)
        self.cos = self.sin = None  # (T, D) tables of the rotary embedding, made for as many columns as the cache

    # -----------------------------------------------------------------------------------------------------------
    # The batch

    def _caches(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def _set_caches(self, caches: list[torch.Tensor]) -> None:
        self.k, self.v = caches

    can_speculate = False

    def _allocate(self, rows: int, columns: int) -> None:
        """The key and value caches, (L, R, T, KV * D) each, and rotary tables for T positions."""
        self.k = self.embed.new_empty((self.n_layer, rows, columns, self.kv_out))
        self.v = torch.empty_like(self.k)
        if self.cos is None or self.cos.size(0) < columns:
            positions = torch.arange(columns, device=self.embed.device)[None]
            cos, sin = self.rotary(self.embed[:1][None], positions)  # (1, T, D): the model's own rotary module
            self.cos, self.sin = cos[0], sin[0]

    def _arrange(self) -> None:
        shared = not self.invariant or _attention_keeps_row_bits(self.n_head, self.head_dim, self.embed.dtype,
                                                                 torch.get_num_threads(), self.n_kv)
        self.groups = _runs(self.starts, shared)
        self.start_columns = torch.tensor(self.starts, device=self.k.device)
        self.row_base = torch.arange(self.k.size(1), device=self.k.device) * self.k.size(2)  # (R,)
        # per layer, the cached keys and values as (R, KV, T, D) views
        rows, columns = self.k.size(1), self.k.size(2)
        self.k_views = [k.view(rows, columns, self.n_kv, self.head_dim).transpose(1, 2) for k in self.k.unbind(0)]
        self.v_views = [v.view(rows, columns, self.n_kv, self.head_dim).transpose(1, 2) for v in self.v.unbind(0)]

    # -----------------------------------------------------------------------------------------------------------
    # Forward passes

    def step(self, tokens: torch.Tensor, guess: int | None = None) -> torch.Tensor:
        """Logits (B, V) after feeding each row its next token, (B,)."""
        batch, rows, t = tokens.size(0), self.rows, self.t
        positions = t - self.start_columns  # (B,): each row's position, and the cache column its token goes in
        if rows > batch:  # spare rows (a lone row doubled, a batch padded to whole tiles) repeat the last row
            tokens, positions = padded(tokens, rows), padded(positions, rows)
        x = F.embedding(tokens, self.embed)  # (R, C)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (R, 1, D)
        flat = self.row_base[:rows] + positions  # where each row's key and value go in the caches seen as (R * T, N)
        calls = [(lo, hi, t - start) for lo, hi, start in self.groups]  # rows and query column of each attention call
        rows_max, tile = self.max_rows, self.tile
        for layer, (ln1, qkv_w, o_w, ln2, gate_up_w, down_w) in enumerate(self.layers):
            qkv = _linear(None, torch.rms_norm(x, [self.width], ln1, self.eps), qkv_w, rows_max, tile, None)
            q, k, v = qkv.split([self.q_out, self.kv_out, self.kv_out], 1)
            q = _rotate(q.view(rows, self.n_head, self.head_dim), cos, sin)  # (R, H, D)
            k = _rotate(k.view(rows, self.n_kv, self.head_dim), cos, sin)  # (R, KV, D)
            self.k[layer].view(-1, self.kv_out).index_copy_(0, flat, k.view(rows, self.kv_out))
            self.v[layer].view(-1, self.kv_out).index_copy_(0, flat, v)
            keys, values = self.k_views[layer], self.v_views[layer]
            parts = [
                F.scaled_dot_product_attention(q[lo:hi, :, None], keys[lo:hi, :, :column + 1],
                                               values[lo:hi, :, :column + 1], scale=self.scale,
                                               enable_gqa=self.n_kv != self.n_head)
                for lo, hi, column in calls
            ]  # (b, H, 1, D) each
            attended = parts[0] if len(parts) == 1 else torch.cat(parts)
            attended = attended.reshape(-1, self.q_out)  # (B, H * D)
            if rows > batch:
                attended = padded(attended, rows)  # (R, H * D)
            x = _linear(x, attended, o_w, rows_max, tile, None)  # the residual added by the product (addmm)
            gate_up = _linear(None, torch.rms_norm(x, [self.width], ln2, self.eps), gate_up_w, rows_max, tile, None)
            gate, up = gate_up.split([self.inner, self.inner], 1)  # strided views: ATen's 2-D elementwise loop
            x = _linear(x, F.silu(gate) * up, down_w, rows_max, tile, None)
        self.t += 1
        return self._logits(x)[:batch]

    def _pass(self, prompts: list[tuple[int, torch.Tensor]], max_rows: int) -> torch.Tensor:
        """Prompts, (row, ids (P,)) each, through the blocks in one pass, filling their rows' first P cache columns
        (see `RowBatch._prefill`): products in pieces of at most `max_rows` rows (0: all at once), each prompt's
        rows starting a tile and padded to whole tiles, attention per prompt. Logits (n, V)."""
        tile, width = self.tile, self.width
        offsets, total = tiled_offsets(prompts, tile)
        x = self.embed.new_zeros((total, width))  # (M, C)
        for (_, ids), at in zip(prompts, offsets):
            x[at:at + ids.size(0)] = F.embedding(ids, self.embed)
        for layer, (ln1, qkv_w, o_w, ln2, gate_up_w, down_w) in enumerate(self.layers):
            qkv = _linear(None, torch.rms_norm(x, [width], ln1, self.eps), qkv_w, max_rows, tile, None)  # (M, N)
            attended = x.new_zeros((total, self.q_out))
            for (row, ids), at in zip(prompts, offsets):
                length = ids.size(0)
                cos, sin = self.cos[:length, None], self.sin[:length, None]  # (P, 1, D)
                q, k, v = qkv[at:at + length].split([self.q_out, self.kv_out, self.kv_out], 1)
                q = _rotate(q.view(length, self.n_head, self.head_dim), cos, sin)  # (P, H, D)
                k = _rotate(k.view(length, self.n_kv, self.head_dim), cos, sin)  # (P, KV, D)
                self.k[layer, row, :length] = k.view(length, self.kv_out)
                self.v[layer, row, :length] = v
                keys = self.k[layer, row, :length].view(length, self.n_kv, self.head_dim).transpose(0, 1)[None]
                values = self.v[layer, row, :length].view(length, self.n_kv, self.head_dim).transpose(0, 1)[None]
                a = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, is_causal=length > 1,
                                                   scale=self.scale, enable_gqa=self.n_kv != self.n_head)
                attended[at:at + length] = a[0].transpose(0, 1).reshape(length, self.q_out)
            x = _linear(x, attended, o_w, max_rows, tile, None)
            gate_up = _linear(None, torch.rms_norm(x, [width], ln2, self.eps), gate_up_w, max_rows, tile, None)
            gate, up = gate_up.split([self.inner, self.inner], 1)
            x = _linear(x, F.silu(gate) * up, down_w, max_rows, tile, None)
        last = torch.stack([x[at + ids.size(0) - 1] for (_, ids), at in zip(prompts, offsets)])  # (n, C)
        return self._logits(padded(last, round_up(last.size(0), tile)))[:len(prompts)]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float logits (R, V) of the final hidden states (R, C); the output product in measured column pieces."""
        x = torch.rms_norm(x, [self.width], self.norm, self.eps)
        vocab = self.head.size(1)
        if self.head_chunk >= vocab:
            return _linear(None, x, self.head, self.max_rows, self.tile, None).float()
        return torch.cat([_linear(None, x, self.head[:, j:j + self.head_chunk], self.max_rows, self.tile, None)
                          for j in range(0, vocab, self.head_chunk)], 1).float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x (N, heads, D), as transformers' apply_rotary_pos_emb: x cos + rotate_half(x)
    sin, op for op."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def _fused(linears: list[torch.nn.Linear], transposed: bool) -> torch.Tensor:
    """The (K, N) matrix of `linears` side by side (their weights are (N_i, K)), stored once in the given memory
    layout ((N, K) for transposed); each module's weight becomes a view of it, so the model keeps working on one copy
    of the weights."""
    weights = [linear.weight.detach() for linear in linears]
    k, n = weights[0].shape[1], sum(w.shape[0] for w in weights)
    strides = (1, k) if transposed else (n, 1)
    full = torch.empty_strided((k, n), strides, dtype=weights[0].dtype, device=weights[0].device)
    with torch.no_grad():
        start = 0
        for linear, weight in zip(linears, weights):
            end = start + weight.shape[0]
            full[:, start:end] = weight.t()
            linear.weight.data = full[:, start:end].t()
            start = end
    return full
