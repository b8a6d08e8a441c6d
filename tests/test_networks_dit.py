"""Tests for training/networks_dit.py and dit_checkpoints.py: DiT's checkpoint layout and equations, sizes, Gflops, MP-DiT."""

import argparse
import datetime
import math
import pickle

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from training.dit_checkpoints import DiTCheckpointError, infer_dit_kwargs, load_dit_checkpoint
from training.networks_dit import DIT_CONFIGS, DiT, MPDiT, MPTokenConv, sincos_pos_embed

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=16, depth=2, num_heads=2, num_classes=5)


def published_layout(input_size, patch_size, in_channels, hidden_size, depth, num_classes, learn_sigma=True):
    """Key names and shapes of DiT's released state dicts, written out from the paper's architecture."""
    h, p, out = hidden_size, patch_size, in_channels * (2 if learn_sigma else 1)
    shapes = {
        'pos_embed': (1, (input_size // p) ** 2, h),
        'x_embedder.proj.weight': (h, in_channels, p, p),
        'x_embedder.proj.bias': (h,),
        't_embedder.mlp.0.weight': (h, 256),
        't_embedder.mlp.0.bias': (h,),
        't_embedder.mlp.2.weight': (h, h),
        't_embedder.mlp.2.bias': (h,),
        'y_embedder.embedding_table.weight': (num_classes + 1, h),
        'final_layer.linear.weight': (p * p * out, h),
        'final_layer.linear.bias': (p * p * out,),
        'final_layer.adaLN_modulation.1.weight': (2 * h, h),
        'final_layer.adaLN_modulation.1.bias': (2 * h,),
    }
    block = {'attn.qkv': (3 * h, h), 'attn.proj': (h, h), 'mlp.fc1': (4 * h, h), 'mlp.fc2': (h, 4 * h)}
    block['adaLN_modulation.1'] = (6 * h, h)
    for i in range(depth):
        for name, (rows, cols) in block.items():
            shapes[f'blocks.{i}.{name}.weight'] = (rows, cols)
            shapes[f'blocks.{i}.{name}.bias'] = (rows,)
    return shapes


def random_state_dict(seed=0, dtype=torch.float64, **config):
    generator = torch.Generator().manual_seed(seed)
    layout = published_layout(**config)
    return {key: torch.randn(shape, generator=generator, dtype=dtype) * 0.3 for key, shape in layout.items()}


# ----------------------------------------------------------------------------
# An independent straightforward implementation of DiT's equations (Peebles & Xie 2023, Sec. 3).


def reference_dit(sd, x, t, y, patch_size, num_heads):
    n, c, size, _ = x.shape
    p, g = patch_size, size // patch_size
    hidden = sd['pos_embed'].shape[2]

    def linear(name, v):
        return v @ sd[f'{name}.weight'].T + sd[f'{name}.bias']

    def norm(v):
        mu = v.mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(((v - mu) ** 2).mean(-1, keepdim=True) + 1e-6)

    def gelu_tanh(v):
        return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    # Patches as vectors (channel, p_row, p_col), tokens row-major, times the flattened conv kernel.
    patches = x.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
    tokens = patches @ sd['x_embedder.proj.weight'].reshape(hidden, -1).T + sd['x_embedder.proj.bias']
    tokens = tokens + sd['pos_embed']
    freqs = torch.tensor([math.exp(-math.log(10000) * i / 128) for i in range(128)], dtype=x.dtype)
    feats = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    hid = linear('t_embedder.mlp.0', feats)
    cond = linear('t_embedder.mlp.2', hid * torch.sigmoid(hid)) + sd['y_embedder.embedding_table.weight'][y]
    silu_c = cond * torch.sigmoid(cond)
    depth = len([k for k in sd if k.endswith('attn.qkv.weight')])
    dh = hidden // num_heads
    for i in range(depth):
        b = f'blocks.{i}'
        m = linear(f'{b}.adaLN_modulation.1', silu_c)
        sh1, sc1, g1, sh2, sc2, g2 = (m[:, j * hidden : (j + 1) * hidden, None].transpose(1, 2) for j in range(6))
        a = linear(f'{b}.attn.qkv', norm(tokens) * (1 + sc1) + sh1)
        out = torch.zeros_like(tokens)
        for head in range(num_heads):
            q, k, v = (a[..., part * hidden + head * dh : part * hidden + (head + 1) * dh] for part in range(3))
            weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), dim=-1)
            out[..., head * dh : (head + 1) * dh] = weights @ v
        tokens = tokens + g1 * linear(f'{b}.attn.proj', out)
        mlp = linear(f'{b}.mlp.fc2', gelu_tanh(linear(f'{b}.mlp.fc1', norm(tokens) * (1 + sc2) + sh2)))
        tokens = tokens + g2 * mlp
    m = linear('final_layer.adaLN_modulation.1', silu_c)
    shift, scale = m[:, None, :hidden], m[:, None, hidden:]
    out = linear('final_layer.linear', norm(tokens) * (1 + scale) + shift)
    out_c = out.shape[2] // (p * p)
    image = torch.zeros(n, out_c, size, size, dtype=x.dtype)
    for token in range(g * g):
        row, col = divmod(token, g)
        values = out[:, token].reshape(n, p, p, out_c)  # (p_row, p_col, channel)
        image[:, :, row * p : (row + 1) * p, col * p : (col + 1) * p] = values.permute(0, 3, 1, 2)
    return image


