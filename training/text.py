"""Tokenizers and the magnitude-preserving text encoder of text-conditioned nets (GLIDE, Nichol et al. 2021; Imagen, Saharia et al. 2022).

Token ids: 0 is padding, 1 starts every caption (so the empty caption still has one token to attend
to), the rest encode the caption. `ByteTokenizer` and `WordTokenizer` need nothing downloaded; `HFTokenizer`
wraps a Hugging Face tokenizer saved in a local folder. `MPTextEncoder` is a small transformer built from the
EDM2 MP layers, trained with the denoiser; `FrozenTextEncoder` instead runs a pretrained Hugging Face
encoder from a local folder without training it (as Stable Diffusion uses CLIP's). Either returns token
features and a pooled caption feature that all have unit RMS.

Example:
    >>> tokenizer = ByteTokenizer(text_length=48)
    >>> encoder = MPTextEncoder(tokenizer.vocab_size, text_length=48)
    >>> features, pooled, mask = encoder(tokenizer(['a red circle', '']))
    >>> features.shape, pooled.shape, mask.shape
    (torch.Size([2, 48, 128]), torch.Size([2, 128]), torch.Size([2, 48]))
"""

import hashlib
import re

import torch

from torch_utils import persistence
from training.hf_text import load_text_model, load_tokenizer
from training.networks_edm2 import MPConv, attention, attention_dtype, mp_silu, mp_sum, normalize

PAD_TOKEN = 0
START_TOKEN = 1
TOKENS = ('bytes', 'words')  # The built-in tokenizers.

# ----------------------------------------------------------------------------
# Tokenizers: list of captions -> LongTensor [N, text_length].


class _BuiltinTokenizer:
    """Captions -> [N, text_length] ids: the start token, then `ids(caption)`, cut at text_length, padded."""

    def ids(self, caption: str) -> list[int]:
        raise NotImplementedError

    def num_tokens(self, caption: str) -> int:
        """Tokens a caption takes uncut, the start token included."""
        return 1 + len(self.ids(caption))

    def __call__(self, captions: list[str]) -> torch.Tensor:
        tokens = torch.full([len(captions), self.text_length], PAD_TOKEN, dtype=torch.int64)
        for i, caption in enumerate(captions):
            ids = ([START_TOKEN] + self.ids(caption))[: self.text_length]
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return tokens


class ByteTokenizer(_BuiltinTokenizer):
    """UTF-8 bytes shifted past the two special ids; any Unicode text is representable."""

    def __init__(self, text_length: int = 48):
        self.text_length = text_length
        self.vocab_size = 256 + 2

    def ids(self, caption: str) -> list[int]:
        return [b + 2 for b in caption.encode('utf-8')]


