"""A small word-level text encoder over the Tiny Shapes prompt vocabulary."""

from __future__ import annotations

import re

import torch
from torch import nn

from .data import COLOURS, DIRECTIONS, SHAPES

PAD = "<pad>"
DEFAULT_VOCAB: list[str] = [PAD, "a", "moving", *COLOURS, *SHAPES, *DIRECTIONS]


class TinyTokenizer:
    """Lower-cases, drops punctuation and maps each word to an id; unknown words are an error, not a guess."""

    def __init__(self, vocab: list[str], max_length: int):
        if not vocab or vocab[0] != PAD:
            raise ValueError(f"vocabulary must start with {PAD!r}")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = int(max_length)

    @property
    def words(self) -> list[str]:
        return self.vocab[1:]

    def split(self, prompt: str, field: str = "prompt") -> list[str]:
        if not isinstance(prompt, str):
            raise ValueError(f"{field} must be a string, got {type(prompt).__name__}")
        # Apostrophes and digits are split out too, so they surface as unknown words.
        return re.findall(r"[a-z0-9']+", prompt.lower())

    def encode(self, prompt: str, field: str = "prompt") -> list[int]:
        """Token ids of a prompt. Refused, naming `field` as the user sees it: characters the encoder cannot read
        (they would vanish), words outside the vocabulary, text with no word at all, and too many words."""
        words = self.split(prompt, field)
        unreadable = sorted(set(re.findall(r"[^a-z0-9'\s.,;:!?()\-]", prompt.lower())))
        if unreadable:
            raise ValueError(
                f"{field} contains characters the Tiny Shapes text encoder cannot read: {' '.join(unreadable[:10])}. "
                f"Use only the words: {', '.join(self.words)}."
            )
        unknown = [w for w in words if w not in self.index or w == PAD]
        if unknown:
            uniq = [w if len(w) <= 24 else w[:21] + "…" for w in dict.fromkeys(unknown)]
            raise ValueError(
                f"{field} contains words outside the Tiny Shapes vocabulary: {', '.join(uniq[:10])}. "
                f"Known words: {', '.join(self.words)}."
            )
        if prompt.strip() and not words:
            raise ValueError(f"{field} has no word the Tiny Shapes model knows. Use the words: {', '.join(self.words)}.")
        if len(words) > self.max_length:
            raise ValueError(
                f"{field} has {len(words)} words; the Tiny Shapes text encoder reads at most {self.max_length}."
            )
        return [self.index[w] for w in words]

    def __call__(self, prompts: list[str], field: str = "prompt") -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) padded to max_length, and a bool mask of real tokens."""
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = self.encode(prompt, field)
            if tokens:
                ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != 0


class TinyTextEncoder(nn.Module):
    """Token + position embeddings and a small transformer encoder.

    An empty prompt has no tokens to attend over, so it maps to a learned null sequence instead; training drops
    prompts to "" now and then so that this sequence is the unconditional input for classifier-free guidance.
    """

    def __init__(
        self,
        vocab: list[str] | None = None,
        max_length: int = 16,
        dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int = 256,
    ):
        super().__init__()
        self.config = {
            "vocab": list(vocab or DEFAULT_VOCAB),
            "max_length": max_length,
            "dim": dim,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "ffn_dim": ffn_dim,
        }
        self.tokenizer = TinyTokenizer(self.config["vocab"], max_length)
        self.token_embedding = nn.Embedding(len(self.config["vocab"]), dim)
        self.position_embedding = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, ffn_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.null_embedding = nn.Parameter(torch.randn(max_length, dim) * 0.02)

    @property
    def dim(self) -> int:
        return self.config["dim"]

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        empty = ~mask.any(dim=1)
        # Give empty rows one visible key so attention stays finite; their output is replaced below.
        key_mask = mask.clone()
        key_mask[empty, 0] = True
        x = self.norm(self.encoder(x, src_key_padding_mask=~key_mask))
        # Zero the padding so the denoiser sees the same thing for a prompt however it was padded.
        x = x * mask[..., None].to(x.dtype)
        null = self.null_embedding[: ids.shape[1]].to(x.dtype).expand_as(x)
        return torch.where(empty[:, None, None], null, x)

    def encode(self, prompts: str | list[str], field: str = "prompt") -> torch.Tensor:
        """encoder_hidden_states (B, max_length, dim) for the given prompts (`field` names them in errors)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenizer(list(prompts), field)
        return self(ids.to(self.device), mask.to(self.device))
