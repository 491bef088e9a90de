"""The released Wan models' stages: small export wrappers around diffusers' and transformers'
own modules (nothing re-implemented), and their `StageSpec`s.

    text_encoder       ids, mask (B, 512) int64 -> prompt embeddings (B, 512, D), zero past each
                       prompt's tokens (the pipeline trims to the prompt and zero-pads to 512)
    vae_encoder        TI2V's image (B, 3, 1, H, W) in [-1, 1] -> normalized latent (B, z, 1, h, w)
    dit                latent, timestep, text embeddings -> velocity; the timestep is (B,), or
                       (B, F, Hp, Wp) per token for TI2V (flattened to diffusers' (B, F*Hp*Wp))
    vae_decoder_first  latent frame 0 -> video frame 0 + the decoder's feature caches
    vae_decoder_step   one latent frame + caches -> 4 video frames + the new caches

The VAE decodes one latent frame per call with a cache of each causal conv's last two input
frames (diffusers' `feat_cache`); its frame loop does not export with dynamic frames, so the
loop stays in the runtime and the caches become graph inputs and outputs. The first chunk differs
(diffusers starts with empty caches, marks the upsamplers' time convs "Rep" and skips them, and
Wan2.2's DupUp3D drops its first frames), so it is its own graph. Its caches are handed on as two
frames, left-padded with zeros: a causal conv pads with zeros where a cache is short, and treats
"Rep" as no cache, so the step graph sees exactly what diffusers' second call computes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from runtime.stages import Dim, Geometry, StageSpec, TensorSpec, stream_decoder_specs

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


class DiTStage(nn.Module):
    def __init__(self, transformer, per_token_timestep: bool):
        super().__init__()
        self.transformer = transformer
        self.per_token = per_token_timestep

    def forward(self, latent, timestep, text):
        t = timestep.flatten(1) if self.per_token else timestep  # (B, F, Hp, Wp) -> (B, F*Hp*Wp)
        return self.transformer(hidden_states=latent, timestep=t, encoder_hidden_states=text,
                                return_dict=False)[0]


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
        out = []
        for entry, (c, f, k) in zip(cache, self.layout):
            if isinstance(entry, str):  # "Rep": an upsampler's time conv that has not run yet
                entry = latent.new_zeros(B, c, f, h * k, w * k)
            elif entry.shape[2] < CACHE_T:
                entry = torch.cat([entry.new_zeros(*entry.shape[:2], CACHE_T - entry.shape[2],
                                                   *entry.shape[3:]), entry], dim=2)
            out.append(entry)
        return out


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


def wan_stage_specs(geom: Geometry, text_dim: int, text_length: int, per_token_timestep: bool,
                    takes_image: bool, cache_layout: list[tuple[int, int, int]] | None) -> dict[str, StageSpec]:
    """Every stage's spec; the streaming decoder's only with its `cache_layout` (which needs
    the VAE: `decoder_cache_layout`)."""
    ph, pw = geom.patch
    sh, sw = geom.pixels_per_token
    B, C = Dim("B"), Dim.fixed(geom.latent_channels)
    latent = (B, C, Dim("F"), Dim("Hp", ph), Dim("Wp", pw))
    L = Dim.fixed(text_length)
    timestep = (B, Dim("F"), Dim("Hp"), Dim("Wp")) if per_token_timestep else (B,)
    specs = {
        "text_encoder": StageSpec(
            "text_encoder",
            inputs=(TensorSpec("ids", (B, L), "int64", value_range=(0, 32)),
                    TensorSpec("mask", (B, L), "int64", value_range=(0, 2))),
            outputs=(TensorSpec("text", (B, L, Dim.fixed(text_dim))),),
        ),
        "dit": StageSpec(
            "dit",
            inputs=(TensorSpec("latent", latent),
                    TensorSpec("timestep", timestep, value_range=(0.0, 1000.0)),
                    TensorSpec("text", (B, L, Dim.fixed(text_dim)))),
            outputs=(TensorSpec("velocity", latent),),
        ),
    }
    if takes_image:
        specs["vae_encoder"] = StageSpec(
            "vae_encoder",
            inputs=(TensorSpec("image", (B, Dim.fixed(3), Dim.fixed(1), Dim("Hp", sh), Dim("Wp", sw)),
                               value_range=(-1.0, 1.0)),),
            outputs=(TensorSpec("latent", (B, C, Dim.fixed(1), Dim("Hp", ph), Dim("Wp", pw))),),
        )
    if cache_layout is None:
        return specs
    # cache scales are relative to the latent's height 2*Hp: Dim("Hp", 2 * k)
    layout = [(c, f, ph * k) for c, f, k in cache_layout]
    return {**specs, **stream_decoder_specs(geom, layout)}
