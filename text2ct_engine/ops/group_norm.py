"""``group_norm(x, num_groups, weight, bias, eps, act, add)``: GroupNorm (+ optional SiLU) over (N, C, *spatial).

Backends (see ``ops.backend``):

- ``triton``: ``text2ct_engine.kernels.group_norm`` (split reductions for big groups, one program per group
  for small ones, fused add/affine/SiLU, fused backward),
  registered as the custom op ``text2ct::group_norm_triton`` with a fake impl and autograd, so it runs under
  ``FakeTensorMode`` and ``torch.compile``. The default for CUDA tensors; on CPU only under TRITON_INTERPRET=1.
- ``cpp``: the C++/OpenMP CPU kernels in ``csrc/group_norm.cpp`` (fp32/bf16, forward and backward), custom
  ops ``text2ct::group_norm_cpp`` / ``text2ct::group_norm_cpp_bwd``.
- ``torch``: ``F.group_norm`` then ``F.silu``, the reference.

``auto`` picks triton on CUDA, and on CPU the C++ kernel for fp32/bf16 inputs of at least CPP_MIN_NUMEL
elements when it builds (there it measured faster than torch's ``silu(group_norm(x))`` on a 2-core machine:
see benchmarks/RESULTS.md), else torch.
float64 and other dtypes the kernels do not take fall back to torch on every backend.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import cpp_ext
from .backend import constant_result, requested_backend, triton_usable
from .library import custom_op

ACTIVATIONS = (None, "silu")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPP_DTYPES = (torch.float32, torch.bfloat16)
# C++ kernel vs torch silu(group_norm(x)) on CPU (benchmarks/RESULTS.md): faster from about a million
# elements up (VAE shapes: 1.2-1.7x forward and forward+backward on 2 cores); below that the fixed cost of a
# call dominates and torch is as fast or faster. So auto uses it on CPU for x.numel() >= CPP_MIN_NUMEL.
CPP_IS_CPU_DEFAULT = True
CPP_MIN_NUMEL = 1 << 20


def validate_group_norm(x: torch.Tensor, num_groups: int, weight, bias, act, add=None) -> None:
    """Raise one clear ``ValueError`` for a call no backend can serve."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"group_norm needs a floating-point tensor, got {kind}: cast the input with .float()")
    if x.dim() < 2:
        raise ValueError(f"group_norm needs input of shape (N, C, *spatial), got {tuple(x.shape)}")
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"group_norm: {c} channels are not divisible into {num_groups} groups; "
                         f"pick num_groups dividing C")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (not isinstance(p, torch.Tensor) or tuple(p.shape) != (c,)):
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"group_norm: {name} must have shape ({c},) to match C, got {shape}")
        if p is not None and not p.is_floating_point():
            raise ValueError(f"group_norm: {name} must be floating point, got {p.dtype}")
    if add is not None:
        if not isinstance(add, torch.Tensor) or tuple(add.shape) != (x.shape[0], c):
            shape = tuple(add.shape) if isinstance(add, torch.Tensor) else type(add).__name__
            raise ValueError(f"group_norm: add must have shape (N, C) = ({x.shape[0]}, {c}), got {shape}")
        if not add.is_floating_point():
            raise ValueError(f"group_norm: add must be floating point, got {add.dtype}")
    if act not in ACTIVATIONS:
        raise ValueError(f"group_norm: unknown activation {act!r}; use None or 'silu'")
    for name, p in (("weight", weight), ("bias", bias), ("add", add)):
        if p is not None and p.device != x.device:
            raise ValueError(f"group_norm: {name} is on {p.device} but x is on {x.device}")


