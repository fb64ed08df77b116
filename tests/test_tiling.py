"""Slab-wise VAE decoding equals the untiled decode in every host-memory mode, for any slab size (1-row slabs,
tails), and the low-memory mode holds the bytes it claims; the storage policy, for decoding and encoding
alike (the encoder's exactness: test_tiled_encode.py)."""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from text2ct_engine.memory import MemoryTracker, materialize
from text2ct_engine.models import AutoencoderKL
from text2ct_engine.tiling import SlabDecoder, SlabEncoder, Stored, tiled_decode

# Text2CT's decoder layout scaled down: 3 levels of 2 ResBlocks, channels halving towards full resolution
# (so the first full-resolution ResBlock changes channels, with a 1x1 shortcut), 4 groups.
TEXT2CT = dict(num_channels=[8, 16, 32], num_res_blocks=[2, 2, 2], attention_levels=[False] * 3, norm_num_groups=4)
# Other tiny layouts: equal channels (identity shortcuts everywhere), one ResBlock per level, two levels.
TINY = [dict(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, False], norm_num_groups=2),
        dict(num_channels=[8, 16, 16], num_res_blocks=[2, 1, 1], attention_levels=[False] * 3, norm_num_groups=4)]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-11}


def random_vae(dtype: torch.dtype = torch.float32, **kw) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(**kw).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.15 + 0.02)
    return vae.to(dtype)


def random_latent(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 1.3 + 0.2).to(dtype)


