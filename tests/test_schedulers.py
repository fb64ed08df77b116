"""Schedulers step for step against MONAI's RFlowScheduler and DDIMScheduler."""
import pytest
import torch

from text2ct_engine.schedulers import DDIMScheduler, RFlowScheduler, scheduler_from_dict

mon = pytest.importorskip("monai.networks.schedulers")

TEXT2CT_RFLOW = dict(num_train_timesteps=1000, use_discrete_timesteps=False, use_timestep_transform=True,
                     sample_method="uniform")


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("latent", [(32, 128, 128), (8, 20, 24), (16, 16, 16)])
def test_rflow_sampling_loop_matches_monai(discrete, latent):
    kw = dict(TEXT2CT_RFLOW, use_discrete_timesteps=discrete)
    ours, ref = RFlowScheduler(**kw), mon.RFlowScheduler(**kw)
    numel = latent[0] * latent[1] * latent[2]
    ours.set_timesteps(30, input_img_size_numel=numel)
    ref.set_timesteps(30, input_img_size_numel=numel)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x = torch.randn(2, 4, 4, 5, 6)
    y = x.clone()
    ref_next = torch.cat((ref.timesteps[1:], torch.tensor([0], dtype=ref.timesteps.dtype)))
    for t, nt, ont in zip(ref.timesteps, ref_next, ours.next_timesteps()):
        assert nt == ont
        v = torch.randn_like(x) + 0.1 * x
        x, x0 = ours.step(v, t, x, nt)
        y, y0 = ref.step(v, t, y, nt)
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x0, y0, rtol=1e-6, atol=1e-6)


def test_rflow_shift_grows_with_volume():
    s = RFlowScheduler(**TEXT2CT_RFLOW)
    s.set_timesteps(30, input_img_size_numel=32 ** 3)
    base = s.timesteps.float()
    s.set_timesteps(30, input_img_size_numel=32 * 128 * 128)
    shifted = s.timesteps.float()
    assert base[0] == shifted[0] == 1000
    assert (shifted[1:] > base[1:]).all()  # more steps spent at the noisy end for the larger latent


def test_rflow_transform_scale_acts_as_a_larger_volume_and_the_shift_can_be_off():
    """transform_scale k multiplies the shift ratio, as a latent k**3 times larger does (MONAI ignores it)."""
    scaled, larger = RFlowScheduler(**{**TEXT2CT_RFLOW, "transform_scale": 2.0}), RFlowScheduler(**TEXT2CT_RFLOW)
    scaled.set_timesteps(30, input_img_size_numel=32 ** 3)
    larger.set_timesteps(30, input_img_size_numel=8 * 32 ** 3)
    base = RFlowScheduler(**TEXT2CT_RFLOW)
    base.set_timesteps(30, input_img_size_numel=32 ** 3)  # ratio 1: no shift
    assert torch.equal(scaled.timesteps, larger.timesteps) and (scaled.timesteps[1:] > base.timesteps[1:]).all()
    plain = RFlowScheduler(**{**TEXT2CT_RFLOW, "use_timestep_transform": False})
    plain.set_timesteps(4, input_img_size_numel=32 * 128 * 128)
    assert plain.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]


def test_rflow_training_pieces_match_monai():
    ours, ref = RFlowScheduler(**TEXT2CT_RFLOW), mon.RFlowScheduler(**TEXT2CT_RFLOW)
    x0, noise = torch.randn(3, 4, 6, 8, 10), torch.randn(3, 4, 6, 8, 10)
    t = torch.tensor([1.0, 500.5, 999.0])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    torch.manual_seed(11)
    t_ref = ref.sample_timesteps(x0)
    torch.manual_seed(11)
    t_ours = ours.sample_timesteps(x0)
    torch.testing.assert_close(t_ours.float(), t_ref.float())
    torch.testing.assert_close(ours.velocity_target(x0, noise), x0 - noise)
    # the noisy sample moves from the image (t=0) to the noise (t=T) along the velocity
    xt = ours.add_noise(x0, noise, torch.tensor([0.0, 0.0, 1000.0]))
    torch.testing.assert_close(xt[:2], x0[:2])
    torch.testing.assert_close(xt[2], noise[2])


def test_rflow_round_trip_and_errors():
    s = RFlowScheduler(**TEXT2CT_RFLOW)
    again = scheduler_from_dict(s.to_dict())
    assert isinstance(again, RFlowScheduler) and again.config == s.config
    with pytest.raises(ValueError, match="input_img_size_numel"):
        s.set_timesteps(30)
    with pytest.raises(ValueError, match="steps"):
        s.set_timesteps(0, input_img_size_numel=10)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        RFlowScheduler().step(torch.zeros(1), 1, torch.zeros(1))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", ["linear_beta", "scaled_linear_beta"])
def test_ddim_matches_monai(prediction, schedule):
    kw = dict(num_train_timesteps=1000, schedule=schedule, prediction_type=prediction)
    extra = dict(beta_start=0.0015, beta_end=0.0195) if schedule == "scaled_linear_beta" else {}
    ours, ref = DDIMScheduler(**kw, **extra), mon.DDIMScheduler(**kw, **extra)
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x = torch.randn(1, 4, 5, 6, 7)
    y = x.clone()
    for t in ref.timesteps:
        out = torch.randn_like(x) * 0.3
        x, x0 = ours.step(out, t, x)
        y, y0 = ref.step(out, t, y)
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0, y0, rtol=1e-5, atol=1e-5)
    t = torch.tensor([0, 999])
    noise = torch.randn(2, 4, 3, 3, 3)
    x0 = torch.randn(2, 4, 3, 3, 3)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
