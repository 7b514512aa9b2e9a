"""The training loader: per-head labels, prompt masking, packing, determinism, resume, cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.loader import IGNORE_INDEX, TOKEN_CLASSES, Batch, LoaderConfig, TrainLoader, head_labels
from data.prepare import prepare
from data.process import ProcessConfig
from data.tokenized import load_tokenized
from model import Tokenizer


@pytest.fixture(scope="module")
def tok(llama2_tokenizer_path):
    return Tokenizer(llama2_tokenizer_path)


@pytest.fixture(scope="module")
def mbpp_train(tmp_path_factory, mbpp_path, llama2_tokenizer_path, tok):
    out = tmp_path_factory.mktemp("mbpp")
    prepare("mbpp", mbpp_path, out, llama2_tokenizer_path, ProcessConfig())
    cache = tmp_path_factory.mktemp("cache")
    return (
        out / "processed" / "train.jsonl",
        load_tokenized(out / "processed" / "train.jsonl", tok, cache),
        cache,
    )


def test_head_labels_exact():
    sample = np.array([1, 10, 11, 20, 21, 2])
    X = IGNORE_INDEX
    assert head_labels(sample, prompt_len=3, n_heads=3).tolist() == [
        [X, X, 20],
        [X, 20, 21],
        [20, 21, 2],
        [21, 2, X],
        [2, X, X],
        [X, X, X],
    ]


def test_packed_batches_target_only_same_sample_response_tokens(mbpp_train, tok):
    _, data, _ = mbpp_train
    cfg = LoaderConfig(seq_len=512, batch_size=4, n_heads=4, pad_id=tok.pad_id)
    loader = TrainLoader(data, cfg)
    by_id = {sid: i for i, sid in enumerate(data.sample_ids)}
    packed_rows = 0
    for _ in range(5):
        batch = loader.next_batch()
        assert batch.tokens.shape == (4, 512) and batch.labels.shape == (4, 512, 4)
        for b in range(4):
            packed_rows += len(batch.sample_ids[b]) >= 2
            tokens, seg = batch.tokens[b], batch.segment_ids[b]
            for k in range(4):
                lab = batch.labels[b, :, k]
                pos = (lab != IGNORE_INDEX).nonzero().flatten()
                assert (pos + k + 1 < 512).all()
                assert torch.equal(lab[pos], tokens[pos + k + 1])
                assert torch.equal(seg[pos], seg[pos + k + 1])  # never across samples
            for s, sid in enumerate(batch.sample_ids[b]):  # prompts never targeted
                start = (seg == s).nonzero()[0].item()
                prompt_len = int(data.prompt_lens[by_id[sid]])
                head0 = batch.labels[b, start : start + prompt_len - 1, 0]
                assert (head0 == IGNORE_INDEX).all()
                assert batch.labels[b, start + prompt_len - 1, 0] != IGNORE_INDEX
        assert batch.valid.any()
    assert packed_rows >= 10  # most 512-token rows hold two or more MBPP samples


def test_padded_mode_one_sample_per_row(mbpp_train, tok):
    _, data, _ = mbpp_train
    loader = TrainLoader(
        data, LoaderConfig(seq_len=2048, batch_size=3, pack=False, pad_id=tok.pad_id)
    )
    batch = loader.next_batch()
    assert all(len(ids) == 1 for ids in batch.sample_ids)
    assert batch.tokens.shape[1] == int((batch.segment_ids >= 0).sum(1).max())
    assert (batch.tokens[batch.segment_ids < 0] == tok.pad_id).all()


def test_order_is_deterministic_and_resume_continues_exactly(mbpp_train):
    _, data, _ = mbpp_train
    cfg = LoaderConfig(seq_len=256, batch_size=4)
    full = TrainLoader(data, cfg)
    reference = [full.next_batch() for _ in range(120)]  # crosses an epoch boundary
    assert full.state_dict()["epoch"] >= 1
    first = TrainLoader(data, cfg)
    for _ in range(23):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = TrainLoader(data, cfg)
    resumed.load_state_dict(state)
    for expected in reference[23:]:
        got = resumed.next_batch()
        assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.labels, expected.labels)
        assert got.sample_ids == expected.sample_ids
    other = TrainLoader(data, LoaderConfig(seq_len=256, batch_size=2, seed=1)).next_batch()
    assert other.sample_ids != reference[0].sample_ids
    with pytest.raises(ValueError, match="saved with seed 42"):
        TrainLoader(data, LoaderConfig(seq_len=256, batch_size=2, seed=1)).load_state_dict(state)


def test_ranks_split_the_global_batch(mbpp_train):
    _, data, _ = mbpp_train
    single = TrainLoader(data, LoaderConfig(seq_len=256, batch_size=4))
    ranks = [
        TrainLoader(data, LoaderConfig(seq_len=256, batch_size=2), rank=r, world_size=2)
        for r in (0, 1)
    ]
    for _ in range(3):
        whole = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p.tokens for p in parts]), whole.tokens)
        assert parts[0].sample_ids + parts[1].sample_ids == whole.sample_ids


def test_tokenized_cache_hits_and_keys_on_settings(mbpp_train, tok):
    split_path, data, cache = mbpp_train
    files = list((cache / "tokenized").glob("train-*.safetensors"))
    assert len(files) == 1
    again = load_tokenized(split_path, tok, cache)
    assert again.key == data.key and np.array_equal(again.tokens, data.tokens)
    assert again.sample_ids == data.sample_ids
    manifest_path = split_path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["seed"] = 7  # a different split seed → a different cache entry
    original = manifest_path.read_text()
    try:
        manifest_path.write_text(json.dumps(manifest))
        assert load_tokenized(split_path, tok, cache).key != data.key
        assert len(list((cache / "tokenized").glob("train-*.safetensors"))) == 2
    finally:
        manifest_path.write_text(original)
    sample = data.sample(0)
    assert sample[0] == tok.bos_id and sample[-1] == tok.eos_id


def test_batches_carry_host_counts_target_positions_and_token_classes(mbpp_train, tok):
    _, data, _ = mbpp_train
    cfg = LoaderConfig(seq_len=512, batch_size=3, n_heads=4, pad_id=tok.pad_id,
                       eos_id=tok.eos_id, layout_ids=tok.layout_ids())  # fmt: skip
    batch = TrainLoader(data, cfg).next_batch()
    valid = batch.valid
    for k in range(4):  # the same positions the labels say, counted on the host
        flat = (batch.labels[..., k] != IGNORE_INDEX).flatten().nonzero().squeeze(1)
        assert torch.equal(batch.targets[k], flat) and batch.n_targets[k] == len(flat)
    assert batch.n_tokens == int((batch.segment_ids >= 0).sum())
    classes = batch.target_class
    assert classes.shape == batch.labels.shape and (classes[~valid] == 0).all()
    target = batch.labels.clamp(min=0)
    eos = classes == TOKEN_CLASSES.index("eos")
    assert torch.equal(eos, valid & (target == tok.eos_id))  # every target EOS, nothing else
    first = classes[..., 0] == TOKEN_CLASSES.index("first")
    n_samples = sum(len(ids) for ids in batch.sample_ids)
    assert int(first.sum()) == n_samples  # head 0 targets each response's first token once
    layout = classes == TOKEN_CLASSES.index("layout")
    pieces = {tok.id_to_piece(int(i)) for i in target[layout].unique()}
    text = {chr(int(p[3:5], 16)) if p.startswith("<0x") else p.replace("▁", " ") for p in pieces}
    assert pieces and all(not t.strip() for t in text), pieces  # whitespace only
    assert "<0x0A>" in pieces or "\n" in pieces  # newlines are layout


def test_a_hand_built_batch_finds_its_own_targets():
    labels = torch.full((1, 6, 2), IGNORE_INDEX)
    labels[0, 2:5, 0] = 7
    labels[0, 3, 1] = 8
    batch = Batch(torch.zeros(1, 6, dtype=torch.long), labels, torch.zeros(1, 6, dtype=torch.long),
                  torch.ones(1, 6, dtype=torch.bool), [["x"]])  # fmt: skip
    assert batch.targets[0].tolist() == [2, 3, 4] and batch.targets[1].tolist() == [3]
    assert batch.n_targets == (3, 1) and batch.n_tokens == 6
