"""Causal 3D VAE modelled on the Wan 2.1 VAE (parameter names follow it).

Stride (4, 8, 8): a video of T = 4n + 1 frames becomes 1 + n latent frames. Frame 0 is encoded
on its own (a still image is a 1-frame video); every convolution pads time on the left only, so
latent frame k depends on video frames <= 4k and the decoder can later run frame by frame.
Differences from Wan, kept small on purpose: no attention in the middle block, and the whole
clip is processed in one call instead of Wan's chunk-and-cache loop (same result for causal
convolutions with zero initial cache).

Encoder output and decoder input are *normalized* latents: (mu - latent_mean) / latent_std,
per channel; the constants are buffers saved with the weights and written to the manifest.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from export.config import VAEConfig


class FrameCache:
    """Time context for decoding a clip a few frames at a time (streaming).

    Each causal conv with temporal kernel k needs the k-1 input frames before the current
    chunk; the whole-clip decoder gets them by zero padding. A `FrameCache` carries them across
    calls instead: convs read `inputs` in call order and append their new context to
    `outputs`, which the next call takes as its `inputs`. `first` marks the chunk holding
    frame 0 (zero context, and upsample3d drops the extra frame it makes of frame 0), so
    chunk-by-chunk decoding reproduces the whole-clip result.
    """

    def __init__(self, inputs: list | None = None):
        self.inputs, self.outputs, self._next = inputs, [], 0

    @property
    def first(self) -> bool:
        return self.inputs is None

    def context(self, x, frames: int):
        """The `frames` input frames before x: cached, or zeros before frame 0."""
        if self.inputs is None:
            B, C, _, H, W = x.shape
            return x.new_zeros((B, C, frames, H, W))
        self._next += 1
        return self.inputs[self._next - 1]


class CausalConv3d(nn.Conv3d):
    """Conv3d padding time on the left only, so output frame t never sees input frames > t."""

    def __init__(self, in_dim, out_dim, kernel_size, stride=1, padding=0):
        super().__init__(in_dim, out_dim, kernel_size, stride, padding=0)
        pt, ph, pw = nn.modules.utils._triple(padding)
        self.time_pad = 2 * pt
        self._causal_pad = (pw, pw, ph, ph, self.time_pad, 0)  # F.pad order: W, H, then T (left only)

    def forward(self, x, cache: FrameCache | None = None):
        if cache is None or self.time_pad == 0:
            return super().forward(F.pad(x, self._causal_pad))
        x = torch.cat([cache.context(x, self.time_pad), x], dim=2)  # (B, C, pad + n, H, W)
        cache.outputs.append(x[:, :, -self.time_pad:])
        return super().forward(F.pad(x, self._causal_pad[:4]))


class RMS_norm(nn.Module):
    """RMS norm over channels (dim 1) of a (B, C, T, H, W) tensor, as in Wan's VAE."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps) * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, eps), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, eps), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache: FrameCache | None = None):
        return self.shortcut(x) + run(self.residual, x, cache)


