"""Micro models for CPU work: the shapes and initial weights of micro-mtp (an MTP LLaMA with
`MicroConfig` sizes and 4 heads) before step 5 pretrains it (`assets/micro_base.py`); micro-ref is
its next-token part (the trunk and head 0). Initialisation:
  * from the base model when its safetensors are present — every matrix is the top-left
    [:out, :in] slice of the corresponding base matrix (micro trunk block i ← base trunk block i,
    micro head k ← base head k; micro-ref's blocks ← base trunk blocks), norms sliced to
    [:dim]; an embedding/output row of micro piece p is the mean of the base rows (sliced to
    [:dim]) of the base tokenisation of p's text;
  * otherwise a seeded GPT-style random init.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.args import ModelArgs
from model.tokenizer import Tokenizer
from model.transformer import Transformer
from model.weights import load_model_dir
from runtime.config import MicroConfig


def micro_args(cfg: MicroConfig, reference: bool) -> ModelArgs:
    return ModelArgs(
        dim=cfg.dim,
        n_layers=cfg.n_layers - cfg.n_future_tokens + 1 if reference else cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        vocab_size=cfg.vocab_size,
        multiple_of=cfg.multiple_of,
        n_future_tokens=1 if reference else cfg.n_future_tokens,
        max_seq_len=2048,
    )


def _block_sources(model: Transformer, base: Transformer, reference: bool) -> dict[str, str]:
    """micro block prefix → base block prefix."""
    base_trunk = [f"layers.{i}" for i in range(len(base.trunk_layers))]
    base_heads = [
        f"layers.{len(base.layers) - 1}",
        *[f"extra_heads.{i}" for i in range(len(base.extra_heads))],
    ]
    mapping = {}
    if reference:
        for i in range(len(model.layers)):
            mapping[f"layers.{i}"] = base_trunk[i % len(base_trunk)]
        return mapping
    for i in range(len(model.trunk_layers)):
        mapping[f"layers.{i}"] = base_trunk[i % len(base_trunk)]
    micro_heads = [
        f"layers.{len(model.layers) - 1}",
        *[f"extra_heads.{i}" for i in range(len(model.extra_heads))],
    ]
    for k, name in enumerate(micro_heads):
        mapping[name] = base_heads[k % len(base_heads)]
    return mapping


def sliced_init(
    model: Transformer,
    base_state: dict,
    base_args: ModelArgs,
    tok: Tokenizer,
    base_tok: Tokenizer,
    reference: bool,
) -> None:
    with torch.device("meta"):
        base = Transformer(base_args)
    blocks = _block_sources(model, base, reference)
    dim = model.args.dim
    with torch.no_grad():
        for name, param in model.named_parameters():
            head = next((p for p in blocks if name.startswith(p + ".")), None)
            if head is not None:
                src = base_state[blocks[head] + name[len(head) :]]
                param.copy_(src[tuple(slice(0, s) for s in param.shape)].float())
            elif name == "norm.weight":
                param.copy_(base_state["norm.weight"][:dim].float())
        specials = {tok.bos_id: base_tok.bos_id, tok.eos_id: base_tok.eos_id}
        base_ids = [  # the base tokenisation of each micro piece, computed once for both matrices
            [specials[p]]
            if p in specials
            else base_tok.encode(tok.decode([p]) or tok.id_to_piece(p)) or [base_tok.bos_id]
            for p in range(tok.n_words)
        ]
        params = dict(model.named_parameters())
        for key in ("tok_embeddings.weight", "output.weight"):
            base_rows = base_state[key].float()[:, :dim]
            for piece_id, ids in enumerate(base_ids):
                params[key][piece_id] = base_rows[ids].mean(0)


def build_micro_model(
    cfg: MicroConfig,
    tok: Tokenizer,
    reference: bool,
    base_dir: Path | None,
    base_tok: Tokenizer | None,
) -> tuple[ModelArgs, dict, str]:
    """(args, fp16 state, init description)."""
    args = micro_args(cfg, reference)
    torch.manual_seed(cfg.seed + int(reference))
    model = Transformer(args)
    model.init_weights(seed=cfg.seed + int(reference))
    init = f"random (seed {cfg.seed + int(reference)})"
    if base_dir is not None and base_tok is not None:
        base_args, base_state = load_model_dir(base_dir, verify=False)
        if base_args.dim >= args.dim and base_args.hidden_dim >= args.hidden_dim:
            sliced_init(model, base_state, base_args, tok, base_tok, reference)
            init = f"sliced from {base_dir} (see assets/micro.py)"
    state = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    return args, state, init
