"""A multi-token-prediction LLaMA, written after Meta's reference `llama/model.py`.

Module names match Meta's checkpoints (`tok_embeddings`, `layers.N.attention.wq`, `extra_heads.K`,
`norm`, `output`) so that consolidated.pth loads with strict=True. Prediction head 0 is
`layers[-1]`, heads 1..n-1 are `extra_heads`; every head reads the output of the shared trunk
`layers[:-1]` and all heads share the final `norm` and `output`. No parallelism lives here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_tables(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles at `positions` ((seqlen,) or (bsz, seqlen)): (..., hd/2)."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates adjacent pairs (x[2i], x[2i+1]) as Meta's complex `freqs_cis` does.

    x: (bsz, seqlen, n_heads, head_dim); cos/sin: (seqlen, hd/2), or (bsz, seqlen, hd/2) when
    every row has its own positions.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = (
        (cos[None, :, None, :], sin[None, :, None, :])
        if cos.dim() == 2
        else (cos[:, :, None, :], sin[:, :, None, :])
    )
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    Positions are written in place, so rolling back (speculative decoding) is just calling with
    an earlier `start_pos`. `start_pos` may be a (bsz,) tensor: every row writes at its own
    position (rows that accepted different numbers of drafted tokens).
    """

    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(
        self, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, seqlen = k.shape[:2]
        end = (
            int(start_pos.max()) + seqlen
            if isinstance(start_pos, torch.Tensor)
            else start_pos + seqlen
        )
        if end > self.k.shape[1] or bsz > self.k.shape[0]:
            raise ValueError(
                f"KV cache holds batch {self.k.shape[0]} x {self.k.shape[1]} positions; "
                f"asked for batch {bsz} up to position {end}"
            )
        if isinstance(start_pos, torch.Tensor):
            rows = torch.arange(bsz, device=k.device)[:, None]
            slots = start_pos[:, None] + torch.arange(seqlen, device=k.device)
            self.k[rows, slots] = k
            self.v[rows, slots] = v
        else:
            self.k[:bsz, start_pos:end] = k
            self.v[:bsz, start_pos:end] = v
        return self.k[:bsz, :end], self.v[:bsz, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        start_pos: int | torch.Tensor = 0,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask` (bsz, 1, seqlen, kv_len) bool, True where a query may attend; default causal."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        if mask is None and isinstance(start_pos, torch.Tensor):  # every row at its own position
            queries = start_pos[:, None] + torch.arange(seqlen, device=x.device)
            mask = (torch.arange(k.shape[1], device=x.device) <= queries[..., None])[:, None]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        masking = (
            causal_mask_kwargs(seqlen, k.shape[2], x.device)
            if mask is None
            else {"attn_mask": mask}
        )
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            **masking,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


def causal_mask_kwargs(q_len: int, kv_len: int, device: torch.device) -> dict:
    """SDPA arguments for causal attention of the last q_len positions over kv_len keys."""
    if q_len == kv_len:
        return {"is_causal": True}
    if q_len == 1:
        return {}
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    return {"attn_mask": torch.arange(kv_len, device=device)[None, :] <= q_pos}


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(bsz, seqlen) position of every token within its segment (0 at each segment start)."""
    seqlen = segment_ids.shape[1]
    index = torch.arange(seqlen, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(bsz, 1, seqlen, seqlen) bool: causal, and only within the query's own segment."""
    seqlen = segment_ids.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        start_pos: int | torch.Tensor = 0,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, start_pos, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """MTP LLaMA. With n_future_tokens=1 it is a plain LLaMA."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        n_main = args.n_layers - args.n_future_tokens + 1
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(n_main))
        self.extra_heads = nn.ModuleList(
            TransformerBlock(i, args) for i in range(n_main, args.n_layers)
        )
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def n_future_tokens(self) -> int:
        return self.args.n_future_tokens

    @property
    def trunk_layers(self) -> list[TransformerBlock]:
        return list(self.layers[:-1])

    @property
    def heads(self) -> list[TransformerBlock]:
        """Prediction heads in order: head k predicts the token k+1 positions ahead."""
        return [self.layers[-1], *self.extra_heads]

    def blocks(self) -> list[TransformerBlock]:
        """Every block, trunk first then heads: the order of `new_cache()`."""
        return self.trunk_layers + self.heads

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """GPT-2 style init: N(0, std), residual projections scaled by 1/sqrt(2*n_layers)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        residual_std = std / math.sqrt(2 * self.args.n_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                    continue
                scale = residual_std if name.endswith(("wo.weight", "w2.weight")) else std
                sample = torch.randn(param.shape, generator=generator) * scale
                param.copy_(sample.to(param.dtype))

    def new_cache(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> list[KVCache]:
        """One KV cache per block, in `blocks()` order."""
        ref = self.output.weight
        return [
            KVCache(
                max_batch_size,
                max_seq_len,
                self.args.kv_heads,
                self.args.head_dim,
                dtype or ref.dtype,
                device or ref.device,
            )
            for _ in self.blocks()
        ]

    def _layout(
        self,
        start_pos: int | torch.Tensor,
        seqlen: int,
        device: torch.device,
        segment_ids: torch.Tensor | None,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """RoPE tables and attention mask: positions start_pos.. with causal attention, or, with
        `segment_ids`, positions restarting at 0 in each segment and attention inside it only."""
        if isinstance(start_pos, torch.Tensor):  # per-row positions (batched speculative decoding)
            positions = start_pos[:, None] + torch.arange(seqlen, device=device)
            return rotary_tables(positions, self.args.head_dim, self.args.rope_theta), None
        if segment_ids is None:
            positions = torch.arange(start_pos, start_pos + seqlen, device=device)
            return rotary_tables(positions, self.args.head_dim, self.args.rope_theta), None
        if start_pos != 0:
            raise ValueError("segment_ids isolate packed samples in a full forward (start_pos 0)")
        positions = segment_positions(segment_ids)
        rope = rotary_tables(positions, self.args.head_dim, self.args.rope_theta)
        return rope, segment_mask(segment_ids)

    def trunk(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: list[KVCache] | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden state after the shared trunk, (bsz, seqlen, dim).

        `segment_ids` (bsz, seqlen; the loader's, −1 on padding) keeps packed samples apart: a
        token attends only to earlier tokens of its own segment, and positions restart at 0.
        """
        h = self.tok_embeddings(tokens)
        rope, mask = self._layout(start_pos, tokens.shape[1], h.device, segment_ids)
        for i, layer in enumerate(self.trunk_layers):
            h = layer(h, rope, start_pos, cache[i] if cache else None, mask)
        return h

    def head_hidden(
        self,
        h_trunk: torch.Tensor,
        head: int,
        start_pos: int | torch.Tensor = 0,
        cache: list[KVCache] | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised hidden state of prediction head `head` (0 = next token)."""
        if not 0 <= head < self.n_future_tokens:
            raise IndexError(f"head {head} out of range: model has {self.n_future_tokens} heads")
        rope, mask = self._layout(start_pos, h_trunk.shape[1], h_trunk.device, segment_ids)
        block_cache = cache[len(self.trunk_layers) + head] if cache else None
        return self.norm(self.heads[head](h_trunk, rope, start_pos, block_cache, mask))

    def head_logits(
        self,
        h_trunk: torch.Tensor,
        head: int,
        start_pos: int | torch.Tensor = 0,
        cache: list[KVCache] | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of one head, (bsz, seqlen, vocab), in the compute dtype."""
        return self.output(self.head_hidden(h_trunk, head, start_pos, cache, segment_ids))

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int | torch.Tensor = 0,
        cache: list[KVCache] | None = None,
        n_heads: int | None = None,
        return_trunk: bool = False,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float logits of the first `n_heads` heads (all by default): (bsz, seq, n_heads, vocab).

        With `return_trunk=True` it returns the trunk's hidden state instead, for callers that
        run the heads one at a time with `head_hidden`/`head_logits` (a call of the module itself,
        so wrappers such as FSDP see the forward).
        """
        h_trunk = self.trunk(tokens, start_pos, cache, segment_ids)
        if return_trunk:
            return h_trunk
        n_heads = self.n_future_tokens if n_heads is None else n_heads
        logits = [
            self.head_logits(h_trunk, k, start_pos, cache, segment_ids) for k in range(n_heads)
        ]
        return torch.stack(logits, dim=-2).float()
