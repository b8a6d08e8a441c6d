"""Tests of training/generation.py's sampling entry point: per-kind decisions, per-seed draws, batch invariance,
samplers for every net, presets' sampler defaults, and loading a run folder's newest snapshot."""

import pytest
import torch

from training.dit_release import dit_network
from training.generation import (
    GenerationError,
    generate_images,
    network_kind,
    resolve_network_path,
    sample,
    unread_settings,
)
from training.networks_dit import DiT
from training.sampler_options import resolve_sampler_options
from training.sampling import edm_sampler
from training.vp_diffusion import VPDiffusion


class ToyDenoiser(torch.nn.Module):
    """D(x; σ) = x·c(σ) + label term; records the inputs of each call. Flags turn it into a text net or an SR stage."""

    def __init__(self, label_dim: int = 0, text: bool = False, lowres: int | None = None) -> None:
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim = 2, 4, label_dim
        self.scale = torch.nn.Parameter(torch.tensor(0.7), requires_grad=False)
        self.label_weight = torch.nn.Parameter(torch.arange(2.0 * max(label_dim, 1)).reshape(-1, 2) / 5, False)
        if text:
            self.text_encoder = None
            self.lowres = lowres
        self.calls = []

    def forward(self, x, sigma, labels=None, **kwargs):
        self.calls.append((labels, kwargs))
        out = x * self.scale / (1 + torch.as_tensor(sigma) ** 2)
        if isinstance(labels, torch.Tensor):
            out = out + (labels @ self.label_weight).reshape(-1, 2, 1, 1)
        if isinstance(labels, list):  # Captions: the length of each caption shifts its image.
            out = out + torch.tensor([len(c) for c in labels], dtype=x.dtype).reshape(-1, 1, 1, 1) / 10
        if kwargs.get('lowres') is not None:
            out = out + kwargs['lowres'].mean() * 0.01
        return out


def test_class_net_draws_noise_then_class_from_each_seed_and_runs_edm_sampler():
    net, seeds = ToyDenoiser(label_dim=3), [11, 5, 2**20]
    out = sample(net, seeds, num_steps=3, S_churn=0)
    noise, classes = [], []
    for s in seeds:
        gen = torch.Generator().manual_seed(s)
        noise.append(torch.randn([2, 4, 4], generator=gen))
        classes.append(torch.randint(3, [], generator=gen).item())
    labels = torch.eye(3)[classes]
    torch.testing.assert_close(out.labels, labels, rtol=0, atol=0)
    torch.testing.assert_close(out.latents, edm_sampler(net, torch.stack(noise), labels, num_steps=3), rtol=0, atol=0)


def test_given_classes_are_used_and_no_class_is_drawn():
    net = ToyDenoiser(label_dim=3)
    out = sample(net, [1, 2], class_idx=[2, 0], num_steps=2)
    torch.testing.assert_close(out.labels, torch.eye(3)[[2, 0]])
    assert sample(net, [1, 2], class_idx=1, num_steps=2).labels.argmax(dim=1).tolist() == [1, 1]


def test_an_image_does_not_depend_on_its_batch_with_churn():
    net = ToyDenoiser(label_dim=3)
    kwargs = dict(num_steps=6, S_churn=30)
    batch = sample(net, [3, 8, 13], **kwargs).latents
    torch.testing.assert_close(batch[1], sample(net, [8], **kwargs).latents[0], rtol=0, atol=0)


def test_text_net_guidance_uses_the_empty_caption_as_the_unconditional_net():
    net, captions, w, sigma = ToyDenoiser(text=True), ['red', 'a blue square'], 3.0, 2.0
    out = sample(net, [0, 1], captions=captions, guidance=w, num_steps=1, sigma_max=sigma).latents
    x = torch.stack([torch.randn([2, 4, 4], generator=torch.Generator().manual_seed(s)) for s in (0, 1)]) * sigma
    d, d_u = net(x, sigma, captions), net(x, sigma, ['', ''])
    torch.testing.assert_close(out, d_u + w * (d - d_u))
    assert network_kind(net) == 'text'


