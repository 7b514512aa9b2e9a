"""Peak memory of a training step by category, from the tensors themselves: the same tracker
runs on fake tensors (the planner, `train_wmtp.py --plan`) and on real ones (`--measure`), so
the two can be compared category by category.

    tracker = MemoryTracker()
    tracker.register(model parameters, "parameters")          # what exists before the step
    with tracker, tracker.label("loss chunks"): ...            # what the step allocates, labelled
    tracker.peak_bytes, tracker.breakdown()                   # the largest total and its parts

Every storage an op creates is counted from its creation until it is freed (a weak reference),
under the innermost active label, or as a communication buffer when a collective or FSDP's
copy-in/copy-out made it, else as activations. At the end, storages that turned out to be
gradients or optimizer state are counted as such (`classify`). The tracker counts tensor bytes,
not allocator blocks: on a GPU, `torch.cuda.max_memory_allocated` adds the caching allocator's
rounding and the kernels' workspaces on top.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = (
    "parameters",
    "gradients",
    "optimizer state",
    "activations",
    "loss chunks",
    "reference model",
    "communication buffers",
)
COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d", "fsdp")


def storages(tensor: torch.Tensor) -> set[torch.UntypedStorage]:
    """The storages behind a tensor (a DTensor's local shard)."""
    if isinstance(tensor, DTensor):
        tensor = tensor._local_tensor
    return get_untyped_storages(tensor)


class MemoryTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}  # storage key → (bytes, label)
        self.refs: dict[int, weakref.ref] = {}
        self.by_label: dict[str, int] = defaultdict(int)
        self.label_max: dict[str, int] = defaultdict(int)  # the most each label held at once
        self.total = self.peak_bytes = 0
        self.peak_keys: dict[int, tuple[int, str]] = {}
        self.peak_refs: dict[int, weakref.ref] = {}
        self.relabel: dict[int, tuple[weakref.ref, str]] = {}  # id(its weakref) → category
        self._labels: list[str] = []
        self._peaks = True

    # ------------------------------------------------------------------ bookkeeping
    def _add(self, storage: torch.UntypedStorage, label: str) -> None:
        key = id(storage)
        if key in self.live or storage.nbytes() == 0:
            return
        size = storage.nbytes()
        self.live[key] = (size, label)
        self.by_label[label] += size
        self.label_max[label] = max(self.label_max[label], self.by_label[label])
        self.total += size
        self.refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self._check_peak()

    def _check_peak(self) -> None:
        if self._peaks and self.total > self.peak_bytes:
            self.peak_bytes, self.peak_keys = self.total, dict(self.live)
            self.peak_refs = dict(self.refs)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        """FSDP gathers parameters into storages it keeps and resizes (to 0 between uses)."""
        key, now = id(storage), storage.nbytes()
        if key not in self.live:
            self._add(storage, "communication buffers")
            return
        size, label = self.live[key]
        self.by_label[label] -= size
        label = "communication buffers"  # a buffer FSDP gathers parameters into
        self.live[key] = (now, label)
        self.by_label[label] += now
        self.label_max[label] = max(self.label_max[label], self.by_label[label])
        self.total += now - size
        self._check_peak()

    def _free(self, key: int) -> None:
        size, label = self.live.pop(key, (0, ""))
        self.refs.pop(key, None)
        self.by_label[label] -= size
        self.total -= size

    def register(self, tensors: Iterable[torch.Tensor], label: str) -> None:
        """Tensors that exist before the step (parameters, buffers) under `label`."""
        for tensor in tensors:
            for storage in storages(tensor):
                self._add(storage, label)

    @contextlib.contextmanager
    def transient(self) -> Iterator[None]:
        """What the block allocates and frees again does not make a peak (the optimizer step:
        CUDA's fused AdamW updates in place, while fake tensors run a functional decomposition
        that allocates copies); what it leaves allocated counts when the block ends."""
        self._peaks = False
        try:
            yield
        finally:
            self._peaks = True
            self._check_peak()

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        """What the step allocates inside the block counts as `name`."""
        self._labels.append(name)
        try:
            yield
        finally:
            self._labels.pop()

    def classify(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Storages of `tensors` (gradients, optimizer state) count as `category`, wherever and
        whenever they were made (recognised at the peak by their weak reference, which outlives
        them: an id can be reused, the reference object is not)."""
        for tensor in tensors:
            for storage in storages(tensor):
                ref = self.refs.get(id(storage))  # one weak reference per storage, kept
                if ref is not None:
                    self.relabel[id(ref)] = (ref, category)

    # ----------------------------------------------------------------- dispatch
    def __enter__(self):
        resize = self._resize = torch.UntypedStorage.resize_

        def tracked_resize(storage, size):
            out = resize(storage, size)
            self._resized(storage)
            return out

        torch.UntypedStorage.resize_ = tracked_resize
        return super().__enter__()

    def __exit__(self, *args):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor desugar into its local ops, then count those
        out = func(*args, **(kwargs or {}))
        namespace = func.namespace if hasattr(func, "namespace") else ""
        if namespace in COLLECTIVE_NAMESPACES:
            label = "communication buffers"
        else:
            label = self._labels[-1] if self._labels else "activations"
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                for storage in storages(tensor):
                    self._add(storage, label)
        return out

    # ------------------------------------------------------------------- reading
    def breakdown(self) -> dict[str, int]:
        """Bytes of each category at the peak."""
        parts = dict.fromkeys(CATEGORIES, 0)
        for key, (size, label) in self.peak_keys.items():
            ref = self.peak_refs[key]
            category = self.relabel[id(ref)][1] if id(ref) in self.relabel else label
            parts[category] = parts.get(category, 0) + size
        return parts
