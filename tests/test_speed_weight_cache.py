"""Tests for the eval-mode weight cache of training/networks_edm2.py MPConv: bitwise the recomputed result, and
recomputed after every change of what the used weight depends on."""

import copy
import pickle

import torch

from training import networks_edm2 as nets
from training.networks_dit import MPDiT

TINY = dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=8, channel_mult=[1, 2], num_blocks=1)
TINY.update(attn_resolutions=[4], channels_per_head=8, logvar_channels=8, use_fp16=False)


def tiny_net() -> nets.Precond:
    torch.manual_seed(0)
    net = nets.Precond(**TINY)
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    return net.eval().requires_grad_(False)


def uncached(net: torch.nn.Module, *args) -> torch.Tensor:
    """The same forward pass with every used weight recomputed: a deep copy holds no cache, and autograd on
    the parameters turns caching off."""
    ref = copy.deepcopy(net).requires_grad_(True)
    with torch.enable_grad():
        return ref(*args).detach()


def inputs() -> tuple:
    g = torch.Generator().manual_seed(1)
    return torch.randn([2, 3, 8, 8], generator=g), torch.tensor([0.3, 2.0]), torch.eye(4)[[1, 3]]


def cached_layers(net: torch.nn.Module) -> int:
    return sum(getattr(m, '_eval_cache', None) is not None for m in net.modules() if isinstance(m, nets.MPConv))


def test_cached_eval_is_bitwise_the_recomputed_output_and_caches_every_layer():
    net, args = tiny_net(), inputs()
    with torch.no_grad():
        first, second = net(*args), net(*args)
    used = [m for m in net.unet.modules() if isinstance(m, nets.MPConv)]  # u(σ)'s layer runs for the loss only
    assert cached_layers(net) == len(used) and net.logvar_linear._eval_cache is None
    assert torch.equal(first, uncached(net, *args)) and torch.equal(second, first)


def test_cached_weight_is_reused_not_recomputed():
    net, args = tiny_net(), inputs()
    with torch.no_grad():
        net(*args)
        cached = {m: m._eval_cache[1] for m in net.unet.modules() if isinstance(m, nets.MPConv)}
        net(*args)
    assert all(m._eval_cache[1] is w for m, w in cached.items())


def test_load_state_dict_invalidates_the_cache():
    net, other, args = tiny_net(), tiny_net(), inputs()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(torch.rand_like(p) + 0.5)
        net(*args)
        net.load_state_dict(other.state_dict())
        out = net(*args)
    assert torch.equal(out, uncached(other, *args)) and not torch.equal(out, uncached(tiny_net(), *args))


def test_optimizer_step_invalidates_the_cache():
    net, args = tiny_net(), inputs()
    with torch.no_grad():
        before = net(*args)
    net.requires_grad_(True)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    net.requires_grad_(False)
    with torch.no_grad():
        after = net(*args)
    assert not torch.equal(after, before) and torch.equal(after, uncached(net, *args))


def test_in_place_gain_change_invalidates_the_cache():
    net, args = tiny_net(), inputs()
    with torch.no_grad():
        before = net(*args)
        net.unet.out_gain.mul_(2)
        after = net(*args)
    assert not torch.equal(after, before) and torch.equal(after, uncached(net, *args))


def test_train_invalidates_the_cache_and_training_forward_recomputes():
    net, args = tiny_net(), inputs()
    with torch.no_grad():
        net(*args)
    net.train()
    assert cached_layers(net) == 0
    with torch.no_grad():
        net(*args)
    assert cached_layers(net) == 0


def test_autograd_through_parameters_bypasses_the_cache():
    net, args = tiny_net(), inputs()
    with torch.no_grad():
        net(*args)
    net.requires_grad_(True)
    net(*args).square().sum().backward()
    assert net.unet.out_conv.weight.grad is not None and net.unet.out_conv.weight.grad.abs().sum() > 0


def test_moves_clear_the_cache_and_pickles_carry_none():
    net, args = tiny_net(), inputs()
    with torch.no_grad():
        net(*args)
        net.to(torch.float64)  # new weight storage at version 0: the cache key alone could not tell
        assert cached_layers(net) == 0
        out = net(*args)
    assert torch.equal(out, uncached(net, *args))
    assert cached_layers(pickle.loads(pickle.dumps(net))) == 0 and cached_layers(copy.deepcopy(net)) == 0


def test_mp_dit_eval_is_bitwise_the_recomputed_output():
    torch.manual_seed(0)
    net = MPDiT(img_resolution=8, img_channels=3, label_dim=4, hidden_size=16, depth=2, num_heads=2, patch_size=2)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    net.eval().requires_grad_(False)
    x, sigma, labels = inputs()
    with torch.no_grad():
        net(x, sigma.log() / 4, labels)
        out = net(x, sigma.log() / 4, labels)
    assert torch.equal(out, uncached(net, x, sigma.log() / 4, labels))
