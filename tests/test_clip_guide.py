"""Tests for training/clip_guide.py and training/clip_eval.py: contrastive loss, gradient caching,
gathering across 2 gloo processes, the held-out split and a short training run."""

import gc
import json
import math
import os
import socket
import sys

import numpy as np
import pytest
import torch

from training.clip_eval import HeldOutSplit, retrieval_top1
from training.clip_guide import CLIPGuide, CLIPLoss, contrastive_loss
from training.dataset_io import write_synthetic_dataset
from training.networks_edm2 import UNet

TINY = dict(
    img_resolution=8,
    img_channels=3,
    model_channels=8,
    channel_mult=[1, 2],
    attn_resolutions=[4],
    channels_per_head=8,
    embed_dim=8,
    text_length=16,
    text_channels=16,
    text_layers=1,
)


def tiny_guide(seed: int = 0) -> CLIPGuide:
    torch.manual_seed(seed)
    net = CLIPGuide(**TINY)
    with torch.no_grad():  # Non-zero learned gains, so every weight gets a gradient.
        for name, p in net.named_parameters():
            if p.ndim == 0 and name != 'logit_scale_log':
                p.fill_(0.5)
    return net.train()


def tiny_batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn([n, 3, 8, 8], generator=gen)
    captions = [f'caption number {i}' for i in range(n)]
    sigma = (torch.randn([n, 1, 1, 1], generator=gen) * 1.2 - 0.5).exp()
    noise = torch.randn([n, 3, 8, 8], generator=gen)
    return images, captions, sigma, noise


def grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in net.named_parameters()}


def test_contrastive_loss_equals_direct_cross_entropies():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=[6, 5]), rng.normal(size=[6, 5])
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    scale = 7.5
    loss = contrastive_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(scale))
    for i in range(6):
        logits_row = [scale * img[i] @ txt[j] for j in range(6)]  # image i against every caption
        logits_col = [scale * img[j] @ txt[i] for j in range(6)]  # caption i against every image
        ce_row = -logits_row[i] + math.log(sum(math.exp(v) for v in logits_row))
        ce_col = -logits_col[i] + math.log(sum(math.exp(v) for v in logits_col))
        assert loss[i].item() == pytest.approx((ce_row + ce_col) / 2, rel=1e-12)


def test_loss_draws_sigma_like_the_denoiser():
    seen = {}

    def net(x, sigma, captions):
        seen['sigma'] = sigma
        return torch.eye(len(x))[:, :4], torch.eye(len(x))[:, :4], torch.tensor(1.0)

    torch.manual_seed(0)
    CLIPLoss(P_mean=-0.4, P_std=1.2)(net, torch.zeros([4096, 1, 1, 1]), [''] * 4096)
    ln_sigma = seen['sigma'].log().flatten().double()
    assert ln_sigma.mean().item() == pytest.approx(-0.4, abs=4 * 1.2 / 64)
    assert ln_sigma.std().item() == pytest.approx(1.2, abs=0.05)


