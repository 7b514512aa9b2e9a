"""One optimizer step as `train_wmtp.train_step` runs it: no host synchronisation inside it for
any algorithm, and a weighting algorithm defined here alone trains end to end through the
registry."""

from __future__ import annotations

import contextlib
from typing import ClassVar

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from runtime.config import load_env_config
from tests.micro_assets import history, write_recipe
from train_wmtp import main as train_main
from train_wmtp import train_step
from training.distributed import DistInfo
from training.recipe import load_recipe
from training.run import build_run
from training.step import clip_gradients
from weighting import WEIGHTERS, WeightingConfig, WeightingInputs, normalize_per_head, register

aten = torch.ops.aten
SYNCING = {  # ops whose result a host must wait for on a GPU
    aten._local_scalar_dense.default,  # .item(), float(t), bool(t), int(t)
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,  # data-dependent output shapes
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}


class HostSync(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Raises on every op that reads a tensor's value on the host or sizes its output by it
    (boolean indexing included). `.tolist()` and `.numpy()` do not dispatch on a CPU tensor,
    so they are refused separately (`no_host_reads`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            raise HostSync(f"host sync: {func}")
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                raise HostSync(f"host sync: boolean indexing via {func}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads():
    def refuse(self, *args, **kwargs):
        raise HostSync("host sync: tolist()/numpy() of a tensor")

    saved = torch.Tensor.tolist, torch.Tensor.numpy
    torch.Tensor.tolist, torch.Tensor.numpy = refuse, refuse
    try:
        with NoHostSync():
            yield
    finally:
        torch.Tensor.tolist, torch.Tensor.numpy = saved


def test_the_guard_itself_catches_every_kind_of_sync():
    x = torch.randn(8)
    for sync in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: x[x > 0],
                 lambda: x.nonzero(), lambda: x.tolist(), lambda: float(x.max())):  # fmt: skip
        with pytest.raises(HostSync), no_host_reads():
            sync()
    with no_host_reads():
        torch.where(x > 0, x, 0).sum()  # masked arithmetic is fine


VARIANTS = {
    "baseline": {"algo": "baseline"},
    "rho1-soft-token": {"algo": "rho1-wmtp"},
    "rho1-soft-head": {"algo": "rho1-wmtp", "rho1": {"score": "head"}},
    "rho1-select": {"algo": "rho1-wmtp", "rho1": {"mode": "select"}},
    "rho1-precomputed": {"algo": "rho1-wmtp", "reference_source": "precomputed"},
    "critic": {"algo": "critic-wmtp"},
    "dft": {"algo": "dft"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_training_step_never_waits_for_the_device(micro, tmp_path, variant):
    root, assets, config = micro
    weighting = {**VARIANTS[variant], "reference_ce_dir": str(tmp_path / "refce")}
    path = write_recipe(tmp_path / "r.yaml", assets, weighting["algo"], tmp_path / "out",
                        weighting=weighting, train={"grad_accum": 2},
                        data={"micro_batch_size": 2})  # fmt: skip
    if variant == "rho1-precomputed":
        from training.precompute_reference import main as precompute_main

        assert precompute_main([str(path), "--config", str(config)]) == 0
    recipe = load_recipe(path)
    run = build_run(recipe, load_env_config(str(config)), DistInfo())
    batches = [b.to(run.info.device) for b in run.loader.next_step(4, 2)]
    assert len(batches) == 2
    with no_host_reads():
        totals = train_step(run, batches)
        grad_norm = clip_gradients(run.model, 1.0, run.use_fsdp)
    summary = totals.reduce(grad_norm, run.info)  # the step's one read, after the loop
    assert summary.loss > 0 and summary.grad_norm > 0 and all(c > 0 for c in summary.head_ce)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.model.parameters())


# ------------------------------------------------- a new algorithm in one place
class LaterTokensWeighter:
    """Emphasises each response's later tokens: score = position in the row (a toy)."""

    name: ClassVar[str] = "later-tokens"
    per_step: ClassVar[bool] = False
    normalised: ClassVar[bool] = True

    def __init__(self, config: WeightingConfig):
        self.config, self.needs = config, ()

    def scores(self, inputs: WeightingInputs) -> torch.Tensor:
        positions = torch.arange(inputs.valid.shape[1], device=inputs.valid.device)
        return positions[None, :, None].expand(inputs.valid.shape).float()

    def weights(self, scores, valid, step_context=None) -> torch.Tensor:
        return normalize_per_head(scores, valid, self.config)


def test_an_algorithm_defined_in_a_test_trains_end_to_end_through_the_registry(micro, tmp_path):
    root, assets, config = micro
    register(LaterTokensWeighter)
    try:
        runs = {}
        for algo in ("baseline", "later-tokens"):
            recipe = write_recipe(tmp_path / f"{algo}.yaml", assets, algo, tmp_path / algo,
                                  train={"max_steps": 4})  # fmt: skip
            assert train_main([str(recipe), "--config", str(config)]) == 0
            runs[algo] = [h for h in history(tmp_path / algo) if h.get("stage") == "step"]
    finally:
        WEIGHTERS.pop("later-tokens")
    later, base = runs["later-tokens"], runs["baseline"]
    assert len(later) == 4 and all(abs(h["weight_mean"] - 1) < 1e-3 for h in later)
    assert all(h["weight_std"] > 0.3 and h["weight_above_one_fraction"] > 0.2 for h in later)
    assert all(h["score_std"] > 0 for h in later)  # its scores were logged
    assert later[0]["loss"] != base[0]["loss"]  # the weights reached the loss
    assert (tmp_path / "later-tokens" / "export" / "final" / "SHA256SUMS").is_file()