@torch.no_grad()
def test_published_layout_loads_strictly_and_matches_the_paper_equations():
    config = {k: v for k, v in TINY.items() if k != 'num_heads'}
    sd = random_state_dict(**config)
    net = load_dit_checkpoint(sd, num_heads=2)
    assert set(net.state_dict()) == set(sd)
    assert (net.input_size, net.patch_size, net.in_channels, net.out_channels, net.num_classes) == (8, 2, 3, 6, 5)
    assert len(net.blocks) == 2 and not net.training
    net = net.double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.0, 17.0, 500.5, 999.0], dtype=torch.float64)
    y = torch.tensor([0, 3, 4, 5])  # the last one is the null label
    expected = reference_dit(sd, x, t, y, patch_size=2, num_heads=2)
    actual = net(x, t, y)
    assert actual.shape == (4, 6, 8, 8)
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize('learn_sigma', [True, False])
def test_loader_reads_files_and_training_checkpoints(tmp_path, learn_sigma):
    config = {k: v for k, v in TINY.items() if k != 'num_heads'}
    sd = random_state_dict(dtype=torch.float32, learn_sigma=learn_sigma, **config)
    path = tmp_path / 'dit.pt'
    torch.save({'model': {}, 'ema': sd, 'opt': {}}, path)
    with pytest.raises(DiTCheckpointError, match='for input size 8, not 16'):
        load_dit_checkpoint(str(path), input_size=16)
    net = load_dit_checkpoint(str(path), input_size=8)
    assert all(torch.equal(net.state_dict()[key], value) for key, value in sd.items())
    assert net.learn_sigma == learn_sigma and net.out_channels == (6 if learn_sigma else 3)
    assert net.blocks[0].num_heads == 1  # not one of DiT's sizes: 64 channels per head, at least one


def dits_training_checkpoint(path, model: dict, ema: dict, **extra) -> None:
    """What DiT's train.py saves: both weight sets, AdamW's state after a step, and its argparse options."""
    net = DiT(**{**infer_dit_kwargs(model), 'num_heads': 1})
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0)
    net(torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([0, 4])).square().mean().backward()
    opt.step()
    args = argparse.Namespace(model='DiT-XL/2', image_size=256, num_classes=1000, epochs=1400, vae='ema', ckpt=None)
    torch.save({'model': model, 'ema': ema, 'opt': opt.state_dict(), 'args': args, **extra}, path)


