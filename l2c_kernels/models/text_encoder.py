"""A tiny caption encoder trained together with the bundled text-conditional model.

No external tokenizer or weights: a fixed word vocabulary, token embeddings, learned
positions and a few pre-norm transformer layers. Position 0 always holds ``<bos>`` so an
empty caption (the unconditional branch of classifier-free guidance) still has one valid token.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .digits_data import DIGIT_WORDS

SPECIAL = ["<pad>", "<bos>", "<unk>"]
WORDS = DIGIT_WORDS + [str(i) for i in range(10)] + [
    "a", "an", "the", "digit", "number", "numeral", "handwritten", "image", "picture", "of", "written",
]
VOCAB = SPECIAL + WORDS
PAD, BOS, UNK = 0, 1, 2

CAPTION_TEMPLATES = [
    "the digit {w}", "a {d}", "number {w}", "a handwritten {w}", "{d}", "{w}", "the number {d}",
    "digit {d}", "an image of the digit {w}", "a picture of a {d}", "handwritten digit {w}", "the numeral {d}",
]


def caption_for(label: int, template: int = 0) -> str:
    """A caption for digit ``label`` using template number ``template`` (cycled)."""
    t = CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)]
    return t.format(w=DIGIT_WORDS[label], d=str(label))


class DigitTokenizer:
    """Whitespace tokenizer over :data:`VOCAB`; returns ``(ids [B, L], mask [B, L])``."""

    def __init__(self, max_length: int = 8):
        self.max_length = max_length
        self.index = {w: i for i, w in enumerate(VOCAB)}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            captions = [captions]
        ids = torch.full((len(captions), self.max_length), PAD, dtype=torch.long)
        for i, cap in enumerate(captions):
            words = re.findall(r"[a-z0-9]+", cap.lower())
            toks = [BOS] + [self.index.get(w, UNK) for w in words]
            toks = toks[: self.max_length]
            ids[i, : len(toks)] = torch.tensor(toks)
        return ids, (ids != PAD).long()


class DigitTextEncoder(nn.Module):
    """Token embeddings + learned positions + ``num_layers`` transformer encoder layers."""

    def __init__(self, dim: int = 64, num_layers: int = 2, num_heads: int = 4, max_length: int = 8):
        super().__init__()
        self.config = dict(dim=dim, num_layers=num_layers, num_heads=num_heads, max_length=max_length)
        self.tokenizer = DigitTokenizer(max_length)
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.zeros(max_length, dim))
        layer = nn.TransformerEncoderLayer(dim, num_heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        h = self.layers(h, src_key_padding_mask=mask == 0)
        return self.norm(h)

    @torch.no_grad()
    def encode(self, captions: list[str], device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ``(encoder_hidden_states [B, L, dim], encoder_attention_mask [B, L])``."""
        p = next(self.parameters())
        ids, mask = self.tokenizer(captions)
        ids, mask = ids.to(p.device), mask.to(p.device)
        h = self(ids, mask)
        return h.to(device=device or p.device, dtype=dtype or p.dtype), mask.to(device or p.device)
