"""The tracker: live tensor storage per device, op by op, with the peak and where it happened (module, op,
forward or backward, engine source line), on fake or real tensors alike."""
from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2 ** 30
BLOCK = 512  # CUDA's caching allocator rounds every block up to a multiple of 512 bytes


@dataclass
class PeakPoint:
    """Where a device's live bytes peaked: op counter, op name, innermost module, forward or backward."""
    bytes: int = 0
    step: int = 0
    op: str = ""
    module: str = ""
    backward: bool = False
    source: str = ""  # innermost engine source line (models, tiling, pipeline) running at the peak


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # text2ct_engine/
SOURCE_SKIP = ("ops", "cli.py", "memory")  # frames that say nothing about where in a model the peak is


def engine_source() -> str:
    """'tiling/nodes.py:80 normalize': the innermost frame in the engine outside ops/ and this planner."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_PACKAGE):
            name = os.path.relpath(path, _PACKAGE)
            if name.split(os.sep)[0] not in SOURCE_SKIP:
                return f"{name}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return ""


class ModuleStack:
    """Which module is running: a name stack kept by global forward hooks (forward, and checkpoint
    recomputation in backward). In backward the running autograd node names the module whose forward
    output it belongs to (recorded on the node), else its own name (``AddBackward0``).

    Unlike ``torch.utils.module_tracker.ModuleTracker`` it registers no gradient hooks, which hold
    autograd graphs in reference cycles and so change when tensors are freed.
    """

    def __init__(self) -> None:
        self.stack: list[tuple[int, str]] = []  # (id(module), name), innermost last
        self._names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._handles: list = []

    def name(self, module: nn.Module) -> str:
        if module not in self._names:  # a new root: name it and everything below it
            root = type(module).__name__
            for sub_name, sub in module.named_modules():
                self._names.setdefault(sub, f"{root}.{sub_name}" if sub_name else root)
        return self._names[module]

    def _pre(self, module: nn.Module, _args: Any) -> None:
        self.stack.append((id(module), self.name(module)))

    def _post(self, module: nn.Module, _args: Any, output: Any) -> None:
        # also called when forward raised (checkpoint stops recomputation that way): unwind to this module
        name = self.name(module)
        while self.stack and self.stack.pop()[0] != id(module):
            pass
        for t in tree_leaves(output):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                t.grad_fn.metadata.setdefault("module", name)  # innermost module first

    def current(self) -> str:
        if self.stack:
            return self.stack[-1][1]
        node = torch._C._current_autograd_node()
        if node is None:
            return "Global"
        return node.metadata.get("module", node.name())

    def __enter__(self) -> "ModuleStack":
        self._handles = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                         nn.modules.module.register_module_forward_hook(self._post, always_call=True)]
        return self

    def __exit__(self, *args: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.stack = [], []


class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes per device over time, with the peak and the module active at the peak.

    Every storage an op returns is counted once (views share it) from its creation until it is freed
    (a weakref callback on the storage), rounded up to ``block`` bytes. Storages that already existed when
    the tracker started count only if passed to :meth:`add`. The same on real and fake tensors.
    ``timeline`` holds (op counter, device, live bytes) each time a device's live bytes changed.
    """

    def __init__(self, block: int = BLOCK, timeline: bool = True) -> None:
        super().__init__()
        self.block = block
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_at: dict[str, PeakPoint] = {}
        self.timeline: list[tuple[int, str, int]] | None = [] if timeline else None
        self.step = 0
        self._storages: dict[int, tuple[weakref.ref, str, int]] = {}
        self._dirty: set[str] = set()
        self._modules = ModuleStack()

    # ---------------------------------------------------------------- bookkeeping
    def _size(self, storage: torch.UntypedStorage) -> int:
        n = storage.nbytes()
        return -(-n // self.block) * self.block if self.block > 1 else n

    def _freed(self, key: int, _ref: weakref.ref) -> None:
        entry = self._storages.pop(key, None)
        if entry is not None:
            self.live[entry[1]] -= entry[2]
            self._dirty.add(entry[1])

    def _see(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
            return
        key, size = id(storage), self._size(storage)
        entry = self._storages.get(key)
        if entry is not None:
            if entry[2] == size:
                return
            self.live[entry[1]] += size - entry[2]  # resized in place
            self._storages[key] = (entry[0], entry[1], size)
        else:
            device = str(t.device)
            ref = weakref.ref(storage, lambda r, k=key: self._freed(k, r))
            self._storages[key] = (ref, device, size)
            self.live[device] = self.live.get(device, 0) + size
        self._dirty.add(str(t.device))

    def _record(self, op: str) -> None:
        for device in self._dirty:
            now = self.live.get(device, 0)
            if self.timeline is not None:
                self.timeline.append((self.step, device, now))
            if now > self.peak.get(device, 0):
                self.peak[device] = now
                self.peak_at[device] = PeakPoint(now, self.step, op, self._modules.current(),
                                                 torch._C._current_graph_task_id() != -1, engine_source())
        self._dirty.clear()

    # ---------------------------------------------------------------- public
    def add(self, *objects: Any) -> None:
        """Count tensors (and modules' parameters, buffers and grads) created before the tracker started."""
        for obj in tree_leaves(list(objects)):
            if isinstance(obj, nn.Module):
                tensors: Iterable = [*obj.parameters(), *obj.buffers(),
                                     *(p.grad for p in obj.parameters() if p.grad is not None)]
            elif isinstance(obj, torch.Tensor):
                tensors = [obj]
            else:
                continue
            for t in tensors:
                self._see(t)
        self._record("add")

    def name_modules(self, *roots: nn.Module) -> None:
        """Name modules after these roots ('AutoencoderKL.decoder.blocks.7'), not after the first module run."""
        for root in roots:
            self._modules.name(root)

    def __enter__(self) -> "MemoryTracker":
        self._modules.__enter__()
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)
        self._modules.__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t)
        self.step += 1
        self._record(str(func.overloadpacket.__name__))
        return out