def test_dits_own_training_checkpoints_load_their_ema_weights_and_foreign_objects_are_one_sentence(
    tmp_path, monkeypatch
):
    config = {k: v for k, v in TINY.items() if k != 'num_heads'}
    model, ema = (random_state_dict(seed, dtype=torch.float32, **config) for seed in (0, 1))
    path = str(tmp_path / '0400000.pt')
    dits_training_checkpoint(path, model, ema)
    net = load_dit_checkpoint(path)
    assert all(torch.equal(net.state_dict()[key], value) for key, value in ema.items())
    other = str(tmp_path / 'other.pt')
    dits_training_checkpoint(other, model, ema, when=datetime.date(2023, 1, 1))
    with pytest.raises(DiTCheckpointError, match=r'other.pt: it holds a datetime.date, .*only tensors') as info:
        load_dit_checkpoint(other)
    assert '\n' not in str(info.value)
    monkeypatch.delattr(torch.serialization, 'safe_globals')  # torch < 2.4 has neither
    monkeypatch.delattr(torch.serialization, 'add_safe_globals')
    with pytest.raises(DiTCheckpointError, match=r'0400000.pt: torch .*argparse.Namespace.*torch>=2.4') as info:
        load_dit_checkpoint(path)
    assert '\n' not in str(info.value)


@pytest.mark.parametrize('input_size', [32, 64])
def test_released_checkpoint_shapes_give_dit_xl_2(input_size):
    layout = published_layout(input_size, 2, 4, 1152, 28, 1000)
    state = {key: torch.empty(shape, device='meta') for key, shape in layout.items()}
    expected = dict(input_size=input_size, in_channels=4, num_classes=1000, learn_sigma=True, mlp_ratio=4.0)
    assert infer_dit_kwargs(state) == {**expected, **DIT_CONFIGS['DiT-XL/2']}


@torch.no_grad()
def test_one_hot_labels_equal_indices_and_a_zero_row_is_the_null_label():
    torch.manual_seed(0)
    net = DiT(**TINY).eval()
    for param in net.parameters():
        param.normal_(std=0.3)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([3, 700, 20])
    one_hot = torch.zeros(3, 5)
    one_hot[0, 4] = one_hot[1, 0] = 1
    assert torch.allclose(net(x, t, one_hot), net(x, t, torch.tensor([4, 0, 5])))
    assert torch.equal(net(x, t, None), net(x, t, torch.tensor([5, 5, 5])))  # None: null labels
    classless = DiT(**dict(TINY, num_classes=0)).eval()
    for param in classless.parameters():
        param.normal_(std=0.3)
    assert torch.equal(classless(x, t, torch.zeros(3, 0)), classless(x, t, torch.zeros(3, dtype=torch.long)))


@torch.no_grad()
def test_float16_weights_compute_in_float16_close_to_float32():
    torch.manual_seed(0)
    net = DiT(**TINY).eval()
    for param in net.parameters():
        param.normal_(std=0.3)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 5])
    full = net(x, t, y)
    half = net.half()(x, t, y)
    assert half.dtype == torch.float16
    assert (half.float() - full).abs().max() < 0.01 * full.abs().max()


@torch.no_grad()
def test_diffusers_layout_loads_and_matches_diffusers_dit():
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=3,
        out_channels=6,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=5,
        norm_eps=1e-6,
    )
    ref = ref.double().eval()
    for param in ref.parameters():
        param.normal_(std=0.3)
    for block in ref.transformer_blocks:
        block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())  # one embedder in DiT
        # diffusers spaces the timestep frequencies by ln(10000)/127, DiT by ln(10000)/128.
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    with pytest.raises(DiTCheckpointError, match='input_size'):
        load_dit_checkpoint(ref.state_dict())
    net = load_dit_checkpoint(ref.state_dict(), input_size=8, num_heads=2).double()
    x, t, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 250, 999]), torch.tensor([0, 4, 5])
    expected = ref(x, timestep=t, class_labels=y).sample
    assert ((net(x, t, y) - expected).norm() / expected.norm()).item() < 1e-5
    state = ref.state_dict()
    state['transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight'] += 1
    with pytest.raises(DiTCheckpointError, match='per-block copies of y_embedder.embedding_table.weight'):
        load_dit_checkpoint(state, input_size=8)


