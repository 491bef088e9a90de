"""The released Wan models' stages: small export wrappers around diffusers' and transformers'
own modules (nothing re-implemented), and their `StageSpec`s.

    text_encoder       ids, mask (B, 512) int64 -> prompt embeddings (B, 512, D), zero past each
                       prompt's tokens (the pipeline trims to the prompt and zero-pads to 512)
    image_encoder      Wan2.1 I2V: CLIP pixels (B, 3, S, S) -> the vision tower's penultimate
                       hidden states (B, N, D_img), as the pipeline takes them
    vae_encoder        TI2V's image (B, 3, 1, H, W) in [-1, 1] -> normalized latent (B, z, 1, h, w)
    vae_encoder_first  I2V: video frame 0 -> latent frame 0 + the encoder's feature caches
    vae_encoder_step   I2V: 4 video frames + caches -> one latent frame + the new caches
    dit, dit_2         latent, timestep, text embeddings (+ I2V's condition latents and Wan2.1's
                       image embeddings) -> velocity; the timestep is (B,), or (B, F, Hp, Wp) per
                       token for TI2V (flattened to diffusers' (B, F*Hp*Wp)). dit_2 is A14B's
                       low-noise expert, the same spec.
    dit_context        `--text-kv` builds: text embeddings (+ image embeddings) -> every block's
    (dit_2_context)    cross-attention keys and values, (B, 2 * layers, 512, dim) (+ (B, 2 * layers,
                       257, dim)), run once per video per expert; the step graph then takes them in
                       place of the embeddings.
    vae_decoder_first  latent frame 0 -> video frame 0 + the decoder's feature caches
    vae_decoder_step   one latent frame + caches -> 4 video frames + the new caches

The VAE decodes one latent frame per call with a cache of each causal conv's last two input
frames (diffusers' `feat_cache`); its frame loop does not export with dynamic frames, so the
loop stays in the runtime and the caches become graph inputs and outputs. The first chunk differs
(diffusers starts with empty caches, marks the upsamplers' time convs "Rep" and skips them, and
Wan2.2's DupUp3D drops its first frames), so it is its own graph. Its caches are handed on as two
frames, left-padded with zeros: a causal conv pads with zeros where a cache is short, and treats
"Rep" as no cache, so the step graph sees exactly what diffusers' second call computes.
The encoder (I2V's condition video) is streamed the same way, in diffusers' chunks of 1, 4, 4, ...
frames; its downsamplers' time convs keep one frame, skipped on the first chunk as diffusers does.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from runtime.stages import Dim, Geometry, StageSpec, TensorSpec, stream_decoder_specs, stream_encoder_specs

CACHE_T = 2  # frames of each causal conv's cache (diffusers' CACHE_T)


def _vae_module():
    from diffusers.models.autoencoders import autoencoder_kl_wan

    return autoencoder_kl_wan


def latent_stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) as (1, z, 1, 1, 1): the pipeline normalizes latents as (x - mean) * (1/std)."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
    return mean, inv_std


class TextEncoderStage(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids, mask):
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        # The pipeline keeps each prompt's first `mask.sum()` tokens and zero-pads the rest:
        # the tokenizer pads on the right, so that is the hidden states times the mask.
        return hidden * mask[..., None].to(hidden.dtype)


class ImageEncoderStage(nn.Module):
    """The VAE encoder on one frame (TI2V's image), the posterior mean, normalized."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        mean, inv_std = latent_stats(vae)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", inv_std, persistent=False)

    def forward(self, image):
        vae = self.vae
        x = image
        if vae.config.patch_size is not None:
            x = _vae_module().patchify(x, patch_size=vae.config.patch_size)  # (B, 3*p*p, 1, H/p, W/p)
        cache = [None] * vae._cached_conv_counts["encoder"]  # a first chunk starts with none
        h = vae.quant_conv(vae.encoder(x, feat_cache=cache, feat_idx=[0]))  # (B, 2z, 1, h, w)
        mu = h[:, : vae.config.z_dim]  # the posterior's mean: the pipeline's sample_mode="argmax"
        return (mu - self.mean) * self.inv_std


class CLIPStage(nn.Module):
    """transformers' CLIP vision tower: the penultimate layer's hidden states, as diffusers'
    WanImageToVideoPipeline.encode_image takes them (`hidden_states[-2]`)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixels):
        return self.encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # (B, N, D)


class EncoderChunkStage(nn.Module):
    """One chunk of the VAE encoder (1 frame first, then 4) with explicit caches: the posterior
    mean, normalized. `first`: diffusers' first call, with empty caches (the graph takes none)."""

    def __init__(self, vae, layout: list[tuple[int, int, int]], first: bool):
        super().__init__()
        self.vae, self.layout, self.first = vae, layout, first
        mean, inv_std = latent_stats(vae)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", inv_std, persistent=False)

    def forward(self, video, *caches):
        vae = self.vae
        x = video
        if vae.config.patch_size is not None:
            x = _vae_module().patchify(x, patch_size=vae.config.patch_size)  # (B, 3*p*p, n, H/p, W/p)
        cache = [None] * len(self.layout) if self.first else list(caches)
        h = vae.quant_conv(vae.encoder(x, feat_cache=cache, feat_idx=[0]))  # (B, 2z, 1, h, w)
        mu = h[:, : vae.config.z_dim]  # the posterior's mean: the pipeline's sample_mode="argmax"
        return ((mu - self.mean) * self.inv_std, *(left_pad(c, f) for c, (_, f, _) in zip(cache, self.layout)))


def left_pad(cache: torch.Tensor, frames: int) -> torch.Tensor:
    """A cache with fewer than `frames` frames, zero frames in front: what a causal conv pads."""
    if cache.shape[2] >= frames:
        return cache
    return torch.cat([cache.new_zeros(*cache.shape[:2], frames - cache.shape[2], *cache.shape[3:]), cache], dim=2)


@torch.no_grad()
def encoder_cache_layout(vae) -> list[tuple[int, int, int]]:
    """(channels, frames, scale) of each encoder cache after a 4-frame chunk (its steady state),
    scale relative to the latent's height, found by encoding 1 + 4 frames of a small video eagerly."""
    h = 4
    p = vae.config.patch_size or 1
    side = h * vae.config.scale_factor_spatial // p  # the encoder's input, patchified
    cache, used = [None] * vae._cached_conv_counts["encoder"], [0]
    for frames in (1, 4):
        used = [0]
        vae.encoder(torch.zeros(1, 3 * p * p, frames, side, side), feat_cache=cache, feat_idx=used)
    return [(int(c.shape[1]), int(c.shape[2]), int(c.shape[3]) // h) for c in cache[: used[0]]]


class DiTStage(nn.Module):
    """diffusers' transformer. `extra` names the inputs after (latent, timestep, text) that this
    model takes: "condition" (I2V: mask + image latents, concatenated to the latent on channels as
    the pipeline does) and "image" (Wan2.1 I2V's CLIP embeddings)."""

    def __init__(self, transformer, per_token_timestep: bool, extra: tuple[str, ...] = ()):
        super().__init__()
        self.transformer = transformer
        self.per_token = per_token_timestep
        self.extra = extra

    def forward(self, latent, timestep, text, *extra):
        given = dict(zip(self.extra, extra))
        t = timestep.flatten(1) if self.per_token else timestep  # (B, F, Hp, Wp) -> (B, F*Hp*Wp)
        x = latent
        if "condition" in given:
            x = torch.cat([latent, given["condition"]], dim=1)  # (B, z + 4 + z, F, h, w)
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text,
                                encoder_hidden_states_image=given.get("image"), return_dict=False)[0]


def context_kv(transformer, text, image=None):
    """Every block's cross-attention keys and values of the text (and image) tokens, as diffusers'
    WanAttnProcessor computes them: the condition embedder's projections, then per block
    norm_k(to_k), to_v (and norm_added_k(add_k_proj), add_v_proj); no RoPE in cross-attention,
    so nothing here depends on the step. Returns (B, 2 * layers, S, dim) stacks, k before v."""
    emb = transformer.condition_embedder
    ctx = emb.text_embedder(text)  # (B, 512, dim)
    attn = [block.attn2 for block in transformer.blocks]
    text_kv = torch.stack([t for a in attn for t in (a.norm_k(a.to_k(ctx)), a.to_v(ctx))], dim=1)
    if image is None:
        return (text_kv,)
    img = emb.image_embedder(image)  # (B, 257, dim)
    image_kv = torch.stack([t for a in attn for t in (a.norm_added_k(a.add_k_proj(img)), a.add_v_proj(img))], dim=1)
    return text_kv, image_kv


class ContextStage(nn.Module):
    """`dit_context`: text (+ image) embeddings -> the K/V stacks of `context_kv`."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, text, *image):
        return context_kv(self.transformer, text, *image)


def _transformer_module():
    from diffusers.models.transformers import transformer_wan

    return transformer_wan


@contextmanager
def ort_attention():
    """While active, diffusers' Wan attention processors (and `CachedKVProcessor`) compute their
    attention through export/kernels.py's `wan::attention` op, which exports as ONNX Runtime's
    fused com.microsoft.MultiHeadAttention on (B, L, heads x dim) tokens: the DiT's ONNX Runtime
    graph. Only the attention call is swapped (diffusers' projections, norms, RoPE and I2V
    image branch stay its own); the portable export writes the same attention as MatMul /
    Softmax with transposes around them, 20% of a Wan-width step on the CPU (docs/performance.md)."""
    from export.kernels import ONNX_RUNTIME

    module = _transformer_module()

    def attend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **_):
        # (B, L, H, Dh) each, as diffusers passes them; Wan's attention has no mask or dropout
        assert attn_mask is None and dropout_p == 0.0 and not is_causal
        heads = query.shape[2]
        out = ONNX_RUNTIME.attention(query.flatten(2), key.flatten(2), value.flatten(2), heads)  # (B, L, H*Dh)
        return out.unflatten(2, (heads, -1))  # (B, L, H, Dh)

    original = module.dispatch_attention_fn
    module.dispatch_attention_fn = attend
    try:
        yield
    finally:
        module.dispatch_attention_fn = original


class CachedKVProcessor:
    """An attn2 processor that takes its keys and values from `kv` (set by KVDiTStage before each
    forward) instead of projecting the context: diffusers' WanAttnProcessor with its K/V
    projections moved out (the query side, the attention calls and the output are its own)."""

    def __init__(self):
        self.kv: tuple[torch.Tensor, ...] = ()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        dispatch_attention_fn = _transformer_module().dispatch_attention_fn  # (ort_attention may swap it)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # (B, L, H, Dh)
        # each (B, S, dim) -> (B, S, H, Dh): k, v (+ k_img, v_img)
        key, value, *image = (t.unflatten(2, (attn.heads, -1)) for t in self.kv)
        out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).type_as(query)  # (B, L, dim)
        if image:  # I2V: a second attention over the image tokens, added (as diffusers does)
            out = out + dispatch_attention_fn(query, *image, attn_mask=None, dropout_p=0.0,
                                              is_causal=False).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class KVDiTStage(DiTStage):
    """The step graph of a `--text-kv` build: latent, timestep, text_kv (+ condition, image_kv)
    -> velocity. The transformer gets a one-token dummy context (its text projection is then
    negligible and its output unused: every attn2 reads the given K/V)."""

    def __init__(self, transformer, per_token_timestep: bool, extra: tuple[str, ...] = ()):
        super().__init__(transformer, per_token_timestep, tuple(n for n in extra if n != "image_kv"))
        self.image = "image_kv" in extra
        self.processors = [CachedKVProcessor() for _ in transformer.blocks]
        for block, processor in zip(transformer.blocks, self.processors):
            block.attn2.set_processor(processor)

    def forward(self, latent, timestep, text_kv, *extra):
        image_kv = extra[-1] if self.image else None
        for i, processor in enumerate(self.processors):  # (B, 2 * layers, S, dim) -> this block's (B, S, dim)
            processor.kv = (text_kv[:, 2 * i], text_kv[:, 2 * i + 1],
                            *(() if image_kv is None else (image_kv[:, 2 * i], image_kv[:, 2 * i + 1])))
        dummy = latent.new_zeros(latent.shape[0], 1, self.transformer.config.text_dim)  # (B, 1, text_dim)
        return super().forward(latent, timestep, dummy, *(extra[:-1] if self.image else extra))


class _DecoderChunk(nn.Module):
    """Shared by the two decoder graphs: denormalize, post_quant_conv, the decoder on one latent
    frame with `cache`, unpatchify, clamp; returns the video and the caches, each two frames."""

    def __init__(self, vae, layout: list[tuple[int, int, int]] | None = None):
        super().__init__()
        self.vae = vae
        self.layout = layout  # (channels, frames, scale of the latent's h) per cache
        mean, inv_std = latent_stats(vae)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", inv_std, persistent=False)

    def run(self, latent, cache: list, first: bool):
        vae = self.vae
        x = vae.post_quant_conv(latent / self.inv_std + self.mean)  # (B, z, 1, h, w)
        out = vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first)
        if vae.config.patch_size is not None:
            out = _vae_module().unpatchify(out, patch_size=vae.config.patch_size)
        return (out.clamp(-1.0, 1.0), *self.padded(cache, latent))

    def padded(self, cache: list, latent) -> list[torch.Tensor]:
        """Every cache as CACHE_T frames: short ones left-padded with zeros, "Rep" as zeros."""
        B, _, _, h, w = latent.shape
        return [latent.new_zeros(B, c, f, h * k, w * k) if isinstance(entry, str)  # "Rep": not run yet
                else left_pad(entry, CACHE_T) for entry, (c, f, k) in zip(cache, self.layout)]


class DecoderFirstStage(_DecoderChunk):
    def forward(self, latent):
        return self.run(latent, [None] * len(self.layout), first=True)


class DecoderStepStage(_DecoderChunk):
    def forward(self, latent, *caches):
        return self.run(latent, list(caches), first=False)


@torch.no_grad()
def decoder_cache_layout(vae) -> list[tuple[int, int, int]]:
    """(channels, CACHE_T, scale) of each decoder cache, scale relative to the latent's height,
    found by decoding two latent frames of a small latent eagerly."""
    h = w = 4
    z = torch.zeros(1, vae.config.z_dim, 1, h, w)
    cache = [None] * vae._cached_conv_counts["decoder"]  # an upper bound: 1x1 shortcut convs take none
    for first in (True, False):
        used = [0]
        vae.decoder(vae.post_quant_conv(z), feat_cache=cache, feat_idx=used, first_chunk=first)
    return [(int(c.shape[1]), CACHE_T, int(c.shape[3]) // h) for c in cache[: used[0]]]


def wan_geometry(vae_config: dict) -> Geometry:
    return Geometry(latent_channels=vae_config.get("z_dim", 16),
                    temporal_stride=vae_config.get("scale_factor_temporal", 4),
                    spatial_stride=vae_config.get("scale_factor_spatial", 8), patch=(2, 2))


@dataclass(frozen=True)
class WanStages:
    """What a checkpoint's stages are, and their specs: the one place their shapes are written."""

    geometry: Geometry
    text_dim: int
    text_length: int
    condition: str  # "text", "first_frame" (TI2V) or "latents" (I2V): WanCheckpoint.condition
    experts: int = 1  # 2: A14B's dit (high noise) and dit_2 (low noise)
    clip: tuple[int, int, int] | None = None  # Wan2.1 I2V: (image side, tokens, embedding dim)
    # (channels, frames, scale relative to the latent's height) per cache: decoder_cache_layout,
    # encoder_cache_layout; the VAE stages' specs need them, the others do not
    decoder_caches: tuple[tuple[int, int, int], ...] | None = None
    encoder_caches: tuple[tuple[int, int, int], ...] | None = None
    # --text-kv: (layers, dim) of the transformer; its experts get a context stage each
    text_kv: tuple[int, int] | None = None

    @property
    def dits(self) -> tuple[str, ...]:
        return ("dit", "dit_2")[: self.experts]

    def dit_stages(self) -> list[str]:
        """The DiT stages, each after its context stage in --text-kv builds."""
        return [n for d in self.dits for n in ((f"{d}_context", d) if self.text_kv else (d,))]

    def names(self) -> list[str]:
        """Every stage, in the order the runtime runs them."""
        return ["text_encoder", *(["image_encoder"] if self.clip else []),
                *({"text": [], "first_frame": ["vae_encoder"],
                   "latents": ["vae_encoder_first", "vae_encoder_step"]}[self.condition]),
                *self.dit_stages(), "vae_decoder_first", "vae_decoder_step"]

    def specs(self) -> dict[str, StageSpec]:
        geom = self.geometry
        ph, pw = geom.patch
        sh, sw = geom.pixels_per_token
        B, C = Dim("B"), Dim.fixed(geom.latent_channels)
        grid = (Dim("F"), Dim("Hp", ph), Dim("Wp", pw))
        latent = (B, C, *grid)
        text = TensorSpec("text", (B, Dim.fixed(self.text_length), Dim.fixed(self.text_dim)))
        timestep = (B, Dim("F"), Dim("Hp"), Dim("Wp")) if self.condition == "first_frame" else (B,)
        dit_inputs = [TensorSpec("latent", latent), TensorSpec("timestep", timestep, value_range=(0.0, 1000.0)),
                      text]
        if self.condition == "latents":  # frame mask (one channel per video frame) + image latents
            mask = geom.temporal_stride
            dit_inputs.append(TensorSpec("condition", (B, Dim.fixed(mask + geom.latent_channels), *grid)))
        specs = {
            "text_encoder": StageSpec(
                "text_encoder",
                inputs=(TensorSpec("ids", (B, text.dims[1]), "int64", value_range=(0, 32)),
                        TensorSpec("mask", (B, text.dims[1]), "int64", value_range=(0, 2))),
                outputs=(text,),
                batch=2,  # the prompt and the negative prompt
            ),
        }
        if self.clip:
            side, tokens, dim = self.clip
            image = TensorSpec("image", (B, Dim.fixed(tokens), Dim.fixed(dim)))
            specs["image_encoder"] = StageSpec(
                "image_encoder", (TensorSpec("pixels", (B, Dim.fixed(3), Dim.fixed(side), Dim.fixed(side))),),
                (image,))
            dit_inputs.append(image)
        context = [t for t in dit_inputs if t.name in ("text", "image")]
        if self.text_kv:  # the step takes the K/V stacks in their place
            layers, dim = self.text_kv
            kv = {t.name: TensorSpec(f"{t.name}_kv", (B, Dim.fixed(2 * layers), t.dims[1], Dim.fixed(dim)))
                  for t in context}  # (B, 2 * layers, S, dim): k, v of each block
            dit_inputs = [kv.get(t.name, t) for t in dit_inputs]
        for name in self.dits:
            specs[name] = StageSpec(name, tuple(dit_inputs), (TensorSpec("velocity", latent),), batch=2)  # CFG
            if self.text_kv:
                specs[f"{name}_context"] = StageSpec(f"{name}_context", tuple(context), tuple(kv.values()), batch=2)
        if self.condition == "first_frame":
            specs["vae_encoder"] = StageSpec(
                "vae_encoder",
                inputs=(TensorSpec("image", (B, Dim.fixed(3), Dim.fixed(1), Dim("Hp", sh), Dim("Wp", sw)),
                                   value_range=(-1.0, 1.0)),),
                outputs=(TensorSpec("latent", (B, C, Dim.fixed(1), Dim("Hp", ph), Dim("Wp", pw))),),
            )
        # cache scales are relative to the latent's height 2*Hp: Dim("Hp", 2 * k)
        if self.condition == "latents" and self.encoder_caches is not None:
            specs.update(stream_encoder_specs(geom, [(c, f, ph * k) for c, f, k in self.encoder_caches]))
        if self.decoder_caches is not None:
            specs.update(stream_decoder_specs(geom, [(c, f, ph * k) for c, f, k in self.decoder_caches]))
        return specs