def test_class_net_trained_with_label_dropout_guides_itself_by_the_null_label():
    net, w, sigma = ToyDenoiser(label_dim=3), 2.5, 2.0
    with pytest.raises(GenerationError, match='not trained with label dropout'):
        sample(net, [0, 1], class_idx=[1, 2], guidance=w, num_steps=1, sigma_max=sigma)
    net.label_dropout = 0.1
    out = sample(net, [0, 1], class_idx=[1, 2], guidance=w, num_steps=1, sigma_max=sigma).latents
    x = torch.stack([torch.randn([2, 4, 4], generator=torch.Generator().manual_seed(s)) for s in (0, 1)]) * sigma
    d, d_u = net(x, sigma, torch.eye(3)[[1, 2]]), net(x, sigma, torch.zeros([2, 3]))
    torch.testing.assert_close(out, d_u + w * (d - d_u))


def test_sr_stage_gets_its_lowres_input_augmented_with_each_seeds_next_draw():
    net, lowres, aug = ToyDenoiser(text=True, lowres=2), torch.randn([2, 2, 2, 2]), 0.3
    sample(net, [4, 7], lowres=lowres, aug_sigma=aug, num_steps=1)
    expected = []
    for i, s in enumerate((4, 7)):
        gen = torch.Generator().manual_seed(s)
        torch.randn([2, 4, 4], generator=gen)  # The stage's noise comes first.
        expected.append(lowres[i] + aug * torch.randn([2, 2, 2], generator=gen))
    labels, kwargs = net.calls[0]
    assert labels == ['', ''] and kwargs['aug_sigma'] == aug
    torch.testing.assert_close(kwargs['lowres'], torch.stack(expected))


def test_what_cannot_be_sampled_is_one_clear_error():
    with pytest.raises(GenerationError, match='super-resolution stage'):
        sample(ToyDenoiser(text=True, lowres=2), [0])
    with pytest.raises(GenerationError, match='needs a guiding network'):
        sample(ToyDenoiser(), [0], guidance=2)
    guide = ToyDenoiser()
    guide.encode_image = lambda x, sigma: x
    with pytest.raises(GenerationError, match='CLIP guide'):
        sample(guide, [0])


def test_prompts_for_a_net_without_text_and_a_guiding_net_of_another_kind_are_refused():
    run = dict(seeds=[0], device='cpu', num_steps=1)
    with pytest.raises(GenerationError, match='class-conditional or unconditional and reads no text'):
        list(generate_images(ToyDenoiser(label_dim=3), prompts=['a red circle'], **run))
    with pytest.raises(GenerationError, match='guiding network is text-to-image, but the network is class'):
        list(generate_images(ToyDenoiser(label_dim=3), gnet=ToyDenoiser(text=True), guidance=2, **run))
    net, gnet = ToyDenoiser(text=True), ToyDenoiser(text=True)
    (batch,) = generate_images(net, gnet=gnet, prompts=['red'], guidance=2, **run)
    assert batch.captions == ['red'] and net.calls and gnet.calls


def test_a_repeated_seed_is_refused_before_anything_is_sampled():
    net = ToyDenoiser(label_dim=3)
    with pytest.raises(GenerationError, match='seed 0 comes twice'):
        next(generate_images(net, seeds=[0, 1, 0], device='cpu', num_steps=1))
    assert net.calls == []


def test_run_folder_resolves_to_its_newest_snapshot(tmp_path):
    for name in (
        'network-snapshot-0000002-0.050.pkl',
        'network-snapshot-0000010-0.050.pkl',
        'network-snapshot-0000010-0.100.pkl',
        'samples-0000099.png',
    ):
        (tmp_path / name).write_bytes(b'')
    assert resolve_network_path(str(tmp_path)) == str(tmp_path / 'network-snapshot-0000010-0.100.pkl')
    assert resolve_network_path('https://example.com/net.pkl') == 'https://example.com/net.pkl'