def test_pos_embed_matches_mae_formula():
    hidden, grid = 16, 3
    table = sincos_pos_embed(hidden, grid)[0]
    quarter = hidden // 4
    for token in range(grid * grid):
        row, col = token // grid, token % grid
        for i in range(quarter):
            omega = 1 / 10000 ** (i / quarter)
            expected = [math.sin(col * omega), math.cos(col * omega), math.sin(row * omega), math.cos(row * omega)]
            actual = [table[token, i + j * quarter].item() for j in range(4)]
            assert actual == pytest.approx(expected, abs=1e-6)
    assert torch.equal(DiT(**TINY).pos_embed[0], sincos_pos_embed(16, 4)[0])


@torch.no_grad()
def test_adaln_zero_init_outputs_zero_and_random_weights_do_not():
    torch.manual_seed(0)
    net = DiT(**TINY).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    assert torch.count_nonzero(net(x, t, y)) == 0
    for block in net.blocks:  # zero gates make every block the identity
        tokens, c = torch.randn(2, 16, 16), torch.randn(2, 16)
        assert torch.equal(block(tokens, c), tokens)
    for param in net.parameters():
        param.normal_()
    assert net(x, t, y).abs().min() > 0


@torch.no_grad()
def test_label_dropout_uses_the_null_label_in_training_only():
    torch.manual_seed(0)
    net = DiT(**TINY, class_dropout_prob=1.0)
    for param in net.parameters():
        param.normal_(std=0.3)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    null = torch.full_like(y, 5)
    assert torch.allclose(net.train()(x, t, y), net.eval()(x, t, null))
    assert not torch.allclose(net.eval()(x, t, y), net.eval()(x, t, null))


def test_pickle_round_trip_keeps_outputs():
    torch.manual_seed(0)
    net = DiT(**TINY).eval()
    for param in net.parameters():
        param.data.normal_(std=0.3)
    loaded = pickle.loads(pickle.dumps(net))
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    assert torch.equal(loaded(x, t, y), net(x, t, y))
    assert loaded.init_kwargs == TINY


def meta_dit(name: str) -> DiT:
    with torch.device('meta'):
        return DiT(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **DIT_CONFIGS[name])


# DiT's Table 4 counts the fixed position embedding (a frozen parameter there, a buffer here).
@pytest.mark.parametrize(
    'name,millions', [('DiT-S/2', 33.0), ('DiT-B/2', 130.5), ('DiT-L/2', 458.1), ('DiT-XL/2', 675.1)]
)
def test_parameter_counts_match_the_paper(name, millions):
    net = meta_dit(name)
    count = sum(p.numel() for p in net.parameters()) + net.pos_embed.numel()
    assert round(count / 1e6, 1) == millions


@pytest.mark.parametrize(
    'name,gflops', [('DiT-S/2', 6.06), ('DiT-B/2', 23.01), ('DiT-L/2', 80.71), ('DiT-XL/2', 118.64)]
)
def test_gflops_match_the_paper(name, gflops):
    net = meta_dit(name).eval()
    x = torch.zeros(1, 4, 32, 32, device='meta')
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.zeros(1, device='meta'), torch.zeros(1, dtype=torch.long, device='meta'))
    measured = counter.get_total_flops() / 2 / 1e9  # FlopCounterMode counts a multiply-add as two flops
    assert measured == pytest.approx(gflops, rel=0.02)