def assert_exact(vae: AutoencoderKL, z: torch.Tensor, slab: int, host_memory: str) -> SlabDecoder:
    with torch.no_grad():
        ref = vae.decode(z)
    decoder = SlabDecoder(vae, slab, host_memory=host_memory)
    out = decoder(z)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = TOLERANCE[z.dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    return decoder


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("host_memory", ["low", "fast"])
@pytest.mark.parametrize("slab", [1, 3, 5, 64])
def test_tiled_decode_is_exact_text2ct_layout(slab, host_memory, dtype):
    vae = random_vae(dtype, **TEXT2CT)
    z = random_latent(slab, (2, 4, 5, 3, 4), dtype)  # odd latent sizes: slabs end in tails; batch 2
    decoder = assert_exact(vae, z, slab, host_memory)
    assert decoder.streamed == ([False, False, True] if host_memory == "low" else [False] * 3)


@pytest.mark.parametrize("host_memory", ["low", "fast"])
@pytest.mark.parametrize("layout", range(len(TINY)))
@pytest.mark.parametrize("slab", [1, 4, 7])
def test_tiled_decode_is_exact_tiny_layouts(slab, layout, host_memory):
    z = random_latent(10 * slab + layout, (3, 4, 3, 5, 2))
    assert_exact(random_vae(**TINY[layout]), z, slab, host_memory)


def test_tiled_decode_bfloat16_close_to_float32():
    vae = random_vae(**TINY[0])
    z = torch.randn(1, 4, 6, 4, 4)
    with torch.no_grad():
        ref = vae.decode(z)
    vae16 = random_vae(torch.bfloat16, **TINY[0])
    for host_memory in ("low", "fast"):
        out = tiled_decode(vae16, z.bfloat16(), slab=4, host_memory=host_memory).float()
        assert ((out - ref).norm() / ref.norm()).item() < 3e-2


def nbytes(*shape: int) -> int:
    return math.prod(shape) * 4


def test_low_host_memory_holds_a_third_of_the_old_bytes():
    """Stored bytes at the peak, counted by the decoder, against the figures its design claims: the old
    decoder held the first full-resolution ResBlock's upsampled input u (2C channels), inner activation and
    output (C each); fast holds u and one C-channel tensor; low the half-resolution input and one."""
    vae = random_vae(**TEXT2CT)
    z = random_latent(1, (2, 4, 5, 3, 4))
    n, c, full, half = 2, 8, (20, 12, 16), (10, 6, 8)
    old = nbytes(n, 2 * c, *full) + 2 * nbytes(n, c, *full)
    peaks = {}
    for host_memory in ("low", "fast"):
        decoder = SlabDecoder(vae, slab=3, host_memory=host_memory)
        out = decoder(z)
        peaks[host_memory] = decoder.peak_stored_bytes
        assert decoder.ledger.live == 0 and out.shape == (n, 1, *full)  # every stored node let go
    assert peaks["fast"] == nbytes(n, 2 * c, *full) + nbytes(n, c, *full)
    assert peaks["low"] == nbytes(n, 2 * c, *half) + nbytes(n, c, *full)
    assert 3 * peaks["low"] < old and peaks["low"] < 0.45 * peaks["fast"]


# Each pass with an input it takes on the compute device (the decoder's latent; the encoder's image may stay
# on the host): its class and input shape.
PASSES = {"decode": (SlabDecoder, (1, 4, 6, 5, 3)), "encode": (SlabEncoder, (1, 1, 12, 8, 8))}


@pytest.mark.parametrize("kind", list(PASSES))
@pytest.mark.parametrize("host_memory", ["low", "fast"])
def test_stored_bytes_equal_what_the_host_holds(host_memory, kind):
    """A pass's own count is what a tracker sees on the host when computing elsewhere (fake tensors: compute
    on meta, storage on the CPU), to the byte (the encoder's image, made on the host, included)."""
    runner, shape = PASSES[kind]
    with torch.device("meta"):
        vae = AutoencoderKL(**TEXT2CT).eval()
    tracker = MemoryTracker(block=1, timeline=False)
    with FakeTensorMode(), tracker:
        materialize(vae, "meta")
        slabs = runner(vae, slab=4, storage="cpu", host_memory=host_memory)
        out = slabs(torch.zeros(shape, device="meta" if kind == "decode" else "cpu"))
        assert out.device.type == "cpu" if kind == "decode" else out[0].device.type == "meta"
    assert tracker.peak["cpu"] == slabs.peak_stored_bytes > 0


def test_overwriting_in_place_keeps_the_rows_a_halo_still_reads():
    x = torch.arange(10.0).reshape(1, 1, 10, 1, 1)
    stored = Stored(x.clone(), x.shape, torch.device("cpu"))
    for a, b in [(0, 1), (1, 4), (4, 5), (5, 10)]:
        assert torch.equal(stored.rows(max(0, a - 2), b), x[:, :, max(0, a - 2):b])  # originals, held rows or not
        stored.overwrite(a, b, -x[:, :, a:b])
    with pytest.raises(RuntimeError, match="overwritten"):
        stored.rows(7, 10)
    stored.finish(None)
    assert torch.equal(stored.tensor, -x)


def test_tiled_decode_refuses_what_it_cannot_do_exactly():
    vae = random_vae(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, True], norm_num_groups=2)
    with pytest.raises(ValueError, match="no exact form for SpatialAttention"):
        tiled_decode(vae, torch.randn(1, 4, 2, 2, 2))
    vae = random_vae(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, False], norm_num_groups=2,
                     use_convtranspose=True)
    with pytest.raises(ValueError, match="use_convtranspose"):
        tiled_decode(vae, torch.randn(1, 4, 2, 2, 2))
    assert "use_convtranspose" in SlabDecoder.refusal(vae)  # what the pipeline's auto slab asks first
    assert SlabDecoder.refusal(random_vae(**TINY[0])) is None
    with pytest.raises(ValueError, match="slab"):
        tiled_decode(vae, torch.randn(1, 4, 2, 2, 2), slab=0)
    with pytest.raises(ValueError, match="host_memory"):
        tiled_decode(random_vae(**TINY[0]), torch.randn(1, 4, 2, 2, 2), host_memory="tiny")


# ------------------------------------------------------------------------------------------ storage policy
def test_auto_storage_prefers_the_device_only_when_it_fits():
    from text2ct_engine.tiling import FREE_MARGIN, fits_first
    gpu, host = torch.device("cuda", 0), torch.device("cpu")
    gib = 2 ** 30
    # 512x512x128 bf16, low mode: 5 GiB stored + ~2.3 GiB slab working set
    assert fits_first(int(7.3 * gib), 20 * gib, gpu, host) == [gpu, host]  # a 24 GB card
    assert fits_first(int(7.3 * gib), int(7.5 * gib), gpu, host) == [host]  # an 8 GB card: stay on the host
    assert fits_first(int(FREE_MARGIN * gib), gib, gpu, host) == [gpu, host]  # the margin's edge


