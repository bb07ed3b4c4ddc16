"""Small models for the model-matrix and dynamic-shape tests: `transformers` architectures from tiny
configs (2 layers, hidden 64, vocabulary 128; no downloads) and hand-built CNNs (torchvision is not
a dependency), with seeded batches of real data.

Every model is called as ``model(**batch)`` and :func:`loss_of` turns its output into the scalar
loss, so one training loop serves them all. Text models read stdlib source characters
(:func:`fxlowbit.examples.stdlib_text`), vision models and CNNs scikit-learn's 8x8 digits (bilinearly
upsampled to 16x16 for the patch models), normalised to [-1, 1] as image processors do: raw digits'
blank patches, through a zero-initialised patch-embedding bias, would give all-zero LayerNorm rows
(DeiT's zero-initialised CLS token has them anyway; see test_model_matrix.py).
Dropout keeps each config's default.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxlowbit import examples

VOCAB, SEQ, TEXT_BATCH = examples.HF_VOCAB, 64, 4
IMAGE, IMAGE_BATCH = 16, 16
# "model name": architecture family, for the matrix's coverage check and test ids
FAMILY = {
    "gpt2": "decoder",
    "llama": "decoder",
    "mistral": "decoder",
    "qwen2": "decoder",
    "qwen3": "decoder",
    "gemma": "decoder",
    "phi": "decoder",
    "gpt_neox": "decoder",
    "opt": "decoder",
    "bert": "encoder",
    "roberta": "encoder",
    "distilbert": "encoder",
    "electra": "encoder",
    "t5": "encoder-decoder",
    "bart": "encoder-decoder",
    "vit": "vision",
    "deit": "vision",
    "convnext": "vision",
    "swin": "vision",
    "cnn": "cnn",
    "resnet": "cnn",
    # architectures nobody tuned for (issue 15): MoE routing, softcaps, audio, two towers, scans
    "qwen3_moe": "moe",
    "mixtral": "moe",
    "gemma2": "decoder",
    "phi3": "decoder",
    "falcon": "decoder",
    "modernbert": "encoder",
    "whisper": "audio",
    "clip": "multimodal",
    "mamba": "ssm",
    "mbconv": "cnn",
}


def loss_of(out) -> torch.Tensor:
    """The scalar loss of a model's output: a `transformers` ModelOutput's ``.loss`` or the tensor."""
    return out if isinstance(out, torch.Tensor) else out.loss


def build(name: str, seed: int = 0) -> nn.Module:
    """Seeded model ``name`` (a key of :data:`FAMILY`) in train mode."""
    torch.manual_seed(seed)
    if FAMILY[name] == "cnn":
        return {"cnn": CNN, "resnet": TinyResNet, "mbconv": MBConvNet}[name]().train()
    return _hf(name).train()


def batch(name: str, step: int = 0, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Keyword inputs of ``name`` for training step ``step``. ``size``: (batch, sequence length) for
    text models, (batch, image side) for vision models; default the matrix's sizes."""
    family = FAMILY[name]
    if family == "audio":  # log-spectrogram features of a signal made from the text, and the text
        b, t = size or (TEXT_BATCH, SEQ)
        return {"input_features": _features(b, step), "labels": _text(b, t, step)}
    if family == "multimodal":  # digits and their captions ("digit 7 ..."), contrastive loss
        b, t = size or (IMAGE_BATCH, 8)
        x, y = _images(b, IMAGE, step)
        return {"input_ids": _captions(y, t), "pixel_values": x, "return_loss": True}
    if family in ("vision", "cnn"):
        b, side = size or (IMAGE_BATCH, IMAGE if family == "vision" else 8)
        x, y = _images(b, side, step)
        return {"pixel_values": x, "labels": y}
    b, t = size or (TEXT_BATCH, SEQ)
    if family == "encoder-decoder":  # continue the text: the second half from the first
        rows = _text(b, 2 * t, step)
        return {"input_ids": rows[:, :t].contiguous(), "labels": rows[:, t:].contiguous()}
    idx = _text(b, t, step)
    if family in ("encoder",):  # masked LM: 15% of positions masked, the loss only there
        return examples.hf_batch("bert", idx, seed=step)
    return {"input_ids": idx, "labels": idx}  # causal LM: the model shifts the labels


MEL_BINS, FRAMES = 16, 64  # Whisper's input: (b, MEL_BINS, FRAMES), FRAMES = 2 * max_source_positions