def test_patch_size_that_does_not_divide_the_input_is_one_clear_error():
    with pytest.raises(ValueError, match='patch size 3 does not divide the input size 8'):
        DiT(**{**TINY, 'patch_size': 3})


def test_unrelated_or_broken_state_dicts_are_one_clear_error(tmp_path):
    with pytest.raises(DiTCheckpointError, match='Cannot read DiT checkpoint .*missing.pt: No such file'):
        load_dit_checkpoint(str(tmp_path / 'missing.pt'))
    torn = tmp_path / 'torn.pt'
    torch.save(random_state_dict(**{k: v for k, v in TINY.items() if k != 'num_heads'}), torn)
    torn.write_bytes(torn.read_bytes()[:1000])
    with pytest.raises(DiTCheckpointError, match='torn.pt: it is not a file torch.save wrote, or a damaged one'):
        load_dit_checkpoint(str(torn))
    with pytest.raises(DiTCheckpointError, match='Not a DiT checkpoint'):
        load_dit_checkpoint({'unet.weight': torch.zeros(3)})
    sd = random_state_dict(dtype=torch.float32, **{k: v for k, v in TINY.items() if k != 'num_heads'})
    del sd['blocks.1.mlp.fc2.bias']
    with pytest.raises(DiTCheckpointError, match='blocks.1.mlp.fc2.bias') as info:
        load_dit_checkpoint(sd)
    assert '\n' not in str(info.value)


# ----------------------------------------------------------------------------
# MP-DiT.


def tiny_mp_dit(**kwargs) -> MPDiT:
    torch.manual_seed(0)
    options = dict(img_resolution=8, img_channels=2, label_dim=3, patch_size=2, hidden_size=32, depth=2, num_heads=2)
    return MPDiT(**{**options, **kwargs})


@torch.no_grad()
@pytest.mark.parametrize('conv_mlp', [False, True])
def test_mp_dit_keeps_unit_magnitudes_at_init(conv_mlp):
    torch.manual_seed(0)
    net = MPDiT(
        img_resolution=16,
        img_channels=4,
        label_dim=10,
        patch_size=4,
        hidden_size=128,
        depth=4,
        num_heads=4,
        conv_mlp=conv_mlp,
    )
    net.eval()
    rms = lambda v: v.square().mean().sqrt().item()
    seen = []
    for module in [net.patch_embed, *net.blocks]:
        module.register_forward_hook(lambda module, inputs, output: seen.append(rms(output)))
    x = torch.randn(8, 4, 16, 16)
    noise_labels = torch.randn(8)
    labels = torch.nn.functional.one_hot(torch.arange(8) % 10, 10).float()
    assert rms(net.embedding(noise_labels, labels)) == pytest.approx(1, abs=0.15)
    assert torch.count_nonzero(net(x, noise_labels, labels)) == 0  # out_gain starts at 0
    assert seen == pytest.approx([1] * 5, abs=0.15)
    net.out_gain.fill_(1)
    assert rms(net(x, noise_labels, labels)) == pytest.approx(1, abs=0.15)
    assert net(x, noise_labels, labels).shape == x.shape


