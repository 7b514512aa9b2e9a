"""The Rho-1 reference CE: computed by a reference forward, and the precomputed store."""

from __future__ import annotations

import pytest
import torch

from data.reference_ce import ReferenceCEStore, ReferenceCEWriter
from model import ModelArgs, Transformer
from training.reference import reference_next_token_ce


def test_reference_next_token_ce_equals_full_logits_ce():
    torch.manual_seed(0)
    ref = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=8))
    ref.init_weights(std=0.2, seed=0)
    tokens = torch.randint(0, 50, (2, 13))
    ce = reference_next_token_ce(ref, tokens, chunk_size=5)
    logits = ref(tokens)[:, :, 0]
    full = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
    ).view(2, 12)
    torch.testing.assert_close(ce[:, :-1], full, rtol=1e-5, atol=1e-5)
    assert torch.isnan(ce[:, -1]).all()


def test_reference_store_round_trip_and_data_hash_check(tmp_path):
    writer = ReferenceCEWriter(tmp_path, "abc123", reference_id="sheared-2.7b", shard_size=2)
    samples = {f"mbpp/{i}": torch.rand(5 + i) for i in range(5)}
    for sid, ce in samples.items():
        writer.add(sid, ce)
    directory = writer.close()
    assert len(list(directory.glob("ref_ce-*.safetensors"))) == 3
    store = ReferenceCEStore(tmp_path, "abc123")
    assert len(store) == 5 and store.reference_id == "sheared-2.7b"
    for sid, ce in samples.items():
        assert torch.equal(store.get(sid), ce)
    with pytest.raises(FileNotFoundError, match="no precomputed reference CE for data hash ffff"):
        ReferenceCEStore(tmp_path, "ffff")
    with pytest.raises(KeyError, match="has no precomputed reference CE"):
        store.get("mbpp/99")
