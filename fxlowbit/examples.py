"""Small models and real bundled data for the demo, tests and benchmarks (CPU-friendly).

Data sets need no download: scikit-learn's bundled 8x8 digits, and the Python standard library's
own source files as a character-level language-modelling corpus.

    >>> x, y = digits()[0][:4], digits()[1][:4]
    >>> model = TinyGPT(vocab=128)
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MLP",
    "SmallCNN",
    "TinyGPT",
    "digits",
    "stdlib_text",
    "char_batches",
    "sqnr_db",
    "hf_model",
    "hf_batch",
]

# Standard-library sources used as the text corpus: fixed names so every machine reads the same.
_CORPUS_FILES = ("argparse.py", "textwrap.py", "string.py", "csv.py", "dataclasses.py", "fractions.py")


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(|ref| / |ref - approx|)."""
    ref, approx = ref.detach().double().flatten(), approx.detach().double().flatten()
    noise = (ref - approx).norm()
    return math.inf if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


class MLP(nn.Module):
    """Linear-ReLU-Dropout-Linear-GELU-Linear classifier."""

    def __init__(self, d_in: int = 64, hidden: int = 256, n_out: int = 10, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv-BN-ReLU-MaxPool x2 + dropout + linear, for (B, 1, 8, 8) digits."""

    def __init__(self, channels: int = 32, n_out: int = 10, dropout: float = 0.1):
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * c * 4, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # x: (B, T, D) -> q, k, v: (B, H, T, D/H)
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class TinyGPT(nn.Module):
    """A GPT-style character model; ``forward(idx, targets)`` returns the mean cross-entropy."""

    def __init__(
        self,
        vocab: int = 128,
        dim: int = 128,
        layers: int = 2,
        heads: int = 4,
        block: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# Small `transformers` models (no downloads): char-level vocabulary of ASCII codes; id 1 (SOH) never
# occurs in the corpus and serves as BERT's mask token.
HF_VOCAB, HF_SEQ, HF_MASK_ID = 128, 64, 1
_HF_DROPOUT_KEYS = {
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    "llama": ("attention_dropout",),
}


def hf_model(name: str, dropout: float | None = None, **overrides) -> nn.Module:
    """GPT-2 / BERT / Llama from small configs (2 layers, hidden 64, 4 heads, vocab 128, seq 64),
    in train mode. ``dropout`` sets every dropout probability (None keeps the config's defaults)."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    common = dict(vocab_size=HF_VOCAB, **overrides)
    if dropout is not None:
        common.update(dict.fromkeys(_HF_DROPOUT_KEYS[name], dropout))
    if name == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=HF_SEQ, bos_token_id=2,
                            eos_token_id=3, use_cache=False, **common)  # fmt: skip
        return tf.GPT2LMHeadModel(cfg).train()
    if name == "bert":
        bert = tf.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                             intermediate_size=256, max_position_embeddings=HF_SEQ, **common)  # fmt: skip
        return tf.BertForMaskedLM(bert).train()
    if name == "llama":
        llama = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                               num_key_value_heads=4, intermediate_size=176,
                               max_position_embeddings=HF_SEQ, use_cache=False, **common)  # fmt: skip
        return tf.LlamaForCausalLM(llama).train()
    raise ValueError(f"unknown transformers model {name!r}; valid: gpt2, bert, llama")


def hf_batch(name: str, idx: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs for :func:`hf_model`: causal LMs get labels = inputs (the model shifts them);
    BERT gets 15% of positions masked, with the loss only there."""
    if name != "bert":
        return {"input_ids": idx, "labels": idx}
    masked = torch.rand(idx.shape, generator=torch.Generator().manual_seed(seed)) < 0.15
    return {"input_ids": idx.masked_fill(masked, HF_MASK_ID), "labels": idx.masked_fill(~masked, -100)}


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits: (1797, 64) fp32 in [0, 1], (1797,) int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.int64)


@functools.cache
def stdlib_text(max_chars: int = 400_000) -> torch.Tensor:
    """ASCII codes (int64) of a fixed set of Python standard-library sources (non-ASCII -> '?')."""
    root = os.path.dirname(os.__file__)
    text = "".join(open(os.path.join(root, f), encoding="utf-8").read() for f in _CORPUS_FILES)
    data = torch.tensor(list(text[:max_chars].encode("ascii", "replace")), dtype=torch.int64)
    return data.clamp_max(127)


def char_batches(data: torch.Tensor, batch: int, block: int, steps: int, seed: int = 0):
    """Yield ``steps`` (inputs, targets) pairs of shape (batch, block) from ``data``."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - block - 1, (batch,), generator=gen)
        rows = torch.stack([data[s : s + block + 1] for s in starts.tolist()])
        yield rows[:, :-1], rows[:, 1:]