class WordTokenizer(_BuiltinTokenizer):
    """Words (runs of letters and digits, lower-cased) and punctuation marks, each hashed into one of `buckets`
    ids: a word-level vocabulary with no file to ship (the hashing trick, Weinberger et al. 2009). A jointly
    trained encoder learns words far more readily from these than from bytes (docs/text_adherence.md). The
    hash is blake2b, so ids are the same in every process and Python version."""

    def __init__(self, text_length: int = 48, buckets: int = 4096):
        self.text_length = text_length
        self.buckets = buckets
        self.vocab_size = buckets + 2

    def words(self, caption: str) -> list[str]:
        return re.findall(r'\w+|[^\w\s]', caption.lower())

    def word_id(self, word: str) -> int:
        return (
            2 + int.from_bytes(hashlib.blake2b(word.encode('utf-8'), digest_size=8).digest(), 'little') % self.buckets
        )

    def ids(self, caption: str) -> list[int]:
        return [self.word_id(word) for word in self.words(caption)]

    def num_tokens(self, caption: str) -> int:
        return 1 + len(self.words(caption))  # Without hashing: counting a million captions stays quick.


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder (no download); its ids shift by one so 0 is padding."""

    def __init__(self, path: str, text_length: int = 48):
        self.path = path
        self.text_length = text_length
        self._tokenizer = load_tokenizer(path)
        self.vocab_size = len(self._tokenizer) + 1

    def __call__(self, captions: list[str]) -> torch.Tensor:
        out = self._tokenizer(
            list(captions), padding='max_length', truncation=True, max_length=self.text_length, return_tensors='pt'
        )
        return torch.where(out['attention_mask'].bool(), out['input_ids'] + 1, PAD_TOKEN)

    def __getstate__(self) -> dict:
        return dict(path=self.path, text_length=self.text_length)

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def make_tokenizer(
    text_length: int = 48, tokenizer_path: str | None = None, tokens: str = 'bytes'
) -> ByteTokenizer | WordTokenizer | HFTokenizer:
    """The Hugging Face tokenizer saved in `tokenizer_path`, else the built-in one `tokens` names ('bytes' or
    'words')."""
    if tokenizer_path is not None:
        return HFTokenizer(tokenizer_path, text_length)
    if tokens not in TOKENS:
        raise ValueError(f'tokens must be one of {", ".join(TOKENS)}, not {tokens!r}')
    return ByteTokenizer(text_length) if tokens == 'bytes' else WordTokenizer(text_length)


# ----------------------------------------------------------------------------
# MP transformer layers over token sequences [N, L, C].


# Multi-head attention with q, k, v pixel-normalised per head (as EDM2's self-attention, Fig. 21); on CPU
# formed and attended in float32 as the U-Net's (networks_edm2.attention_dtype), the result in q's dtype.
def mp_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    def heads(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], x.shape[1], num_heads, -1).to(attention_dtype(q))
        return normalize(x, dim=3).transpose(1, 2)

    mask = None if key_mask is None else key_mask[:, None, None, :]
    y = attention(heads(q), heads(k), heads(v), mask)
    return y.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1).to(q.dtype)


@persistence.persistent_class
class MPTransformerLayer(torch.nn.Module):
    """Self-attention then MLP, each branch joined by MP-sum (Eq. 88) behind a learned gain starting at 0."""

    def __init__(self, channels: int, channels_per_head: int = 64, mlp_mult: int = 2, balance: float = 0.3):
        super().__init__()
        self.num_heads = max(channels // channels_per_head, 1)
        self.balance = balance
        self.qkv = MPConv(channels, channels * 3, kernel=[])
        self.proj = MPConv(channels, channels, kernel=[])
        self.mlp_in = MPConv(channels, channels * mlp_mult, kernel=[])
        self.mlp_out = MPConv(channels * mlp_mult, channels, kernel=[])
        self.attn_gain = torch.nn.Parameter(torch.zeros([]))
        self.mlp_gain = torch.nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=2)
        y = self.proj(mp_attention(q, k, v, self.num_heads, mask), gain=self.attn_gain)
        x = normalize(mp_sum(x, y, t=self.balance), dim=2)
        y = self.mlp_out(mp_silu(self.mlp_in(x)), gain=self.mlp_gain)
        return normalize(mp_sum(x, y, t=self.balance), dim=2)


# ----------------------------------------------------------------------------
# Text encoder: tokens -> (features [N, L, C], pooled [N, C], mask [N, L]).


@persistence.persistent_class
class MPTextEncoder(torch.nn.Module):
    def __init__(
        self,
        vocab_size: int,
        text_length: int = 48,
        channels: int = 128,
        num_layers: int = 2,
        channels_per_head: int = 64,
        mlp_mult: int = 2,
        balance: float = 0.3,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.text_length = text_length
        self.channels = channels
        self.token_embedding = torch.nn.Parameter(torch.randn(vocab_size, channels))
        self.position_embedding = torch.nn.Parameter(torch.randn(text_length, channels))
        self.layers = torch.nn.ModuleList(
            [
                MPTransformerLayer(channels, channels_per_head=channels_per_head, mlp_mult=mlp_mult, balance=balance)
                for _ in range(num_layers)
            ]
        )

    def _embedding(self, param: torch.Tensor) -> torch.Tensor:
        # Forced weight normalisation of embedding rows (EDM2 Eq. 47): each row has unit RMS.
        if self.training:
            with torch.no_grad():
                param.copy_(normalize(param.to(torch.float32), dim=1))
        return normalize(param.to(torch.float32), dim=1)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if tokens.ndim != 2 or tokens.shape[1] != self.text_length:
            raise ValueError(f'tokens must have shape [N, {self.text_length}], not {list(tokens.shape)}')
        mask = tokens != PAD_TOKEN
        x = mp_sum(self._embedding(self.token_embedding)[tokens], self._embedding(self.position_embedding)[None])
        x = normalize(x, dim=2)
        for layer in self.layers:
            x = layer(x, mask)
        return x, normalize(masked_mean(x, mask), dim=1), mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token features x [N, L, C] over the caption's tokens (mask [N, L]): [N, C]."""
    weights = mask.to(x.dtype).unsqueeze(2)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clip(min=1)


# ----------------------------------------------------------------------------
# Frozen pretrained encoder: a Hugging Face model from a local folder, never trained.


@persistence.persistent_class
class FrozenTextEncoder(torch.nn.Module):
    """A pretrained transformer encoder (BERT/MiniLM, CLIP text, T5) loaded from `path`, run without gradients.

    Tokens come from `HFTokenizer` on the same folder. Its weights are neither parameters of the net nor
    part of its pickles: the pickle keeps the folder's path and the model loads from there on first use.
    Token features are its last hidden states pixel-normalised to unit RMS (zero at padding); the pooled
    feature is their plain mean over the caption, normalised (the sentence-transformers pooling).
    """

    def __init__(self, path: str, text_length: int = 48):
        super().__init__()
        self.path = path
        self.text_length = text_length
        probe = torch.full([1, text_length], PAD_TOKEN, dtype=torch.int64)  # Any ids do: only the width is read.
        probe[0, :2] = START_TOKEN
        self.channels = self._hidden_states(probe)[0].shape[2]

    def _hidden_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states [N, L', C] of the tokens up to the last non-padding column L', and their mask."""
        mask = tokens != PAD_TOKEN
        length = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1
        ids, mask = (tokens[:, :length] - 1).clamp(min=0), mask[:, :length]  # HFTokenizer shifted ids by one.
        model = load_text_model(self.path, tokens.device)
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask.to(torch.int64)).last_hidden_state
        return hidden.to(torch.float32), mask

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if tokens.ndim != 2 or tokens.shape[1] != self.text_length:
            raise ValueError(f'tokens must have shape [N, {self.text_length}], not {list(tokens.shape)}')
        hidden, mask = self._hidden_states(tokens)
        features = hidden.new_zeros([tokens.shape[0], self.text_length, hidden.shape[2]])
        features[:, : hidden.shape[1]] = normalize(hidden, dim=2) * mask.unsqueeze(2)
        return features, normalize(masked_mean(hidden, mask), dim=1), tokens != PAD_TOKEN