def group_norm_torch(x, num_groups, weight=None, bias=None, eps=1e-6, act=None, add=None):
    """The reference: (x + add), ``F.group_norm``, then ``F.silu``; output in x's dtype like the kernels."""
    if add is not None:
        x = x + add.to(x.dtype).reshape(*add.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if act == "silu" else y


# ------------------------------------------------------------------------------------------------------
# helpers shared by the real and the fake implementations
# ------------------------------------------------------------------------------------------------------
def _view3(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1)


def _empty_output(x: torch.Tensor) -> torch.Tensor:
    """Output of x's shape/dtype; x's layout where its spatial dims collapse (contiguous or channels_last),
    else contiguous. The C++ path and the fake impls allocate with this; the Triton entry point
    (``kernels.group_norm.empty_output``) does the same, so fake and real strides agree."""
    return torch.empty_like(_view3(x)).view(x.shape)


def _stats(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (x.shape[0], num_groups)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


def _act(act: str) -> str | None:
    return None if act in ("", "none") else act


def _input_grads(ctx, dx, dw, db, dadd):
    """Gradients for (x, num_groups, weight, bias, add, eps, act), in the inputs' dtypes."""
    w, b, a = ctx.param_dtypes
    return (dx, None, None if w is None else dw.to(w), None if b is None else db.to(b),
            None if a is None else dadd.to(a), None, None)


# ------------------------------------------------------------------------------------------------------
# triton custom op
# ------------------------------------------------------------------------------------------------------
@custom_op("text2ct::group_norm_triton")
def _gn_triton(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               add: Optional[torch.Tensor], eps: float, act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import group_norm as k
    return k.group_norm_fwd(x, num_groups, weight, bias, add, eps, _act(act))


@_gn_triton.register_fake
def _gn_triton_fake(x, num_groups, weight, bias, add, eps, act):
    return (_empty_output(x), *_stats(x, num_groups))


@custom_op("text2ct::group_norm_triton_bwd", differentiable=False)
def _gn_triton_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   add: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                   act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import group_norm as k
    return k.group_norm_bwd(dy, x, weight, bias, add, mean, rstd, num_groups, _act(act))


@_gn_triton_bwd.register_fake
def _gn_triton_bwd_fake(dy, x, weight, bias, add, mean, rstd, num_groups, act):
    c = x.shape[1]
    f32 = dict(dtype=torch.float32)
    dadd = x.new_empty((x.shape[0], c), **f32) if add is not None else x.new_empty((0,), **f32)
    return _empty_output(x), x.new_empty((c,), **f32), x.new_empty((c,), **f32), dadd


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, add, eps, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, add, mean, rstd)
    ctx.num_groups, ctx.act = num_groups, act
    ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (weight, bias, add))
    ctx.mark_non_differentiable(mean, rstd)


def _triton_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, add, mean, rstd = ctx.saved_tensors
    dx, dw, db, dadd = torch.ops.text2ct.group_norm_triton_bwd(dy, x, weight, bias, add, mean, rstd,
                                                               ctx.num_groups, ctx.act)
    return _input_grads(ctx, dx, dw, db, dadd)


_gn_triton.register_autograd(_triton_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------
# C++ custom ops (CPU forward and backward)
# ------------------------------------------------------------------------------------------------------
def _f32vec(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


@custom_op("text2ct::group_norm_cpp", device_types="cpu")
def _gn_cpp(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            add: Optional[torch.Tensor], eps: float, act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ext = cpp_ext.load()
    if ext is None:
        raise RuntimeError(f"group_norm: C++ kernel unavailable ({cpp_ext.load_error()})")
    y = _empty_output(x)
    mean, rstd = _stats(x, num_groups)
    x3, y3 = _view3(x), y.view(x.shape[0], x.shape[1], -1)
    fits = (x3.stride(2) == 1 or x3.stride(1) == 1) and y3.stride() == x3.stride()
    target = y3 if fits else torch.empty(x3.shape, dtype=x.dtype)
    ext.group_norm_forward(x3 if fits else x3.contiguous(), target, mean, rstd, _f32vec(weight), _f32vec(bias),
                           _f32vec(add), num_groups, float(eps), _act(act) == "silu")
    if not fits:
        y3.copy_(target)
    return y, mean, rstd


@_gn_cpp.register_fake
def _gn_cpp_fake(x, num_groups, weight, bias, add, eps, act):
    return (_empty_output(x), *_stats(x, num_groups))


def group_norm_backward_torch(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, add: torch.Tensor | None, mean: torch.Tensor,
                              rstd: torch.Tensor, num_groups: int, act: str | None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form GroupNorm(+add)(+SiLU) backward in fp32 torch ops, from the forward's (mean, rstd).

    Returns (dx, dweight (C,), dbias (C,), dadd (N, C)), the last three in fp32.
    """
    N, C = x.shape[:2]
    G = num_groups
    sp = [1] * (x.dim() - 2)
    xf = x.float().reshape(N, G, C // G, *x.shape[2:])
    gshape = (N, G, 1, *sp)
    mu = mean.reshape(gshape)
    if add is not None:
        mu = mu - add.float().reshape(N, G, C // G, *sp)
    r = rstd.reshape(gshape)
    xhat = (xf - mu) * r
    w = weight.float().reshape(1, G, C // G, *sp) if weight is not None else None
    dz = dy.float().reshape(xf.shape)
    if act == "silu":
        z = xhat * w if w is not None else xhat
        if bias is not None:
            z = z + bias.float().reshape(1, G, C // G, *sp)
        sig = torch.sigmoid(z)
        dz = dz * sig * (1 + z * (1 - sig))
    red = tuple(range(3, xf.dim()))
    ds = dz.sum(red) if red else dz
    dd = (dz * xhat).sum(red) if red else dz * xhat
    dxhat = dz * w if w is not None else dz
    c1 = dxhat.mean(dim=(2, *red), keepdim=True)
    c2 = (dxhat * xhat).mean(dim=(2, *red), keepdim=True)
    dxf = r * (dxhat - c1 - xhat * c2)
    dadd = (dxf.sum(red) if red else dxf).reshape(N, C)
    dx = dxf.reshape(x.shape).to(x.dtype)
    return dx, dd.reshape(N, C).sum(0), ds.reshape(N, C).sum(0), dadd


@custom_op("text2ct::group_norm_cpp_bwd", device_types="cpu", differentiable=False)
def _gn_cpp_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                add: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ext = cpp_ext.load()
    if ext is None:  # a build that vanished since the forward: closed-form torch math
        return group_norm_backward_torch(dy, x, weight, bias, add, mean, rstd, num_groups, _act(act))
    dx = _empty_output(x)
    n, c = x.shape[:2]
    x3, dx3, dy3 = _view3(x), dx.view(n, c, -1), _view3(dy)
    if not (x3.stride(2) == 1 or x3.stride(1) == 1) or dx3.stride() != x3.stride():
        x3 = x3.contiguous()
        dx3 = torch.empty(x3.shape, dtype=x.dtype)
    if dy3.stride() != x3.stride() or dy3.dtype != x.dtype:  # dy in x's layout (a copy only if it differs)
        dy3 = torch.empty_like(x3).copy_(dy3)
    dw, db, dadd = ext.group_norm_backward(x3, dy3, dx3, mean, rstd, _f32vec(weight), _f32vec(bias),
                                           _f32vec(add), num_groups, _act(act) == "silu")
    if dx3.data_ptr() != dx.data_ptr():
        dx.view(n, c, -1).copy_(dx3)
    return dx, dw, db, dadd


_gn_cpp_bwd.register_fake(_gn_triton_bwd_fake)


def _cpp_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, add, mean, rstd = ctx.saved_tensors
    dx, dw, db, dadd = torch.ops.text2ct.group_norm_cpp_bwd(dy, x, weight, bias, add, mean, rstd, ctx.num_groups,
                                                            ctx.act)
    return _input_grads(ctx, dx, dw, db, dadd)


_gn_cpp.register_autograd(_cpp_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------------
def _cpp_ready() -> tuple[bool, str]:
    ext = cpp_ext.load()
    return (ext is not None), ("C++ kernel built" if ext is not None else f"C++ unavailable: {cpp_ext.load_error()}")


def choose_group_norm_backend(x: torch.Tensor) -> tuple[str, str]:
    """(backend, reason) that ``group_norm`` uses for this tensor right now.

    May build the C++ kernel (once, cached) when that is the candidate on CPU. Never raises: a forced
    backend that cannot run is reported in the reason (``group_norm`` itself raises ``ValueError`` then).
    """
    name, reason, _ = _choose(x.device.type, x.dtype, x.numel())
    return name, reason


@constant_result
def _backend_for_compile(dev: str, dtype: torch.dtype, numel: int) -> str:
    # dynamo cannot trace the ContextVar behind ops.backend(): under torch.compile the choice is made once,
    # when the graph is traced, and baked into it
    name, reason, ok = _choose(dev, dtype, numel)
    if not ok:
        raise ValueError(f"group_norm: {reason}")
    return name


def _choose(dev: str, dtype: torch.dtype, numel: int) -> tuple[str, str, bool]:
    """(backend, reason, runnable); runnable is False only for a forced backend that cannot run here."""
    asked = requested_backend()
    if asked == "torch":
        return "torch", "forced (torch)", True
    if asked == "triton" or (asked == "auto" and dev != "cpu"):
        why = "forced (triton)" if asked == "triton" else "auto: CUDA tensor"
        if dtype not in KERNEL_DTYPES:
            return "torch", f"{why}, but the Triton kernel takes fp32/fp16/bf16, not {dtype}: torch", True
        ok, reason = triton_usable(dev)
        if ok:
            return "triton", f"{why}: {reason}", True
        if asked == "triton":
            return "triton", f"forced (triton) cannot run here: {reason}", False
        return "torch", f"auto: {reason}; torch", True
    # cpp asked, or auto on CPU
    why = "forced (cpp)" if asked == "cpp" else "auto on CPU"
    if dev != "cpu":
        return "torch", f"{why}: the C++ kernel is CPU-only, {dev} tensor: torch", True
    if asked == "auto" and not CPP_IS_CPU_DEFAULT:
        return "torch", "auto on CPU: torch (the C++ kernel was not faster here)", True
    if asked == "auto" and numel < CPP_MIN_NUMEL:
        return "torch", (f"auto on CPU: torch below {CPP_MIN_NUMEL} elements, the C++ kernel from there on "
                         f"(a call's fixed cost dominates small tensors)"), True
    if dtype not in CPP_DTYPES:
        return "torch", f"{why}: the C++ kernel takes fp32/bf16, not {dtype}: torch", True
    ok, reason = _cpp_ready()
    if ok:
        return "cpp", f"{why}: fused C++/OpenMP kernel", True
    return "torch", f"{why}: {reason}; torch", True


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-6, act: str | None = None,
               add: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm over ``num_groups`` groups of (N, C, *spatial) ``x``, then ``act`` (None or "silu").

    ``add`` (N, C), if given, is broadcast-added to ``x`` first (the ResBlock's time embedding), so the
    sum never has to be written to memory by the caller. Output: x's dtype, shape and layout.
    """
    validate_group_norm(x, num_groups, weight, bias, act, add)
    if torch.compiler.is_compiling():
        name = _backend_for_compile(x.device.type, x.dtype, int(x.numel()))
    else:
        name, reason, ok = _choose(x.device.type, x.dtype, x.numel())
        if not ok:
            raise ValueError(f"group_norm: {reason}")
    if name == "triton":
        return torch.ops.text2ct.group_norm_triton(x, num_groups, weight, bias, add, float(eps), act or "none")[0]
    if name == "cpp":
        return torch.ops.text2ct.group_norm_cpp(x, num_groups, weight, bias, add, float(eps), act or "none")[0]
    return group_norm_torch(x, num_groups, weight, bias, eps, act, add)
