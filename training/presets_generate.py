"""Generation presets: which network (and guiding network) to sample, with what guidance and sampler.

NVIDIA's published EDM2 post-hoc reconstructions (EDM2, Karras et al. 2024, Tables 2-3; autoguidance,
arXiv 2406.02507) and DiT's released models. Comments give the FID or FD-DINOv2 each preset is published
with (EDM2: minimum over three 50k-image seed sets). A preset's `net` / `gnet` may also be a local run
folder, which resolves to the newest network snapshot in it.
"""

from dnnlib import EasyDict

_BASE_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions'


def _pkl(name: str) -> str:
    return f'{_BASE_URL}/edm2-{name}.pkl'


def _preset(net: str, gnet: str | None = None, guidance: float = 1.0, vae: str | None = None, **sampler) -> EasyDict:
    """A net, its guiding net and guidance; `vae` and the sampler settings (sample()'s keywords) are defaults
    that command-line options override."""
    return EasyDict(net=net, gnet=gnet, guidance=guidance, vae=vae, sampler_kwargs=EasyDict(sampler))


_DIT_URL = 'https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-{0}x{0}.pt'


presets: dict[str, EasyDict] = {
    # img512 (latent), no guidance.
    'edm2-img512-xs-fid': _preset(_pkl('img512-xs-2147483-0.135')),  # FID 3.53
    'edm2-img512-xs-dino': _preset(_pkl('img512-xs-2147483-0.200')),  # FD 103.39
    'edm2-img512-s-fid': _preset(_pkl('img512-s-2147483-0.130')),  # FID 2.56
    'edm2-img512-s-dino': _preset(_pkl('img512-s-2147483-0.190')),  # FD 68.64
    'edm2-img512-m-fid': _preset(_pkl('img512-m-2147483-0.100')),  # FID 2.25
    'edm2-img512-m-dino': _preset(_pkl('img512-m-2147483-0.155')),  # FD 58.44
    'edm2-img512-l-fid': _preset(_pkl('img512-l-1879048-0.085')),  # FID 2.06
    'edm2-img512-l-dino': _preset(_pkl('img512-l-1879048-0.155')),  # FD 52.25
    'edm2-img512-xl-fid': _preset(_pkl('img512-xl-1342177-0.085')),  # FID 1.96
    'edm2-img512-xl-dino': _preset(_pkl('img512-xl-1342177-0.155')),  # FD 45.96
    'edm2-img512-xxl-fid': _preset(_pkl('img512-xxl-0939524-0.070')),  # FID 1.91
    'edm2-img512-xxl-dino': _preset(_pkl('img512-xxl-0939524-0.150')),  # FD 42.84
    # img64 (pixels), no guidance.
    'edm2-img64-s-fid': _preset(_pkl('img64-s-1073741-0.075')),  # FID 1.58
    'edm2-img64-m-fid': _preset(_pkl('img64-m-2147483-0.060')),  # FID 1.43
    'edm2-img64-l-fid': _preset(_pkl('img64-l-1073741-0.040')),  # FID 1.33
    'edm2-img64-xl-fid': _preset(_pkl('img64-xl-0671088-0.040')),  # FID 1.33
    # img512, classifier-free guidance by an unconditional XS net.
    'edm2-img512-xs-guid-fid': _preset(
        _pkl('img512-xs-2147483-0.045'), _pkl('img512-xs-uncond-2147483-0.045'), 1.40
    ),  # FID 2.91
    'edm2-img512-xs-guid-dino': _preset(
        _pkl('img512-xs-2147483-0.150'), _pkl('img512-xs-uncond-2147483-0.150'), 1.70
    ),  # FD 79.94
    'edm2-img512-s-guid-fid': _preset(
        _pkl('img512-s-2147483-0.025'), _pkl('img512-xs-uncond-2147483-0.025'), 1.40
    ),  # FID 2.23
    'edm2-img512-s-guid-dino': _preset(
        _pkl('img512-s-2147483-0.085'), _pkl('img512-xs-uncond-2147483-0.085'), 1.90
    ),  # FD 52.32
    'edm2-img512-m-guid-fid': _preset(
        _pkl('img512-m-2147483-0.030'), _pkl('img512-xs-uncond-2147483-0.030'), 1.20
    ),  # FID 2.01
    'edm2-img512-m-guid-dino': _preset(
        _pkl('img512-m-2147483-0.015'), _pkl('img512-xs-uncond-2147483-0.015'), 2.00
    ),  # FD 41.98
    'edm2-img512-l-guid-fid': _preset(
        _pkl('img512-l-1879048-0.015'), _pkl('img512-xs-uncond-2147483-0.015'), 1.20
    ),  # FID 1.88
    'edm2-img512-l-guid-dino': _preset(
        _pkl('img512-l-1879048-0.035'), _pkl('img512-xs-uncond-2147483-0.035'), 1.70
    ),  # FD 38.20
    'edm2-img512-xl-guid-fid': _preset(
        _pkl('img512-xl-1342177-0.020'), _pkl('img512-xs-uncond-2147483-0.020'), 1.20
    ),  # FID 1.85
    'edm2-img512-xl-guid-dino': _preset(
        _pkl('img512-xl-1342177-0.030'), _pkl('img512-xs-uncond-2147483-0.030'), 1.70
    ),  # FD 35.67
    'edm2-img512-xxl-guid-fid': _preset(
        _pkl('img512-xxl-0939524-0.015'), _pkl('img512-xs-uncond-2147483-0.015'), 1.20
    ),  # FID 1.81
    'edm2-img512-xxl-guid-dino': _preset(
        _pkl('img512-xxl-0939524-0.015'), _pkl('img512-xs-uncond-2147483-0.015'), 1.70
    ),  # FD 33.09
    # The same CFG nets with guidance limited to noise levels σ in (0.28, 2.90] (Kynkäänniemi et al. 2024,
    # arXiv 2404.07724, as published: EDM2-XXL FID 1.81 -> 1.40 at 32 Heun steps); the guide runs at 14 of 63 evaluations.
    'edm2-img512-xxl-guid-interval-fid': _preset(
        _pkl('img512-xxl-0939524-0.015'), _pkl('img512-xs-uncond-2147483-0.015'), 2.00, guidance_interval=(0.28, 2.90)
    ),  # FID 1.40
    # Autoguidance by a smaller, less-trained net (Karras et al. 2024).
    'edm2-img512-s-autog-fid': _preset(
        _pkl('img512-s-2147483-0.070'), _pkl('img512-xs-0134217-0.125'), 2.10
    ),  # FID 1.34
    'edm2-img512-s-autog-dino': _preset(
        _pkl('img512-s-2147483-0.120'), _pkl('img512-xs-0134217-0.165'), 2.45
    ),  # FD 36.67
    'edm2-img512-xxl-autog-fid': _preset(
        _pkl('img512-xxl-0939524-0.075'), _pkl('img512-m-0268435-0.155'), 2.05
    ),  # FID 1.25
    'edm2-img512-xxl-autog-dino': _preset(
        _pkl('img512-xxl-0939524-0.130'), _pkl('img512-m-0268435-0.205'), 2.30
    ),  # FD 24.18
    'edm2-img512-s-uncond-autog-fid': _preset(
        _pkl('img512-s-uncond-2147483-0.070'), _pkl('img512-xs-uncond-0134217-0.110'), 2.85
    ),  # FID 3.86
    'edm2-img512-s-uncond-autog-dino': _preset(
        _pkl('img512-s-uncond-2147483-0.090'), _pkl('img512-xs-uncond-0134217-0.125'), 2.90
    ),  # FD 90.39
    'edm2-img64-s-autog-fid': _preset(_pkl('img64-s-1073741-0.045'), _pkl('img64-xs-0134217-0.110'), 1.70),  # FID 1.01
    'edm2-img64-s-autog-dino': _preset(_pkl('img64-s-1073741-0.105'), _pkl('img64-xs-0134217-0.175'), 2.20),  # FD 31.85
    # DiT's released ImageNet models (Peebles & Xie 2023, Table 4), sampled as DiT's sample.py does: 250 DDPM steps,
    # classifier-free guidance 1.5 by the null label on 3 of the 4 ε channels, decoded by sd-vae-ft-ema. FID-50K
    # against ADM's reference batches (not EDM2's reference statistics).
    'dit-xl2-256': _preset(
        _DIT_URL.format(256), guidance=1.5, vae='stabilityai/sd-vae-ft-ema', sampler='ddpm', num_steps=250
    ),  # FID 2.27
    'dit-xl2-512': _preset(
        _DIT_URL.format(512), guidance=1.5, vae='stabilityai/sd-vae-ft-ema', sampler='ddpm', num_steps=250
    ),  # FID 3.04
    # The project's own CPU demos (`python train_edm2.py --outdir=runs/demo --preset=demo`, likewise
    # demo-tiny): the newest snapshot in the run folder.
    # demo: guided by its own null label (label dropout), with churn: one clean shape of the requested class in
    # 179 of 200 samples of the quickstart run, 171 of 200 without churn (bench/demo_quality.py, docs/benchmarks.md).
    'demo': _preset('runs/demo', guidance=2.0, S_churn=10),
    'demo-tiny': _preset('runs/demo-tiny'),
    # demo-dit: 181 of 200 samples of the quickstart run one clean shape of the requested class; 175 at S_churn 10.
    'demo-dit': _preset('runs/demo-dit', guidance=2.0, S_churn=20),
    'demo-text': _preset('runs/demo-text', guidance=2.0),  # text-to-image: guided by ''
}

