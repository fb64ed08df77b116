"""CUDA autocast for the planner's fake device, which torch cannot autocast (``meta`` has no autocast key).

:class:`AutocastEmulation` is a ``TorchFunctionMode`` that casts the arguments of the functions in a cast-policy
table as ``torch.autocast`` does: ``lower`` functions (convolutions, matmuls, linear, SDPA) run in the low
precision with their fp32 inputs cast down, ``fp32`` ones (layer/group norm, losses, exp/log, upsampling) and
``fp32_out`` ones (softmax, sum, norm, ...: the output dtype set to fp32) run in fp32; a composite whose inner op
is the autocast op (``F.normalize``) runs as a stand-in that calls it so. As in torch, the low-precision
casts of fp32 leaf parameters that require grad are cached until the outermost region exits, the casts are
autograd ops (gradients reach the fp32 masters), and checkpoint recomputation in backward runs under the
autocast state its module's forward ran under (a fresh cache per recomputed module). Outside regions, and
in backward outside recomputation, nothing is cast.

The tables hold the functions of PyTorch's own op lists (``aten/src/ATen/autocast_mode.{h,cpp}``) that
Python code reaches: ``CUDA_POLICIES`` for the plans, ``CPU_POLICIES`` to check this emulation against torch's
real CPU autocast (tests/test_memory_autocast.py). The trainers enter it through
``precision.bf16_autocast`` (``AUTOCAST_STAND_INS``), so the planned steps run the trainers' own code.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack as _function_modes, _pop_mode, _push_mode
from torch.utils._pytree import tree_map

from ..precision import AUTOCAST_STAND_INS

T = torch.Tensor
_MATMULS = [torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__, torch.mm, T.mm, torch.bmm, T.bmm, torch.baddbmm,
            T.baddbmm, torch.addmm, T.addmm, torch.addbmm, T.addbmm, torch.mv, T.mv, torch.addmv, T.addmv,
            torch.addr, T.addr, torch.einsum, torch.linalg.vecdot, torch.linalg.multi_dot, torch.chain_matmul]
_CONVS = [F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d]
_UNARY_FP32 = ["acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
               "rsqrt", "sinh", "tan", "pow", "logsumexp", "dist", "cdist", "renorm"]
_LOSSES = [F.l1_loss, F.mse_loss, F.smooth_l1_loss, F.huber_loss, F.kl_div, F.nll_loss, F.poisson_nll_loss,
           F.cosine_embedding_loss, F.hinge_embedding_loss, F.margin_ranking_loss, F.multilabel_margin_loss,
           F.soft_margin_loss, F.triplet_margin_loss, F.multi_margin_loss, F.binary_cross_entropy_with_logits,
           F.cross_entropy]  # cross_entropy: log_softmax (fp32 output), then nll_loss; here its input is cast
# (one extra copy of the logits: the trainers compute them in fp32 anyway, so it is a no-op for them)
_SET_DTYPE = ["sum", "prod", "cumsum", "cumprod", "softmax", "log_softmax", "norm"]  # norm: fp32_append_dtype


def _normalize(input: torch.Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: Any = None) -> torch.Tensor:
    """``F.normalize`` as CUDA autocast runs it: only its norm is an autocast op (fp32 output, the input is not
    cast), so the division promotes to fp32 without an fp32 copy of the input."""
    denom = input.norm(p, dim, keepdim=True, dtype=torch.float32).clamp_min(eps).expand_as(input)
    return torch.div(input, denom, out=out)


def _methods(names: list[str]) -> list[Callable]:
    """``torch.<name>`` and ``torch.Tensor.<name>`` (and the ``**`` operators for pow) where they exist."""
    out = [f for name in names for f in (getattr(torch, name, None), getattr(T, name, None)) if f is not None]
    return out + ([T.__pow__, T.__rpow__] if "pow" in names else [])


CUDA_POLICIES: dict[Callable, str | Callable] = {
    **dict.fromkeys([*_MATMULS, *_CONVS, F.linear, F.prelu, F.scaled_dot_product_attention], "lower"),
    **dict.fromkeys([*_methods(_UNARY_FP32), F.softplus, F.layer_norm, F.group_norm, F.cosine_similarity, F.pdist,
                     F.interpolate, *_LOSSES], "fp32"),
    **dict.fromkeys([*_methods(_SET_DTYPE), F.softmax, F.log_softmax, torch.linalg.vector_norm,
                     torch.linalg.matrix_norm], "fp32_out"),
    F.normalize: _normalize,  # a composite whose inner norm is the autocast op: run it as torch decomposes it
}
# torch's CPU lists, for the check against real CPU autocast: no norms, softmax, exp/log/pow or upsampling in fp32
CPU_POLICIES: dict[Callable, str] = {
    **dict.fromkeys([*_MATMULS[:14], torch.linalg.vecdot, *_CONVS, F.linear, F.prelu,
                     F.scaled_dot_product_attention], "lower"),
    **dict.fromkeys([*_LOSSES, torch.cdist, T.prod, torch.prod, F.avg_pool3d, F.max_pool3d,
                     F.adaptive_avg_pool3d], "fp32"),
}


class AutocastEmulation(TorchFunctionMode):
    """Autocast of ``device_type`` tensors by ``policies`` (see the module docstring). Use as a context manager
    around a whole step (forward and backward); :meth:`region` (or ``bf16_autocast`` on that device type)
    marks the autocast regions inside it."""

    def __init__(self, device_type: str = "meta", policies: dict[Callable, str] | None = None) -> None:
        super().__init__()
        self.device_type, self.policies = device_type, CUDA_POLICIES if policies is None else policies
        self.dtype: torch.dtype | None = None  # the running region's low precision; None: not autocasting
        self.depth = 0  # nesting of regions (forward) or of recomputed modules (backward)
        self.cache: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self._at_forward: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> region dtype
        self._replaying: list[tuple[torch.dtype | None, bool]] = []  # (state before, whether pushed)
        self._handles: list = []
        self._outer: Callable | None = None

    # ------------------------------------------------------------------ regions
    @contextlib.contextmanager
    def region(self, dtype: torch.dtype | None = torch.bfloat16) -> Iterator[None]:
        """An autocast region to ``dtype`` (``torch.autocast(device_type, dtype)``); None: autocast off
        (``torch.autocast(device_type, enabled=False)``)."""
        saved, self.dtype = self.dtype, dtype
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            self.dtype = saved
            if self.depth == 0:
                self.cache.clear()

    def _pre(self, module: nn.Module, _args: Any) -> None:
        if torch._C._current_graph_task_id() == -1:  # forward: remember the autocast state the module ran under
            self._at_forward[module] = self.dtype
            return
        # backward: checkpoint recomputation runs under that state again. Backward is entered from
        # Tensor.backward's __torch_function__, which takes this mode off the stack: put it back meanwhile.
        pushed = self not in _function_modes()
        if pushed:
            _push_mode(self)
        self._replaying.append((self.dtype, pushed))
        self.dtype = self._at_forward.get(module)
        self.depth += 1

    def _post(self, module: nn.Module, _args: Any, _out: Any) -> None:
        if torch._C._current_graph_task_id() == -1 or not self._replaying:
            return
        self.depth -= 1
        self.dtype, pushed = self._replaying.pop()
        if self.depth == 0:
            self.cache.clear()
        if pushed:
            _pop_mode()

    def __enter__(self) -> "AutocastEmulation":
        self._handles = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                         nn.modules.module.register_module_forward_hook(self._post, always_call=True)]
        self._outer = AUTOCAST_STAND_INS.get(self.device_type)
        AUTOCAST_STAND_INS[self.device_type] = self.region
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        try:
            super().__exit__(*args)
        finally:
            if self._outer is None:
                AUTOCAST_STAND_INS.pop(self.device_type, None)
            else:  # an enclosing emulation of the same device type
                AUTOCAST_STAND_INS[self.device_type] = self._outer
            for h in self._handles:
                h.remove()
            self._handles, self.cache = [], {}

    # ------------------------------------------------------------------ casting
    def _eligible(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.device.type == self.device_type and x.is_floating_point() \
            and x.dtype != torch.float64

    def _cast(self, x: Any, dtype: torch.dtype) -> Any:
        if not self._eligible(x) or x.dtype == dtype:
            return x
        cacheable = dtype == self.dtype and x.dtype == torch.float32 and x.requires_grad and x.is_leaf \
            and not x._is_view() and not torch.is_inference_mode_enabled()
        if not cacheable:
            return x.to(dtype)
        hit = self.cache.get(id(x))
        if hit is not None and hit[0]() is x:
            return hit[1]
        cast = x.to(dtype)
        self.cache[id(x)] = (weakref.ref(x), cast)
        return cast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        policy = self.policies.get(func) if self.dtype is not None else None
        if callable(policy):
            return policy(*args, **kwargs)
        if policy in ("lower", "fp32"):
            dtype = self.dtype if policy == "lower" else torch.float32
            args, kwargs = tree_map(lambda x: self._cast(x, dtype), (args, kwargs))
        elif policy == "fp32_out" and args and self._eligible(args[0]) and kwargs.get("dtype") is None:
            kwargs = {**kwargs, "dtype": torch.float32}
        return func(*args, **kwargs)
