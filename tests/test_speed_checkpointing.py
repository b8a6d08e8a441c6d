"""Tests for activation checkpointing of U-Net blocks (training/networks_edm2.py set_checkpointing): the same
loss, gradients and forced weights as without it, and less memory kept for backward."""

import torch

from training import networks_edm2 as nets

TINY = dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=8, channel_mult=[1, 2], num_blocks=1)
TINY.update(attn_resolutions=[4], channels_per_head=8, logvar_channels=8, use_fp16=False, dropout=0.2)


def loss_and_grads(net: nets.Precond, seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(1)
    x, labels = torch.randn([2, 3, 8, 8], generator=g), torch.eye(4)[[0, 2]]
    torch.manual_seed(seed)  # dropout
    loss = net(x, torch.tensor([0.5, 3.0]), labels).square().sum()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


def tiny_net() -> nets.Precond:
    torch.manual_seed(0)
    net = nets.Precond(**TINY).train()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.6)
    return net


def test_checkpointed_training_step_matches_plain_loss_gradients_and_forced_weights():
    plain, ckpt = tiny_net(), tiny_net()
    assert nets.set_checkpointing(ckpt) == sum(isinstance(m, nets.Block) for m in ckpt.modules()) > 0
    loss_a, grads_a = loss_and_grads(plain)
    loss_b, grads_b = loss_and_grads(ckpt)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(a, b), f'{name}: forced once in both'


def test_checkpointing_keeps_fewer_tensors_for_backward():
    def saved_bytes(net: nets.Precond) -> int:
        total = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            total.append(t.numel() * t.element_size())
            return t

        x = torch.randn([4, 3, 8, 8])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x, torch.ones(4), torch.eye(4)[[0, 1, 2, 3]]).sum()
        return sum(total)

    torch.manual_seed(0)
    net = nets.Precond(**TINY).train()
    plain = saved_bytes(net)
    nets.set_checkpointing(net)
    assert saved_bytes(net) < plain / 2


def test_checkpointing_is_off_in_eval_and_without_grad():
    net = nets.Precond(**TINY)
    nets.set_checkpointing(net)
    net.eval()
    with torch.no_grad():
        out = net(torch.randn([1, 3, 8, 8]), 1.0)
    assert torch.isfinite(out).all()
