"""Rectified-flow noising (SD3, FLUX): sigma and the noised latent equal what diffusers'
FlowMatchEulerDiscreteScheduler computes with the pipelines' own settings."""

import numpy as np
import pytest
import torch

from difstudy.errors import DifstudyError
from difstudy.flow import OFFICIAL_FLUX_STEPS, flow_noise, flow_shift_mu, flow_sigma, model_timestep
from difstudy.models import layouts


def scheduler(name):
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = {k: v for k, v in layouts.layout(name)["scheduler"].items() if k != "_class_name"}
    return cfg, FlowMatchEulerDiscreteScheduler.from_config(cfg)


@pytest.mark.parametrize("t", [25, 50, 100, 200, 500])
def test_flux_dev_official_img2img_sigma_and_input(t):
    """The official extraction: FluxImg2ImgPipeline at strength t/1000, 28 steps, 1024 px (4096
    tokens): its first timestep's sigma and scale_noise, done by the scheduler itself."""
    cfg, sch = scheduler("flux-dev")
    steps, seq = OFFICIAL_FLUX_STEPS, 4096
    mu = flow_shift_mu(cfg, seq)
    sch.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    start = int(max(steps - min(steps * t / 1000, steps), 0))
    timestep = sch.timesteps[start : start + 1]
    sch.set_begin_index(start)
    z0, noise = torch.randn(1, 4096, 64), torch.randn(1, 4096, 64)
    want = sch.scale_noise(z0, timestep, noise)
    sigma = flow_sigma(cfg, t, image_seq_len=seq, steps=steps)
    assert sigma == pytest.approx(float(sch.sigmas[start]), rel=1e-6)
    assert torch.allclose(flow_noise(z0, noise, sigma), want, atol=1e-6)
    assert model_timestep("flux", sigma) == pytest.approx(float(timestep[0]) / 1000, rel=1e-6)


def test_flux_dev_sigma_at_t50_by_hand():
    cfg, _ = scheduler("flux-dev")
    mu = 1.15  # 4096 tokens: max_shift
    s = 1 - 26 * (1 - 1 / 28) / 27  # 28 * 0.05 = 1.4 steps: start at index 26 of linspace(1, 1/28, 28)
    assert flow_sigma(cfg, 50, 4096, 28) == pytest.approx(np.exp(mu) / (np.exp(mu) + 1 / s - 1))
    assert flow_sigma(cfg, 50, 4096, 28) == pytest.approx(0.1955, abs=5e-4)


@pytest.mark.parametrize("name", ["sd3-medium", "flux-schnell"])
@pytest.mark.parametrize("t", [50, 250, 700])
def test_static_shift_equals_the_scheduler(name, t):
    cfg, sch = scheduler(name)
    sch.set_timesteps(sigmas=[t / 1000])
    assert flow_sigma(cfg, t) == pytest.approx(float(sch.sigmas[0]), rel=1e-6)


def test_sigma_comes_from_the_config_not_the_sampling_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    cfg, _ = scheduler("sd3-medium")
    heun = FlowMatchHeunDiscreteScheduler.from_config(cfg)
    euler = FlowMatchEulerDiscreteScheduler.from_config(heun.config)
    assert flow_sigma(dict(heun.config), 300) == flow_sigma(dict(euler.config), 300) == flow_sigma(cfg, 300)


def test_bad_timesteps_and_a_missing_resolution_are_clear_errors():
    cfg, _ = scheduler("flux-dev")
    with pytest.raises(DifstudyError, match="image_seq_len"):
        flow_sigma(cfg, 50)
    with pytest.raises(DifstudyError, match="out of range"):
        flow_sigma(cfg, 0, 4096)
    # every t up to 1000/28 snaps to the grid's last step (the official pipeline runs one step)
    assert flow_sigma(cfg, 1, 4096, 28) == flow_sigma(cfg, 35, 4096, 28) < flow_sigma(cfg, 36, 4096, 28)
