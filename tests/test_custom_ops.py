"""The engine's custom-op registration (ops/library.py) and building models on the meta device without
their initialisation (models/serialization.py): what torch sees is a normal functional op / module."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from text2ct_engine.models.serialization import build_on_meta
from text2ct_engine.ops.library import custom_op


@custom_op("text2ct::_test_scaled_sum", device_types="cpu")
def scaled_sum(x: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x * scale + y, (x * y).sum(-1)


@scaled_sum.register_fake
def _(x, y, scale):
    return torch.empty_like(x), x.new_empty(x.shape[:-1])


def _setup(ctx, inputs, output):
    x, y, scale = inputs
    ctx.save_for_backward(x, y)
    ctx.scale = scale


def _backward(ctx, d_out, d_dot):
    x, y = ctx.saved_tensors
    return d_out * ctx.scale + d_dot[..., None] * y, d_out + d_dot[..., None] * x, None


scaled_sum.register_autograd(_backward, setup_context=_setup)


def test_an_op_runs_fakes_and_differentiates_like_torchs_own():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    out, dot = scaled_sum(x, y, 1.5)
    torch.testing.assert_close(out, x * 1.5 + y)
    torch.testing.assert_close(dot, (x * y).sum(-1))
    assert str(torch.ops.text2ct._test_scaled_sum.default._schema).startswith(
        "text2ct::_test_scaled_sum(Tensor x, Tensor y, float scale) -> (Tensor, Tensor)")
    assert torch.autograd.gradcheck(lambda a, b: scaled_sum(a, b, 1.5), (x, y))
    with FakeTensorMode():
        fake_out, fake_dot = scaled_sum(torch.empty(4, 2, 6), torch.empty(4, 2, 6), 2.0)
    assert fake_out.shape == (4, 2, 6) and fake_dot.shape == (4, 2)
    meta_out, _ = scaled_sum(torch.empty(2, 3, device="meta"), torch.empty(2, 3, device="meta"), 1.0)
    assert meta_out.is_meta  # the fake impl is the meta kernel too
    compiled = torch.compile(lambda a: scaled_sum(a, a, 3.0)[0] + 1, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x.detach()), x.detach() * 4 + 1)


@custom_op("text2ct::_test_double", differentiable=False)
def double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


def test_a_backward_op_refuses_to_be_differentiated():
    """Without an autograd kernel torch would hand back zero gradients (with a warning) for double backward;
    an op made with differentiable=False raises instead, naming itself. Ops carry pt2_compliant_tag."""
    x = torch.randn(4, requires_grad=True)
    y = double(x)
    torch.testing.assert_close(y, 2 * x.detach())
    with pytest.raises(RuntimeError, match="text2ct::_test_double has no derivative"):
        y.sum().backward()
    for op in (torch.ops.text2ct._test_double.default, torch.ops.text2ct.group_norm_cpp_bwd.default,
               torch.ops.text2ct.attention_fwd.default):
        assert torch.Tag.pt2_compliant_tag in op.tags


def test_bad_definitions_are_refused():
    with pytest.raises(ValueError, match="text2ct::<name>"):
        custom_op("other::op")
    with pytest.raises(ValueError, match="device_types"):
        custom_op("text2ct::_test_nowhere", device_types="tpu")(lambda x: x)


def test_build_on_meta_skips_only_the_meta_fills():
    with build_on_meta():
        emb = torch.nn.Embedding(10, 4)  # nn.init.normal_ on a meta weight: skipped
        lin = torch.nn.Linear(4, 4)
        real = torch.zeros(1000, device="cpu")
        torch.nn.init.normal_(real)  # a real tensor is still filled
        filled = torch.ones(3, device="cpu").uniform_(2.0, 3.0)
    assert emb.weight.is_meta and lin.weight.is_meta and lin.bias.is_meta
    assert real.std() > 0.5 and bool(((filled >= 2) & (filled <= 3)).all())
    assert torch.empty(2).device.type == "cpu"  # the device context ended


def test_from_pretrained_refuses_to_leave_a_tensor_without_values(tmp_path):
    """A module built on meta gets its values from the checkpoint; a non-persistent buffer, which no
    checkpoint holds, would stay a meta tensor: loading says so instead of failing later."""
    from text2ct_engine.models import AutoencoderKL

    class WithBuffer(AutoencoderKL):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    small = dict(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, False], norm_num_groups=4)
    AutoencoderKL(**small).save_pretrained(str(tmp_path / "plain"))
    assert not any(p.is_meta for p in AutoencoderKL.from_pretrained(str(tmp_path / "plain")).parameters())
    WithBuffer(**small).save_pretrained(str(tmp_path / "buffer"))
    with pytest.raises(ValueError, match="WithBuffer keeps table out of its checkpoint"):
        WithBuffer.from_pretrained(str(tmp_path / "buffer"))