def test_an_edm_net_under_ddim_converges_to_the_edm_samplers_ode_solution():
    # DDIM with η = 0 is Euler's method on the probability-flow ODE (Song et al. 2021, Eq. 14; EDM §3), so with the
    # linear schedule's σ range it converges, to first order, to what EDM's Heun sampler reaches on that range.
    net, seeds = ToyDenoiser(label_dim=3), [1, 2]
    d = VPDiffusion.from_schedule('linear')
    heun = sample(net, seeds, num_steps=300, sigma_min=float(d.sigmas[0]), sigma_max=float(d.sigmas[-1])).latents
    errors = [(sample(net, seeds, sampler='ddim', num_steps=n).latents - heun).abs().max() for n in (100, 1000)]
    assert errors[1] < errors[0] / 5 and errors[1] < 0.01 * heun.abs().max(), errors


def test_presets_give_sampler_defaults_that_options_override():
    c = resolve_sampler_options('dit-xl2-256', None, None, None, num_steps=None, sampler=None, eta=0.0)
    assert c.net == 'https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt'
    assert (c.vae, c.sampler_kwargs.guidance, c.sampler_kwargs.sampler, c.sampler_kwargs.num_steps) == (
        'stabilityai/sd-vae-ft-ema',
        1.5,
        'ddpm',
        250,
    )
    c = resolve_sampler_options('dit-xl2-512', None, None, 4.0, num_steps=50, sampler='ddim', respacing=None)
    assert (c.sampler_kwargs.guidance, c.sampler_kwargs.sampler, c.sampler_kwargs.num_steps) == (4.0, 'ddim', 50)
    assert 'respacing' not in c.sampler_kwargs  # Options not given leave sample()'s defaults.
    with pytest.raises(GenerationError, match="Unknown sampler 'euler'"):
        resolve_sampler_options(None, 'net.pkl', None, None, sampler='euler')
    c = resolve_sampler_options('edm2-img512-xxl-guid-interval-fid', None, None, None, guidance_interval=None)
    assert (c.sampler_kwargs.guidance, c.sampler_kwargs.guidance_interval) == (2.0, (0.28, 2.90))
    c = resolve_sampler_options('edm2-img512-xxl-guid-interval-fid', None, None, None, guidance_interval='0.5,5')
    assert c.sampler_kwargs.guidance_interval == (0.5, 5.0)
    # The demo preset's churn: its default, overridden by --S_churn, dropped (not an error) with another solver.
    assert resolve_sampler_options('demo', None, None, None, S_churn=None).sampler_kwargs.S_churn == 10
    assert resolve_sampler_options('demo', None, None, None, S_churn=0.0).sampler_kwargs.S_churn == 0
    c = resolve_sampler_options('demo', None, None, None, S_churn=None, solver='dpm++2m')
    assert 'S_churn' not in c.sampler_kwargs and c.sampler_kwargs.solver == 'dpm++2m'
    with pytest.raises(GenerationError, match='heun solver only'):
        resolve_sampler_options('demo', None, None, None, S_churn=5.0, solver='dpm++2m')


# A value other than sample()'s default for every sampler setting of generate_images.py.
_OTHER_VALUES = dict(
    num_steps=5,
    sigma_min=0.05,
    sigma_max=20.0,
    rho=3.0,
    S_churn=5.0,
    S_min=0.5,
    S_max=10.0,
    S_noise=1.2,
    solver='euler',
    schedule='logsnr-uniform',
    guidance_interval=(0.5, 5.0),
    respacing='3',
    eta=0.7,
    vp_schedule='cosine',
)


def _discrete_net() -> torch.nn.Module:
    torch.manual_seed(0)
    dit = DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=1, num_classes=3)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(std=0.1)
    return dit_network(dit.eval())


