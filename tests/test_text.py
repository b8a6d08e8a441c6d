"""Tests for training/text.py: byte tokenizer and the MP text encoder."""

import pickle
import sys

import pytest
import torch

from training.text import PAD_TOKEN, START_TOKEN, ByteTokenizer, MPTextEncoder, WordTokenizer, make_tokenizer

pytestmark = pytest.mark.usefixtures('one_thread')


def test_byte_tokenizer_pads_with_zero_after_start_and_bytes():
    tokens = ByteTokenizer(text_length=6)(['ab', ''])
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 6)
    assert tokens[0].tolist() == [START_TOKEN, ord('a') + 2, ord('b') + 2, PAD_TOKEN, PAD_TOKEN, PAD_TOKEN]
    assert tokens[1].tolist() == [START_TOKEN] + [PAD_TOKEN] * 5


def test_byte_tokenizer_truncates_to_text_length():
    caption = 'a red circle on a blue background'
    tokens = ByteTokenizer(text_length=5)([caption])
    assert tokens[0].tolist() == [START_TOKEN] + [ord(c) + 2 for c in caption[:4]]


def test_byte_tokenizer_encodes_non_ascii_as_utf8_bytes():
    caption = 'ünïcødé 猫 🐱'
    tokenizer = ByteTokenizer(text_length=64)
    tokens = tokenizer([caption])[0]
    ids = tokens[tokens != PAD_TOKEN].tolist()[1:]
    assert bytes(i - 2 for i in ids).decode('utf-8') == caption
    assert int(tokens.max()) < tokenizer.vocab_size


def _encoder_with_unit_gains(**kwargs) -> MPTextEncoder:
    encoder = MPTextEncoder(ByteTokenizer(16).vocab_size, text_length=16, **kwargs)
    with torch.no_grad():
        for layer in encoder.layers:
            layer.attn_gain.fill_(1)
            layer.mlp_gain.fill_(1)
    return encoder


def test_text_encoder_features_and_pooled_have_unit_rms():
    torch.manual_seed(0)
    encoder = _encoder_with_unit_gains(channels=64, num_layers=2, channels_per_head=32)
    features, pooled, mask = encoder(ByteTokenizer(16)(['a red circle', 'x', '']))
    assert features.shape == (3, 16, 64) and pooled.shape == (3, 64) and mask.shape == (3, 16)
    assert mask.sum(dim=1).tolist() == [13, 2, 1]
    torch.testing.assert_close(features.square().mean(dim=2), torch.ones(3, 16), atol=1e-3, rtol=0)
    torch.testing.assert_close(pooled.square().mean(dim=1), torch.ones(3), atol=1e-3, rtol=0)


def test_text_encoder_pools_the_mean_of_caption_tokens_only():
    torch.manual_seed(0)
    encoder = _encoder_with_unit_gains(channels=32, num_layers=1, channels_per_head=16)
    features, pooled, mask = encoder(ByteTokenizer(16)(['blue square', '']))
    for i in range(2):
        mean = features[i, : int(mask[i].sum())].mean(dim=0)
        torch.testing.assert_close(
            pooled[i], mean / mean.square().mean().sqrt(), atol=2e-3, rtol=0
        )  # normalize() adds eps=1e-4


def test_text_encoder_pickles_and_rejects_wrong_length():
    encoder = MPTextEncoder(ByteTokenizer().vocab_size, text_length=8, channels=32, num_layers=1)
    clone = pickle.loads(pickle.dumps(encoder))
    tokens = ByteTokenizer(8)(['abc'])
    torch.testing.assert_close(clone(tokens)[0], encoder(tokens)[0])
    try:
        encoder(ByteTokenizer(9)(['abc']))
    except ValueError as e:
        assert '[N, 8]' in str(e)
    else:
        raise AssertionError('expected ValueError')


def test_hugging_face_tokenizer_without_transformers_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'transformers', None)  # import transformers now raises ImportError
    with pytest.raises(ImportError, match='needs the transformers package: pip install transformers'):
        make_tokenizer(16, str(tmp_path))


def test_word_tokenizer_gives_each_word_one_stable_id_whatever_its_case_or_neighbours():
    import hashlib

    tokenizer = WordTokenizer(text_length=6, buckets=1000)
    a, b = tokenizer(['A red Circle, at the top', 'the circle'])
    assert a[0] == START_TOKEN and a[1:].tolist() == [tokenizer.word_id(w) for w in ['a', 'red', 'circle', ',', 'at']]
    assert b.tolist() == [START_TOKEN, tokenizer.word_id('the'), a[3], PAD_TOKEN, PAD_TOKEN, PAD_TOKEN]
    expected = 2 + int.from_bytes(hashlib.blake2b(b'red', digest_size=8).digest(), 'little') % 1000
    assert tokenizer.word_id('red') == expected  # the same id in every process (no salted hash)
    assert tokenizer.vocab_size == 1002
    assert isinstance(make_tokenizer(6, None, 'words'), WordTokenizer)
    with pytest.raises(ValueError, match='bytes, words'):
        make_tokenizer(6, None, 'letters')