def run(layers: nn.Sequential, x, cache: FrameCache | None):
    """nn.Sequential's loop, handing the frame cache to the layers that take one."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)) else layer(x)
    return x


def per_frame(fn, x):
    """Apply a 2D module to every frame: (B, C, T, H, W) -> (B*T, C, H, W) -> back."""
    B, C, T, H, W = x.shape
    y = fn(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B*T, C', H', W')
    return y.reshape(B, T, *y.shape[1:]).transpose(1, 2)  # (B, C', T, H', W')


class Resample(nn.Module):
    """Wan's resampling: 2x spatial per frame, plus a causal time conv in the 3D modes.

    downsample3d: a causal conv with kernel 3, stride 2: frames (2k-2, 2k-1, 2k) -> frame k,
                  zeros before frame 0, so 2m + 1 frames -> m + 1 (a single frame stays one).
    upsample3d:   a causal conv to 2C channels makes two frames of every frame (interleaved);
                  the first of frame 0's pair is dropped, so m + 1 frames -> 2m + 1.
    Neither special-cases frame 0, so both run unchanged when the clip is one frame.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))

    def forward(self, x, cache: FrameCache | None = None):
        if self.mode == "upsample3d":
            B, C, T, H, W = x.shape
            y = self.time_conv(x, cache).reshape(B, 2, C, T, H, W)
            x = torch.stack([y[:, 0], y[:, 1]], dim=3).reshape(B, C, 2 * T, H, W)  # interleave pairs
            if cache is None or cache.first:
                x = x[:, :, 1:]  # (B, C, 2T-1, H, W): frame 0 makes one frame, not two
        x = per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self.time_conv(x)  # (B, C, (T-1)/2 + 1, H, W)
        return x


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, cfg.eps))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1], cfg.eps),
                                    ResidualBlock(dims[-1], dims[-1], cfg.eps))
        self.head = nn.Sequential(RMS_norm(dims[-1], cfg.eps), nn.SiLU(),
                                  CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1))

    def forward(self, x):
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], cfg.eps),
                                    ResidualBlock(dims[0], dims[0], cfg.eps))
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous upsample's conv halved the channels (as in Wan)
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, cfg.eps))
                in_dim = out_dim
            if i < len(mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(dims[-1], cfg.eps), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, z, cache: FrameCache | None = None):
        x = run(self.middle, self.conv1(z, cache), cache)
        return run(self.head, run(self.upsamples, x, cache), cache)


class WanVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        self.register_buffer("latent_mean", torch.zeros(cfg.z_dim))
        self.register_buffer("latent_std", torch.ones(cfg.z_dim))

    def _stats(self, x):
        shape = (1, -1, 1, 1, 1)
        return self.latent_mean.view(shape).to(x.dtype), self.latent_std.view(shape).to(x.dtype)

    def encode(self, video):
        """(B, 3, T, H, W) in [-1, 1] -> normalized latent mean (B, z, 1+(T-1)/4, H/8, W/8)."""
        mu = self.conv1(self.encoder(video)).chunk(2, dim=1)[0]  # the posterior mean; no sampling
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def decode(self, latent, cache: FrameCache | None = None):
        """Normalized latent (B, z, F, h, w) -> video (B, 3, 4F-3, 8h, 8w) clamped to [-1, 1].

        With a `FrameCache`, decodes a chunk that continues the clip the cache comes from:
        the chunk holding frame 0 gives 4F-3 frames, later chunks 4F.
        """
        mean, std = self._stats(latent)
        return self.decoder(self.conv2(latent * std + mean), cache).clamp(-1.0, 1.0)


class VAEEncoderStage(nn.Module):
    """Export wrapper: the `vae_encoder` stage (video -> latent)."""

    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = vae

    def forward(self, video):
        return self.vae.encode(video)


class VAEDecoderStage(nn.Module):
    """Export wrapper: the `vae_decoder` stage (latent -> video)."""

    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent)


class VAEDecoderFirstStage(nn.Module):
    """Export wrapper: streaming decode of latent frame 0 -> (1 video frame, *caches)."""

    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        cache = FrameCache()
        return (self.vae.decode(latent, cache), *cache.outputs)


class VAEDecoderStepStage(nn.Module):
    """Export wrapper: streaming decode of one later latent frame -> (4 frames, *new caches)."""

    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = vae

    def forward(self, latent, *caches):
        cache = FrameCache(list(caches))
        return (self.vae.decode(latent, cache), *cache.outputs)


@torch.no_grad()
def decoder_cache_layout(vae: WanVAE) -> list[tuple[int, int, int]]:
    """(channels, frames, spatial scale per token row) of each streaming cache tensor, in order."""
    cache = FrameCache()
    vae.decode(torch.zeros(1, vae.cfg.z_dim, 1, 2, 2), cache)  # one token: latent 2x2
    return [(t.shape[1], t.shape[2], t.shape[3]) for t in cache.outputs]