def test_gradient_caching_gives_full_batch_gradients():
    images, captions, sigma, noise = tiny_batch()
    full, cached = tiny_guide(), tiny_guide()
    loss_full = CLIPLoss()(full, images, captions, sigma=sigma, noise=noise)
    loss_full.sum().backward()
    loss_cached = CLIPLoss(batch_gpu=3)(cached, images, captions, sigma=sigma, noise=noise)  # chunks 3, 3, 2
    loss_cached.sum().backward()
    torch.testing.assert_close(loss_cached, loss_full, rtol=1e-5, atol=1e-6)
    g_full, g_cached = grads(full), grads(cached)
    assert all(g.abs().sum() > 0 for g in g_full.values())
    for name in g_full:
        torch.testing.assert_close(g_cached[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_accumulate_takes_all_rounds_into_one_contrastive_loss():
    # The training loop hands over 2 data batches of 4; the loss must compare all 8 pairs, as one call does.
    images, captions, sigma, noise = tiny_batch()
    full, rounds = tiny_guide(), tiny_guide()
    torch.manual_seed(5)
    CLIPLoss()(full, images, captions).sum().mul(0.25).backward()
    torch.manual_seed(5)
    batches = iter([(images[:4], captions[:4]), (images[4:], captions[4:])])
    CLIPLoss().accumulate(rounds, batches, num_rounds=2, scale=0.25)
    g_full, g_rounds = grads(full), grads(rounds)
    for name in g_full:
        torch.testing.assert_close(g_rounds[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)
    assert CLIPLoss().grid_conditioning(full, None, None, 16, 'cpu') is None  # A guide makes no sample grids.


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo')
    _train_step(rank, out_dir)
    # DDP's reducer and the loss graph hold the process group; freed after it is destroyed, gloo's
    # destructor can wait forever on its threads, so they go first.
    gc.collect()
    torch.distributed.destroy_process_group()


def _train_step(rank: int, out_dir: str) -> None:
    net = tiny_guide()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    images, captions, sigma, noise = tiny_batch()
    part = slice(rank * 4, rank * 4 + 4)
    loss = CLIPLoss(batch_gpu=2)(ddp, images[part], captions[part], sigma=sigma[part], noise=noise[part])
    loss.sum().div(4).backward()  # As the training loop: sum / per-rank batch.
    torch.save(dict(loss=loss.detach(), grads=grads(net)), os.path.join(out_dir, f'rank{rank}.pt'))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_gather_the_single_process_loss_and_gradients(tmp_path):
    start_method = 'fork' if sys.platform == 'linux' else 'spawn'
    torch.multiprocessing.start_processes(
        _worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method=start_method
    )
    results = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    net = tiny_guide()
    images, captions, sigma, noise = tiny_batch()
    loss = CLIPLoss()(net, images, captions, sigma=sigma, noise=noise)
    loss.sum().div(8).backward()
    torch.testing.assert_close(torch.cat([r['loss'] for r in results]), loss.detach(), rtol=1e-5, atol=1e-6)
    for name, g in grads(net).items():
        for r in results:  # DDP leaves the same averaged gradient on both ranks.
            torch.testing.assert_close(r['grads'][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope='module')
def shapes_zip(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp('data') / 'shapes.zip')
    write_synthetic_dataset(path, resolution=8, num_images=48, seed=0, progress=False)
    return path


def test_held_out_split_is_the_last_files_with_captions_as_labels(shapes_zip):
    train = HeldOutSplit(shapes_zip, holdout=10, xflip=True)
    held = HeldOutSplit(shapes_zip, holdout=10, split='holdout')
    train_files = {train.get_details(i).fname for i in range(len(train))}
    held_files = [held.get_details(i).fname for i in range(len(held))]
    assert len(train) == 2 * 38 and len(held) == 10
    assert held_files == sorted(train_files | set(held_files))[-10:] and not train_files & set(held_files)
    image, caption = held[3]
    assert caption == held.get_caption(3) and caption.startswith('a') and image.shape == (3, 8, 8)


def test_retrieval_counts_a_hit_when_the_best_caption_matches():
    class Oracle:
        """Image i's embedding is caption j's, for j = perm[i]."""

        def __init__(self, perm):
            self.perm = perm

        def encode_text(self, captions):
            return torch.eye(len(captions))

        def encode_image(self, x, sigma):
            return torch.eye(len(x))[self.perm[x[:, 0, 0, 0].round().long()]]

    images = torch.arange(4.0).reshape(4, 1, 1, 1)
    captions = ['a', 'b', 'a', 'c']
    # Image 0 retrieves caption 2 (same text), image 1 caption 3 (wrong), 2 and 3 their own.
    assert retrieval_top1(Oracle(torch.tensor([2, 3, 2, 3])), images, captions, sigma=0.0) == 0.75


def test_training_reports_retrieval_and_skips_sample_grids(shapes_zip, tmp_path):
    from training.training_loop import training_loop

    torch.manual_seed(0)
    training_loop(
        dataset_kwargs=dict(class_name='training.clip_eval.HeldOutSplit', path=shapes_zip, holdout=16),
        encoder_kwargs=dict(class_name='training.encoders.StandardRGBEncoder'),
        data_loader_kwargs=dict(num_workers=0),
        network_kwargs=dict(
            class_name='training.clip_guide.CLIPGuide', **{k: v for k, v in TINY.items() if 'img_' not in k}
        ),
        loss_kwargs=dict(class_name='training.clip_guide.CLIPLoss', eval_sigmas=[0.1, 10]),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=0.01),
        lr_kwargs=dict(func_name='training.training_loop.learning_rate_schedule', ref_lr=0.01, rampup_Mimg=0),
        ema_kwargs=dict(class_name='training.phema.PowerFunctionEMA'),
        run_dir=str(tmp_path),
        batch_size=16,
        batch_gpu=8,
        total_nimg=32,
        status_nimg=16,
        snapshot_nimg=32,
        checkpoint_nimg=32,
        device=torch.device('cpu'),
    )
    stats = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert len(stats) == 3
    for row in stats:
        assert 0 <= row['Retrieval/top1_sigma0.1'] <= 1 and 0 <= row['Retrieval/top1_sigma10'] <= 1
        assert row['Retrieval/chance'] == pytest.approx(1 / 16)  # 16 distinct held-out captions
    assert math.isfinite(stats[-1]['Loss/loss'])
    files = os.listdir(tmp_path)
    assert not [f for f in files if f.startswith('samples-')]
    assert len([f for f in files if f.startswith('network-snapshot-')]) == 2


@torch.no_grad()
def test_image_tower_is_the_unet_encoder_half_on_the_preconditioned_image():
    guide = tiny_guide().eval()
    tower = guide.image_tower
    # A U-Net of the same shape holding the tower's embedding and encoder weights.
    options = {k: TINY[k] for k in ('model_channels', 'channel_mult', 'attn_resolutions', 'channels_per_head')}
    unet = UNet(img_resolution=8, img_channels=3, label_dim=0, num_blocks=1, **options).eval()  # tower default
    missing = unet.load_state_dict(tower.state_dict(), strict=False).missing_keys
    assert all(k.startswith(('dec.', 'out_')) for k in missing)
    last = {}
    name = list(unet.enc)[-1]
    unet.enc[name].register_forward_hook(lambda m, args, out: last.__setitem__('x', out))
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 3.0])
    unet(x / (sigma**2 + 0.25).sqrt().reshape(-1, 1, 1, 1), sigma.log() / 4)  # c_in·x and c_noise, σ_data 0.5
    pooled = last['x'].mean(dim=[2, 3])
    expected = tower.out_linear(pooled / (1e-4 + pooled.square().mean(dim=1, keepdim=True).sqrt()))
    torch.testing.assert_close(tower(x, sigma), expected)