@functools.cache
def _features(b: int, step: int) -> torch.Tensor:
    # (b, MEL_BINS, FRAMES): log-magnitude STFT of a tone sequence whose pitches follow stdlib text
    codes = _text(b, FRAMES // 4, step).float()  # (b, FRAMES/4) character codes
    freq = 0.02 + 0.3 * codes / VOCAB  # cycles per sample, one tone per character
    phase = torch.cumsum(freq.repeat_interleave(2 * (MEL_BINS - 1), dim=1), dim=1)  # (b, n)
    spec = torch.stft(
        torch.sin(2 * torch.pi * phase),
        2 * (MEL_BINS - 1),
        hop_length=phase.shape[1] // FRAMES,
        window=torch.hann_window(2 * (MEL_BINS - 1)),
        return_complex=True,
    ).abs()
    return torch.log1p(spec[:, :, :FRAMES]).contiguous()


def _captions(labels: torch.Tensor, t: int) -> torch.Tensor:
    # (b,) digit labels -> (b, t) character codes of "digit N " repeated
    rows = [list(f"digit {int(y)} ".encode() * t)[:t] for y in labels]
    return torch.tensor(rows) % VOCAB


def _text(b: int, t: int, step: int) -> torch.Tensor:
    return list(examples.char_batches(examples.stdlib_text(), b, t, steps=step + 1, seed=0))[step][0]


@functools.cache
def _images(b: int, side: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # digits: (N, 64) in [0, 1] -> pixel_values: (b, 1, side, side) in [-1, 1], labels: (b,)
    x, y = examples.digits()
    rows = torch.arange(step * b, (step + 1) * b) % len(y)
    img = x[rows].view(b, 1, 8, 8)
    if side != 8:
        img = F.interpolate(img, size=(side, side), mode="bilinear", align_corners=False)
    # normalised to [-1, 1] as transformers' image processors do (mean 0.5, std 0.5)
    return ((img - 0.5) / 0.5).contiguous(), y[rows]


class CNN(nn.Module):
    """:class:`fxlowbit.examples.SmallCNN` (conv-BN-ReLU-MaxPool x2, dropout 0.1, linear) with its
    cross-entropy, for 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.net = examples.SmallCNN()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(pixel_values), labels)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class TinyResNet(nn.Module):
    """ResNet-style: stem conv-BN-ReLU, residual block, 2x2 average pool, residual block, global
    average pool, dropout 0.2, linear; with its cross-entropy, for 8x8 digits."""

    def __init__(self, c: int = 32, n_out: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            _Residual(c),
            nn.AvgPool2d(2),
            _Residual(c),
            *_pooled_head(c, n_out),
        )

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(pixel_values), labels)


def _pooled_head(c: int, n_out: int) -> list[nn.Module]:
    """Global average pool, dropout 0.2, linear: the classifier of both ResNet-style CNNs."""
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(c, n_out)]


class _MBConv(nn.Module):
    """Inverted residual of the timm kind: 1x1 expand, depthwise 3x3, squeeze-excite, 1x1 project."""

    def __init__(self, c: int, expand: int = 4, act: type[nn.Module] = nn.SiLU):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), act())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), act())
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(h, h // 8, 1),
            nn.ReLU(),
            nn.Conv2d(h // 8, h, 1),
            nn.Hardsigmoid(),
        )
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.expand(x))
        return x + self.project(y * self.se(y))


class MBConvNet(nn.Module):
    """MobileNetV3 / EfficientNet-style: hardswish stem, SiLU and hardswish inverted residuals with
    depthwise convolutions and squeeze-excite, global pool, dropout 0.2, linear; for 8x8 digits."""

    def __init__(self, c: int = 16, n_out: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.Hardswish(),
            _MBConv(c, act=nn.SiLU),
            _MBConv(c, act=nn.Hardswish),
            *_pooled_head(c, n_out),
        )

    forward = TinyResNet.forward


def _hf(name: str) -> nn.Module:
    import transformers as tf

    tf.logging.set_verbosity_error()
    text = dict(vocab_size=VOCAB, max_position_embeddings=2 * SEQ, use_cache=False)
    llama_like = dict(text, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=176)  # fmt: skip
    encoder = dict(vocab_size=VOCAB, max_position_embeddings=2 * SEQ, num_hidden_layers=2, hidden_size=64,
                   num_attention_heads=4, intermediate_size=256)  # fmt: skip
    vision = dict(image_size=IMAGE, num_channels=1, num_labels=10)
    vit = dict(vision, patch_size=2, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
               intermediate_size=256)  # fmt: skip
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=2 * SEQ, n_layer=2, n_embd=64, n_head=4,
                            bos_token_id=2, eos_token_id=3, use_cache=False)  # fmt: skip
        return tf.GPT2LMHeadModel(cfg)
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**llama_like))
    if name == "mistral":
        # a sliding window shorter than the sequence: the one thing that sets it apart from Llama
        return tf.MistralForCausalLM(tf.MistralConfig(**llama_like, head_dim=16, sliding_window=SEQ // 4))
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like))
    if name == "qwen3":  # RMSNorm on each head's queries and keys
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**llama_like, head_dim=16))
    if name == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**llama_like, head_dim=16))
    if name == "phi":
        cfg = tf.PhiConfig(**{**llama_like, "num_key_value_heads": 4}, partial_rotary_factor=0.5)
        return tf.PhiForCausalLM(cfg)
    if name == "gpt_neox":
        cfg = tf.GPTNeoXConfig(**{**llama_like, "num_key_value_heads": None}, rotary_pct=0.5)
        return tf.GPTNeoXForCausalLM(cfg)
    if name == "opt":
        cfg = tf.OPTConfig(vocab_size=VOCAB, max_position_embeddings=2 * SEQ, num_hidden_layers=2,
                           hidden_size=64, num_attention_heads=4, ffn_dim=256, word_embed_proj_dim=64,
                           pad_token_id=0, bos_token_id=2, eos_token_id=3, use_cache=False)  # fmt: skip
        return tf.OPTForCausalLM(cfg)
    if name == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(**encoder))
    if name == "roberta":  # pad id 0: its positions count non-pad tokens, and id 1 is our mask token
        cfg = tf.RobertaConfig(**encoder, pad_token_id=0, bos_token_id=2, eos_token_id=3)
        return tf.RobertaForMaskedLM(cfg)
    if name == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=VOCAB, max_position_embeddings=2 * SEQ, n_layers=2, dim=64,
                                  n_heads=4, hidden_dim=256)  # fmt: skip
        return tf.DistilBertForMaskedLM(cfg)
    if name == "electra":
        return tf.ElectraForMaskedLM(tf.ElectraConfig(**encoder, embedding_size=32))
    if name == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=2,
                          num_heads=4, decoder_start_token_id=0, pad_token_id=0, use_cache=False)  # fmt: skip
        return tf.T5ForConditionalGeneration(cfg)
    if name == "bart":
        cfg = tf.BartConfig(vocab_size=VOCAB, max_position_embeddings=2 * SEQ, d_model=64, encoder_layers=2,
                            decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                            encoder_ffn_dim=256, decoder_ffn_dim=256, use_cache=False)  # fmt: skip
        return tf.BartForConditionalGeneration(cfg)
    if name == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(**vit))
    if name == "deit":
        return tf.DeiTForImageClassification(tf.DeiTConfig(**vit))
    if name == "convnext":
        cfg = tf.ConvNextConfig(**vision, patch_size=2, num_stages=2, hidden_sizes=[32, 64], depths=[1, 1])
        return tf.ConvNextForImageClassification(cfg)
    if name == "swin":
        cfg = tf.SwinConfig(
            **vision, patch_size=2, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4
        )
        return tf.SwinForImageClassification(cfg)
    moe = dict(llama_like, head_dim=16, num_experts_per_tok=2)
    if name == "qwen3_moe":  # 4 experts, top-2, every layer sparse
        cfg = tf.Qwen3MoeConfig(**moe, num_experts=4, moe_intermediate_size=64, decoder_sparse_step=1)
        return tf.Qwen3MoeForCausalLM(cfg)
    if name == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**moe, num_local_experts=4))
    if name == "gemma2":  # logit softcaps, alternating sliding-window layers
        cfg = tf.Gemma2Config(
            **llama_like,
            head_dim=16,
            sliding_window=SEQ // 4,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        )
        return tf.Gemma2ForCausalLM(cfg)
    if name == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**llama_like, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    if name == "falcon":  # parallel attention + MLP, multi-query attention
        cfg = tf.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=2 * SEQ,
            bos_token_id=2,
            eos_token_id=3,
            use_cache=False,
        )
        return tf.FalconForCausalLM(cfg)
    if name == "modernbert":  # alternating local / global attention, GeGLU, no biases
        cfg = tf.ModernBertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=2 * SEQ,
            local_attention=16,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            cls_token_id=2,
            sep_token_id=3,
        )
        return tf.ModernBertForMaskedLM(cfg)
    if name == "whisper":
        cfg = tf.WhisperConfig(
            vocab_size=VOCAB,
            num_mel_bins=MEL_BINS,
            encoder_layers=2,
            decoder_layers=2,
            d_model=64,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=256,
            decoder_ffn_dim=256,
            max_source_positions=FRAMES // 2,
            max_target_positions=2 * SEQ,
            decoder_start_token_id=2,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            suppress_tokens=None,
            begin_suppress_tokens=None,
            use_cache=False,
        )
        return tf.WhisperForConditionalGeneration(cfg)
    if name == "clip":  # two towers, contrastive loss over the batch
        text_cfg = dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=SEQ,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        vision_cfg = dict(
            image_size=IMAGE,
            patch_size=2,
            num_channels=1,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
        cfg = tf.CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=32)
        return tf.CLIPModel(cfg)
    if name == "mamba":  # selective state-space scan (the sequential CPU path)
        cfg = tf.MambaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            state_size=8,
            num_hidden_layers=2,
            expand=2,
            conv_kernel=4,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            use_cache=False,
        )
        return tf.MambaForCausalLM(cfg)
    raise KeyError(f"unknown model {name!r}; valid: {sorted(FAMILY)}")
