"""Tiny random Wan pipelines in the diffusers layout, for tests (nothing comes from a model hub).

The component configs are diffusers' own fast-test ones (tests/pipelines/wan/test_wan.py,
test_wan_22.py, test_wan_22_image_to_video.py, test_wan_image_to_video.py): the transformer, the
Wan2.1 VAE (z16), the Wan2.2 VAE (z48, patch 2) and the CLIP vision tower. Changed from them so
that what is tested is really used: A14B's two experts are seeded differently (the switch shows),
and Wan2.1 I2V's transformer has `added_kv_proj_dim` (its image keys). The text
encoder is a tiny UMT5 and the tokenizer a sentencepiece unigram model trained here on a dozen
sentences (pad 0, eos 1, unk 2), wrapped as transformers' T5Tokenizer, which writes the
tokenizer.json the runtime reads. `save_pretrained` writes safetensors, as the released
"-Diffusers" repositories are.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

SENTENCES = [
    "a cat dances on the table", "a dog runs through the park at night", "waves crash on the rocky shore",
    "a red balloon floats over the city", "two birds fly across a blue sky", "the camera pans over green hills",
    "a man rides a bicycle down the street", "rain falls on a quiet village", "a monkey dances in the forest",
    "fireworks light up the dark sky", "a child plays with a yellow ball", "snow covers the mountain peaks",
]
PROMPT, NEGATIVE = "dance monkey", "blurry, still"


def tokenizer():
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=model, vocab_size=64,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def text_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    config = UMT5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        feed_forward_proj="gated-gelu")
    return UMT5EncoderModel(config).eval()


def transformer(channels: int, in_channels: int | None = None, seed: int = 0, **extra):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels or channels, out_channels=channels, text_dim=32,
                                 freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **extra)


CLIP_SIDE = 8  # the tiny CLIP's image size: (8 / 2)^2 patches + 1 class token = 17 image tokens


def image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2,
                              image_size=CLIP_SIDE, intermediate_size=16, patch_size=2)
    return CLIPVisionModelWithProjection(config).eval()


def image_processor():
    from transformers import CLIPImageProcessorPil  # the PIL backend: no torchvision here

    return CLIPImageProcessorPil(crop_size=CLIP_SIDE, size=CLIP_SIDE)


def vae(version: str):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    if version == "wan2.1":
        return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True])
    return AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True,
                            patch_size=2, latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1],
                            num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4,
                            temperal_downsample=[False, True, True])


def unipc(flow_shift: float = 3.0):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)


VERSIONS = ("wan2.1", "wan2.2", "a14b", "a14b-i2v", "wan2.1-i2v")


def save_pipeline(out: Path, version: str) -> Path:
    """A tiny pipeline folder: "wan2.1" T2V, "wan2.2" TI2V-5B (expand_timesteps, z48), "a14b"
    Wan2.2 T2V-A14B (two experts), "a14b-i2v" I2V-A14B, "wan2.1-i2v" Wan2.1 I2V (CLIP)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    common = dict(tokenizer=tokenizer(), text_encoder=text_encoder(), scheduler=unipc())
    if version in ("wan2.1", "wan2.2"):
        ti2v = version == "wan2.2"
        pipe = WanPipeline(vae=vae(version), transformer=transformer(48 if ti2v else 16), expand_timesteps=ti2v,
                           **common)
    elif version == "a14b":
        pipe = WanPipeline(vae=vae("wan2.1"), transformer=transformer(16), transformer_2=transformer(16, seed=1),
                           boundary_ratio=0.875, **common)
    elif version == "a14b-i2v":
        pipe = WanImageToVideoPipeline(vae=vae("wan2.1"), transformer=transformer(16, 36),
                                       transformer_2=transformer(16, 36, seed=1), boundary_ratio=0.875, **common)
    else:
        pipe = WanImageToVideoPipeline(vae=vae("wan2.1"), transformer=transformer(16, 36, image_dim=4,
                                                                                  added_kv_proj_dim=24),
                                       image_encoder=image_encoder(), image_processor=image_processor(), **common)
    pipe.save_pretrained(out)
    return out


def diffusers_video(folder: Path, noise, *, image=None, last_image=None, scheduler: str | None = None,
                    shift: float = 3.0, **kwargs):
    """diffusers' own pipeline on the same initial latent: frames float (T, H, W, 3) in [0, 1].
    With `image`, WanImageToVideoPipeline (TI2V: its first frame)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
    from PIL import Image

    cls = WanPipeline if image is None else WanImageToVideoPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if scheduler == "euler":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    elif shift != pipe.scheduler.config.get("flow_shift"):
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=shift)
    extra = {} if image is None else {"image": Image.fromarray(image)}
    if last_image is not None:
        extra["last_image"] = Image.fromarray(last_image)
    out = pipe(latents=torch.from_numpy(noise), output_type="np", **extra, **kwargs)
    return out.frames[0]