# Text-to-image cascades (generate_images.py --cascade=NAME): stages in order, each a net (pickle or run folder)
# with its sampling steps, guidance (by the empty caption) and low-res noise augmentation at sampling time.


def _stage(net: str, num_steps: int = 32, guidance: float = 1.0, aug_sigma: float = 0.0) -> EasyDict:
    return EasyDict(net=net, num_steps=num_steps, guidance=guidance, aug_sigma=aug_sigma)


cascades: dict[str, list[EasyDict]] = {
    # `python train_edm2.py --preset=demo-text --outdir=runs/demo-text`, likewise demo-sr.
    'demo-text': [_stage('runs/demo-text', 24, 2.0), _stage('runs/demo-sr', 16)],
    # The MP-DiT base of `--preset=demo-text-dit` before the same U-Net super-resolution stage.
    'demo-text-dit': [_stage('runs/demo-text-dit', 24, 2.0), _stage('runs/demo-sr', 16)],
    # presets text2img-64, sr-64-256 and sr-256-1024 trained into runs/ folders of the same names.
    'text2img-1024': [
        _stage('runs/text2img-64', 64, 3.0),
        _stage('runs/sr-64-256', 32, 1.0, 0.05),
        _stage('runs/sr-256-1024', 24, 1.0, 0.05),
    ],
}
