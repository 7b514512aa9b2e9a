"""The hand-written multi-token-prediction LLaMA, its tokenizer and checkpoint I/O."""

from model.args import ModelArgs
from model.tokenizer import Tokenizer
from model.transformer import KVCache, Transformer

__all__ = ["KVCache", "ModelArgs", "Tokenizer", "Transformer"]