@pytest.mark.parametrize(
    'base',
    [{}, dict(S_churn=5.0), dict(schedule='logsnr-uniform'), dict(sampler='ddpm'), dict(sampler='ddim')]
    + [dict(sampler='ddim', respacing='3')],
)
@pytest.mark.parametrize('discrete', [False, True])
def test_a_sampler_setting_changes_the_images_exactly_when_it_is_not_among_the_unread_ones(base, discrete):
    net = _discrete_net() if discrete else ToyDenoiser(label_dim=3)
    net.label_dropout = 0.1  # Guided by its own null label, so that the guidance interval matters.
    settings = dict(guidance=2.0, num_steps=4, **base)
    reference = sample(net, [3, 4], class_idx=1, **settings).latents
    for name, value in _OTHER_VALUES.items():
        if name in base or (name == 'solver' and 'S_churn' in base):  # churn needs heun
            continue
        changed = sample(net, [3, 4], class_idx=1, **{**settings, name: value}).latents
        unread = unread_settings({**settings, name: value}, discrete)
        assert torch.equal(changed, reference) == (name in unread), (name, unread.get(name))


def test_options_given_that_the_sampler_would_not_read_are_refused_and_a_presets_are_not():
    for sampler_kwargs, message in [
        (dict(sampler='ddpm', S_churn=5.0, rho=3.0, eta=0.5), '--S_churn and --rho apply to --sampler=edm only, not'),
        (dict(sampler='ddim', sigma_max=40.0), '--sigma_max applies to --sampler=edm only, not to --sampler=ddim'),
        (dict(sampler='ddpm', eta=0.5), '--eta applies to --sampler=ddim only, not to --sampler=ddpm.'),
        (dict(respacing='10'), '--respacing applies to --sampler=ddpm and ddim only, not to --sampler=edm.'),
        (dict(schedule='logsnr-uniform', rho=3.0), '--rho applies to --schedule=karras only'),
        (dict(S_noise=1.1), '--S_noise applies with churn only (--S_churn > 0).'),
        (dict(sampler='ddim', respacing='ddim5', num_steps=8), '--steps applies without --respacing only'),
    ]:
        with pytest.raises(GenerationError) as info:
            resolve_sampler_options(None, 'net.pkl', None, None, **sampler_kwargs)
        assert message in str(info.value)
    for sampler_kwargs in [
        dict(sampler='ddim', eta=0.5, rho=7.0, S_churn=0.0, num_steps=32, respacing='ddim5'),
        dict(S_noise=1.1, S_churn=3.0, sampler='edm', eta=0.0),
    ]:
        resolve_sampler_options(None, 'net.pkl', None, None, **sampler_kwargs)
    assert resolve_sampler_options('demo', None, None, None, sampler='ddim').sampler_kwargs.S_churn == 10  # unused
    c = resolve_sampler_options('dit-xl2-256', None, None, None, sampler='ddim', respacing='ddim25')
    assert (c.sampler_kwargs.num_steps, c.sampler_kwargs.respacing) == (250, 'ddim25')


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_one_vp_step_lands_on_the_guided_denoiser_for_text_nets_and_guiding_nets(sampler):
    # Respaced to the single step t = 0, DDPM and DDIM return x̂_0, which for an EDM net is D at σ_0 = √((1 − ᾱ_0)/ᾱ_0)
    # and x = x_T·√(1 + σ_0²); guidance mixes it as D_g + w·(D − D_g), whatever guides.
    d = VPDiffusion.from_schedule('cosine')
    sigma = float(d.sigmas[0])
    x = torch.stack([torch.randn([2, 4, 4], generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    x = x * (1 + sigma**2) ** 0.5
    text, captions, w = ToyDenoiser(text=True), ['red', 'a blue square'], 3.0
    out = sample(text, [0, 1], captions=captions, guidance=w, sampler=sampler, respacing='1', vp_schedule='cosine')
    dc, du = text(x, sigma, captions), text(x, sigma, ['', ''])
    torch.testing.assert_close(out.latents, du + w * (dc - du), rtol=1e-4, atol=1e-5)
    net, gnet = ToyDenoiser(label_dim=3), ToyDenoiser(label_dim=3)
    gnet.scale.fill_(0.2)
    out = sample(net, [0, 1], [2, 0], gnet=gnet, guidance=w, sampler=sampler, respacing='1', vp_schedule='cosine')
    labels = torch.eye(3)[[2, 0]]
    dc, dg = net(x, sigma, labels), gnet(x, sigma, labels)
    torch.testing.assert_close(out.latents, dg + w * (dc - dg), rtol=1e-4, atol=1e-5)