def test_mp_dit_trains_on_a_toy_problem_with_edm_preconditioning():
    net = tiny_mp_dit().train()
    sigma_data = 0.5
    grid = torch.linspace(-1, 1, 8)
    images = sigma_data * torch.stack(
        [torch.stack([grid[None].expand(8, 8), grid[:, None].expand(8, 8)]) * sign for sign in (1, -1, 0.5)]
    )
    labels = torch.eye(3)

    def edm_loss(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(3, [12], generator=generator)
        y, c = images[index], labels[index]
        sigma = (torch.randn([12, 1, 1, 1], generator=generator) * 1.2 - 1.2).exp()
        noisy = y + sigma * torch.randn(y.shape, generator=generator)
        var = sigma**2 + sigma_data**2
        f = net(noisy / var.sqrt(), sigma.flatten().log() / 4, c)
        denoised = sigma_data**2 / var * noisy + sigma * sigma_data / var.sqrt() * f
        return (var / (sigma * sigma_data) ** 2 * (denoised - y) ** 2).mean()

    def held_out_loss() -> float:
        with torch.no_grad():
            return edm_loss(torch.Generator().manual_seed(123)).item()

    before = held_out_loss()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        optimizer.zero_grad()
        edm_loss(generator).backward()
        optimizer.step()
    assert held_out_loss() < 0.6 * before


def test_mp_dit_pickles_reads_missing_labels_as_zeros_and_checks_its_geometry():
    net = tiny_mp_dit().eval()
    with torch.no_grad():
        net.out_gain.fill_(1)
    x, noise_labels, labels = torch.randn(2, 2, 8, 8), torch.randn(2), torch.eye(3)[:2]
    assert torch.equal(pickle.loads(pickle.dumps(net))(x, noise_labels, labels), net(x, noise_labels, labels))
    assert torch.equal(net(x, noise_labels, None), net(x, noise_labels, torch.zeros(2, 3)))
    with pytest.raises(ValueError, match='patch size 3 does not divide the input size 8'):
        tiny_mp_dit(patch_size=3)


@torch.no_grad()
def test_token_conv_equals_a_loop_over_each_tokens_3x3_grid_neighbours_and_keeps_unit_magnitude():
    torch.manual_seed(0)
    conv, grid, channels = MPTokenConv(6).eval(), 5, 6
    x = torch.randn(2, grid * grid, channels, dtype=torch.float64)
    w = conv.weight.double()  # each channel's taps a unit vector: w / (RMS(w) + 1e-4) / sqrt(9)
    taps = w / (w.flatten(1).norm(dim=1) + 3e-4)[:, None, None, None]
    expected = torch.zeros_like(x)
    for row in range(grid):
        for col in range(grid):
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if 0 <= row + dr < grid and 0 <= col + dc < grid:
                        source = x[:, (row + dr) * grid + col + dc]
                        expected[:, row * grid + col] += taps[:, 0, dr + 1, dc + 1] * source
    assert torch.allclose(conv(x), expected, rtol=1e-6, atol=1e-6)  # weights normalised in float32
    white = torch.randn(64, 32 * 32, channels)  # away from the zero padding at the border: unit RMS kept
    inner = conv(white).reshape(64, 32, 32, channels)[:, 1:-1, 1:-1]
    assert inner.square().mean().sqrt().item() == pytest.approx(1, abs=0.02)


@torch.no_grad()
@pytest.mark.parametrize('depth', [1, 2])
def test_conv_mlp_lets_a_patch_reach_exactly_its_grid_neighbours_per_block(depth):
    # With the attention branch weighted 0 only the MLPs act: a change of one input patch reaches that
    # patch alone without conv_mlp, and with it the patches within `depth` steps on the grid (rows, columns).
    grid, patch = 6, 2
    for conv_mlp in (False, True):
        net = tiny_mp_dit(img_resolution=grid * patch, depth=depth, attn_balance=0, conv_mlp=conv_mlp).eval()
        net.out_gain.fill_(1)
        x, noise_labels, labels = torch.randn(1, 2, grid * patch, grid * patch), torch.randn(1), torch.eye(3)[:1]
        moved = x.clone()
        moved[:, :, 2 * patch, 3 * patch] += 1  # patch (2, 3)
        change = (net(moved, noise_labels, labels) - net(x, noise_labels, labels)).abs()
        changed = change.amax(dim=(0, 1)).reshape(grid, patch, grid, patch).amax(dim=(1, 3)) > 1e-6
        reach = depth if conv_mlp else 0
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
        expected = ((rows - 2).abs() <= reach) & ((cols - 3).abs() <= reach)
        assert torch.equal(changed, expected)
