"""Hugging Face tokenizers and text encoders from local folders, for training/text.py (no downloads).

This module is imported normally, never embedded in pickles, so its cache of loaded encoders is shared
by every copy of a net: the originals, their deep copies and EMA snapshots, and nets loaded from pickles
(whose training/text.py source runs as a separate module).
"""

import os
from typing import Any

import torch

_models: dict[tuple[str, str], torch.nn.Module] = {}  # (folder, device) -> frozen text encoder


def import_transformers(what: str) -> Any:
    try:
        import transformers  # Optional dependency, only for the Hugging Face routes.
    except ImportError as e:
        raise ImportError(f'{what} needs the transformers package: pip install transformers') from e
    return transformers


def load_tokenizer(path: str) -> Any:
    """The tokenizer save_pretrained wrote into the folder `path`."""
    transformers = import_transformers(f'The tokenizer in {path}')
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f'Tokenizer folder {path} not found: place the Hugging Face tokenizer (or text '
            'encoder) the net was made with there (the files save_pretrained writes).'
        )
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_text_model(path: str, device: torch.device | str) -> torch.nn.Module:
    """The text encoder in the folder `path` on `device`, frozen (eval mode, no gradients); loaded once."""
    key = (path, str(device))
    if key not in _models:
        transformers = import_transformers(f'The text encoder in {path}')
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f'Text encoder folder {path} not found: place the pretrained Hugging Face model '
                'the net was trained with there (the files save_pretrained writes).'
            )
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        model = getattr(model, 'text_model', model)  # CLIP: the text tower of the dual encoder.
        if getattr(model.config, 'is_encoder_decoder', False):
            model = model.get_encoder()  # T5 and the like: the encoder half.
        _models[key] = model.eval().requires_grad_(False).to(device)
    return _models[key]