def test_out_of_memory_on_the_device_falls_back_to_the_host():
    from text2ct_engine.tiling import first_that_fits
    tried = []

    def decode(storage):
        tried.append(storage)
        if storage == "gpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.ones(1)

    assert first_that_fits(["gpu", "host"], decode).item() == 1.0 and tried == ["gpu", "host"]
    with pytest.raises(torch.cuda.OutOfMemoryError):  # the last storage's error is the caller's
        first_that_fits(["gpu"], decode)
    tried.clear()

    def broken(storage):
        tried.append(storage)
        raise RuntimeError("shape mismatch: not a memory problem")
    with pytest.raises(RuntimeError):  # other errors are not retried
        first_that_fits(["gpu", "host"], broken)
    assert tried == ["gpu"]
    tried.clear()

    def cudnn(storage):
        tried.append(storage)
        if storage == "gpu":
            raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")
        return torch.zeros(1)
    assert first_that_fits(["gpu", "host"], cudnn).item() == 0.0 and tried == ["gpu", "host"]


def test_storage_argument_forms():
    vae = random_vae(**TINY[0])
    z = random_latent(3, (1, 4, 4, 4, 3))
    ref = tiled_decode(vae, z, 2)
    for storage in ("auto", "host", "device", "cpu", torch.device("cpu")):
        decoder = SlabDecoder(vae, 2, storage=storage)
        assert decoder.storage == torch.device("cpu")  # on a CPU every form means the CPU
        torch.testing.assert_close(decoder(z), ref, rtol=0, atol=0)
    decoder = SlabDecoder(vae, 2, storage="auto")
    decoder.streamed = decoder.plan_streams((1, 4, 4, 4, 3))
    assert decoder.storage_candidates((1, 4, 4, 4, 3)) == [torch.device("cpu")]  # nothing to choose on a CPU
    with pytest.raises(ValueError, match="storage must be"):
        SlabDecoder(vae, 2, storage="gpu-please")


@pytest.mark.parametrize("kind", list(PASSES))
@pytest.mark.parametrize("host_memory,slab", [("low", 4), ("fast", 4), ("low", 2)])
def test_device_need_covers_what_storing_on_the_device_holds(host_memory, slab, kind):
    """The "auto" storage estimate against the peak a tracker sees when a pass stores on its compute device
    (fake tensors on meta): never below it (or the device would run out), within 3x of it."""
    runner, shape = PASSES[kind]
    shape = (*shape[:2], *(4 * s for s in shape[2:])) if kind == "encode" else (*shape[:2], 16, 8, 6)
    with torch.device("meta"):
        vae = AutoencoderKL(**TEXT2CT).eval()
    tracker = MemoryTracker(block=1, timeline=False)
    with FakeTensorMode(), tracker:
        materialize(vae, "meta")
        weights = sum(p.numel() * p.element_size() for p in vae.parameters())
        slabs = runner(vae, slab=slab, storage="device", host_memory=host_memory)
        slabs(torch.zeros(shape, device="meta"))
        need = slabs.device_need(shape)  # the decoder's 1x1 post-quant conv keeps the latent's shape
    held = tracker.peak["meta"] - weights
    assert held <= need <= 3 * held, (held, need)


def test_moments_widen_a_block_of_channels_at_a_time(monkeypatch):
    """float64 sums of bf16 rows, exact, without a float64 copy of the whole slab: the largest float64
    tensor made while adding stays within WORK_BYTES (a reduction told to widen copies its whole input)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from text2ct_engine.tiling import nodes

    class Widest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    Widest.biggest = max(Widest.biggest, t.numel() * 8)
            return out

    monkeypatch.setattr(nodes, "WORK_BYTES", 2 * 3 * 5 * 6 * 7 * 8)  # 3 of the 11 channels per block
    rows = (torch.randn(2, 11, 5, 6, 7) * 3 + 1).to(torch.bfloat16)
    m = nodes.Moments(2, 11, torch.device("cpu"))
    with Widest():
        m.add(rows)
        m.add(rows[:, :, :2])
    ref = torch.cat([rows, rows[:, :, :2]], 2).double()
    torch.testing.assert_close(m.sum, ref.sum((2, 3, 4)), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(m.sq, ref.square().sum((2, 3, 4)), rtol=1e-12, atol=1e-9)
    assert Widest.biggest <= 2 * 3 * 5 * 6 * 7 * 8  # both samples of 3 channels: not 2 x 11 channels
