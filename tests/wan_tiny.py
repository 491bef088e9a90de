"""Tiny random Wan pipelines in the diffusers layout, for tests (nothing comes from a model hub).

The component configs are diffusers' own fast-test ones (tests/pipelines/wan/test_wan.py and
test_wan_22.py): the transformer, the Wan2.1 VAE (z16) and the Wan2.2 VAE (z48, patch 2). The text
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


def transformer(channels: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=channels, out_channels=channels, text_dim=32, freq_dim=256,
                                 ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


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


def save_pipeline(out: Path, version: str) -> Path:
    """A tiny Wan2.1 T2V ("wan2.1") or Wan2.2 TI2V-5B ("wan2.2": expand_timesteps, z48) folder."""
    from diffusers import WanPipeline

    ti2v = version == "wan2.2"
    pipe = WanPipeline(tokenizer=tokenizer(), text_encoder=text_encoder(), vae=vae(version),
                       transformer=transformer(48 if ti2v else 16), scheduler=unipc(), expand_timesteps=ti2v)
    pipe.save_pretrained(out)
    return out


def diffusers_video(folder: Path, noise, *, image=None, scheduler: str | None = None, shift: float = 3.0,
                    **kwargs):
    """diffusers' own pipeline on the same initial latent: frames float (T, H, W, 3) in [0, 1].
    With `image`, TI2V through WanImageToVideoPipeline (its first frame)."""
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
    out = pipe(latents=torch.from_numpy(noise), output_type="np", **extra, **kwargs)
    return out.frames[0]
