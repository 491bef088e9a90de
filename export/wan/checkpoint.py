"""A released Wan checkpoint in the diffusers layout: what it is, checked before anything loads.

    DIR/model_index.json                 the pipeline class and its components
    DIR/transformer/  config.json + diffusion_pytorch_model*.safetensors (+ .index.json if sharded)
    DIR/vae/          config.json + diffusion_pytorch_model.safetensors
    DIR/text_encoder/ config.json + model*.safetensors
    DIR/tokenizer/    tokenizer.json (+ tokenizer_config.json)
    DIR/scheduler/    scheduler_config.json
    DIR/transformer_2/                   Wan2.2 A14B: the low-noise expert (+ boundary_ratio)
    DIR/image_encoder/ + image_processor/  Wan2.1 I2V: the CLIP vision tower and its preprocessing

What the DiT is conditioned on (`WanCheckpoint.condition`):
    "text"         text-to-video (Wan2.1 T2V, Wan2.2 T2V-A14B)
    "first_frame"  Wan2.2 TI2V-5B: an optional image's latent replaces latent frame 0, whose
                   tokens get timestep 0 (expand_timesteps)
    "latents"      image-to-video (Wan2.1 I2V, Wan2.2 I2V-A14B): the VAE encoding of the image
                   followed by zero frames, and a frame mask, concatenated to the noise on channels;
                   Wan2.1 I2V adds CLIP image embeddings as extra cross-attention keys

`read_checkpoint` reads only the JSON files and the names of the weight files, and refuses in one
line what this exporter does not run (another pipeline, pickle weights, a missing shard, configs
that contradict each other). `load_*` then build the modules through diffusers' and
transformers' own classes, from safetensors only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import WanError
from runtime.files import regular_file
from runtime.schedulers import from_config as scheduler_from_config

log = logging.getLogger(__name__)

PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
IMAGE_ENCODERS = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
# The pipelines' own tokenizer length: WanImageToVideoPipeline splits image from text tokens at
# `shape[1] - 512`, so the text must be exactly 512 tokens, zero-padded.
MAX_SEQUENCE_LENGTH = 512
SAFETENSORS_HINT = ("the Wan-AI '-Diffusers' releases are safetensors throughout (huggingface-cli download "
                    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers); or load the folder with diffusers and save_pretrained "
                    "it (safe_serialization is the default)")


@dataclass(frozen=True)
class WanCheckpoint:
    """What a checkpoint folder holds: the configs, read and cross-checked."""

    root: Path
    pipeline: str  # WanPipeline, WanImageToVideoPipeline
    index: dict  # model_index.json
    transformer: dict  # the components' config.json
    vae: dict
    text_encoder: dict
    scheduler: dict  # scheduler_config.json
    tokenizer_file: Path
    pad_token: str
    transformer_2: dict | None = None  # A14B's low-noise expert
    image_encoder: dict | None = None  # Wan2.1 I2V: CLIP vision config
    image_processor: dict | None = None  # its preprocessor_config.json

    @property
    def expand_timesteps(self) -> bool:
        """Wan2.2 TI2V-5B: a timestep per token (0 for the image's tokens)."""
        return bool(self.index.get("expand_timesteps", False))

    @property
    def condition(self) -> str:
        """How an image conditions the DiT: "text" (none), "first_frame" or "latents"."""
        if self.expand_timesteps:
            return "first_frame"
        return "latents" if self.pipeline == "WanImageToVideoPipeline" else "text"

    @property
    def takes_image(self) -> bool:
        return self.condition != "text"

    @property
    def needs_image(self) -> bool:
        """Image-to-video models generate from an image; TI2V-5B also from text alone."""
        return self.condition == "latents"

    @property
    def image_embeddings(self) -> bool:
        """Wan2.1 I2V: CLIP image embeddings as extra cross-attention keys."""
        return self.image_encoder is not None

    @property
    def takes_last_image(self) -> bool:
        """A last frame in the condition latents (diffusers' `last_image`). Not with CLIP
        embeddings: Wan2.1's first-last-frame models (pos_embed_seq_len) are refused at read."""
        return self.condition == "latents" and not self.image_embeddings

    @property
    def experts(self) -> tuple[str, ...]:
        """The transformer components, the high-noise expert first."""
        return ("transformer", "transformer_2") if self.transformer_2 is not None else ("transformer",)

    @property
    def boundary_ratio(self) -> float | None:
        return self.index.get("boundary_ratio")

    @property
    def version(self) -> str:
        return "wan2.2" if self.vae.get("z_dim") == 48 else "wan2.1"


def _json(path: Path, what: str) -> dict:
    regular_file(path, what)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WanError(f"{what} '{path}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WanError(f"{what} '{path}' must hold a JSON object")
    return data


def check_weights(folder: Path, what: str) -> None:
    """The folder's weights are safetensors, every shard an index names is present."""
    files = [p for p in folder.iterdir() if p.is_file()]
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if not safetensors:
        if pickles:
            raise WanError(f"{what} weights '{pickles[0]}' are a pickle file, which can run code and is never "
                           f"loaded here: {SAFETENSORS_HINT}")
        raise WanError(f"{what} folder '{folder}' has no .safetensors weights")
    for index in (p for p in files if p.name.endswith(".safetensors.index.json")):
        shards = set(_json(index, f"{what} shard index").get("weight_map", {}).values())
        for shard in sorted(shards):
            if not (folder / shard).is_file():
                raise WanError(f"{what} shard '{folder / shard}' named by '{index.name}' is missing "
                               "(an interrupted download?)")


def read_checkpoint(root: str | Path) -> WanCheckpoint:
    """Read and check a diffusers-layout Wan folder (configs only: nothing is loaded)."""
    root = Path(root)
    if not root.is_dir():
        raise WanError(f"model folder '{root}' {'is not a folder' if root.exists() else 'does not exist'}")
    if not (root / "model_index.json").exists():
        raise WanError(f"'{root}' is not a diffusers pipeline folder: it has no model_index.json (expected "
                       f"{', '.join(COMPONENTS)} beside it)")
    index = _json(root / "model_index.json", "model index")
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINES:
        raise WanError(f"'{root}' holds a {pipeline!r}; wan-export reads {' and '.join(PIPELINES)} folders")
    for name in COMPONENTS:
        if _absent(index, name):
            raise WanError(f"'{root}' has no {name} in model_index.json; a Wan pipeline needs "
                           f"{', '.join(COMPONENTS)}")
        if not (root / name).is_dir():
            raise WanError(f"'{root}' has no {name}/ folder (model_index.json names one)")
    two_experts = not _absent(index, "transformer_2")
    ratio = index.get("boundary_ratio")
    if two_experts != (ratio is not None):
        have, lacks = ("transformer_2", "boundary_ratio") if two_experts else ("boundary_ratio", "transformer_2")
        raise WanError(f"'{root}' names {have} but no {lacks} in model_index.json; a two-expert (Wan2.2 A14B) "
                       "pipeline needs both")
    if two_experts:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
            raise WanError(f"'{root}': boundary_ratio {ratio!r} is not allowed: use a number between 0 and 1")
        if not (root / "transformer_2").is_dir():
            raise WanError(f"'{root}' has no transformer_2/ folder (model_index.json names one)")
    clip = not _absent(index, "image_encoder")
    if clip:
        if pipeline != "WanImageToVideoPipeline":
            raise WanError(f"'{root}': a {pipeline} with an image_encoder; CLIP image embeddings are "
                           "WanImageToVideoPipeline's")
        if _absent(index, "image_processor") or not (root / "image_processor").is_dir():
            raise WanError(f"'{root}' has an image_encoder but no image_processor/ (its preprocessing)")
        if not (root / "image_encoder").is_dir():
            raise WanError(f"'{root}' has no image_encoder/ folder (model_index.json names one)")
        entry = index["image_encoder"]
        cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else entry
        if cls not in IMAGE_ENCODERS:
            raise WanError(f"'{root}': image_encoder is a {cls!r}, expected one of {', '.join(IMAGE_ENCODERS)}")
    weighted = ("transformer", "vae", "text_encoder", *(("transformer_2",) if two_experts else ()),
                *(("image_encoder",) if clip else ()))
    configs = {name: _json(root / name / "config.json", f"{name} config") for name in weighted}
    for name in weighted:
        check_weights(root / name, name)
    processor = _json(root / "image_processor" / "preprocessor_config.json", "image processor config") \
        if clip else None
    scheduler = _json(root / "scheduler" / "scheduler_config.json", "scheduler config")
    scheduler_from_config(scheduler)  # refuses what the runtime cannot run
    tokenizer_file = root / "tokenizer" / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise WanError(f"tokenizer '{root / 'tokenizer'}' has no tokenizer.json (the fast tokenizer the runtime "
                       "reads): AutoTokenizer.from_pretrained(folder).save_pretrained(folder) writes one")
    tok_config = (_json(root / "tokenizer" / "tokenizer_config.json", "tokenizer config")
                  if (root / "tokenizer" / "tokenizer_config.json").exists() else {})
    pad = tok_config.get("pad_token", "<pad>")
    pad = pad.get("content", "<pad>") if isinstance(pad, dict) else pad
    ckpt = WanCheckpoint(root, pipeline, index, configs["transformer"], configs["vae"],
                         configs["text_encoder"], scheduler, tokenizer_file, pad, configs.get("transformer_2"),
                         configs.get("image_encoder"), processor)
    check_consistent(ckpt)
    return ckpt


def _absent(index: dict, name: str) -> bool:
    """diffusers writes a missing optional component as [null, null]."""
    return index.get(name) in (None, [None, None])


def check_consistent(ckpt: WanCheckpoint) -> None:
    """The components' configs agree with each other and with what this exporter runs."""
    t, v, te = ckpt.transformer, ckpt.vae, ckpt.text_encoder
    where = f"'{ckpt.root}'"
    if t.get("_class_name") != "WanTransformer3DModel" or v.get("_class_name") != "AutoencoderKLWan":
        raise WanError(f"{where}: transformer/vae are {t.get('_class_name')}/{v.get('_class_name')}, expected "
                       "WanTransformer3DModel/AutoencoderKLWan")
    if te.get("model_type") not in ("umt5", "t5"):
        raise WanError(f"{where}: text_encoder is a {te.get('model_type')!r} model, expected UMT5")
    if list(t.get("patch_size", [1, 2, 2])) != [1, 2, 2]:
        raise WanError(f"{where}: transformer patch_size {t.get('patch_size')} is not supported (Wan's is [1, 2, 2])")
    z = v.get("z_dim", 16)
    mask = v.get("scale_factor_temporal", 4)  # the I2V frame mask: one channel per video frame of a latent frame
    want_in = {"text": z, "first_frame": z, "latents": z + mask + z}[ckpt.condition]
    if t.get("in_channels", 16) != want_in or t.get("out_channels", 16) != z:
        how = {"text": "text-to-video", "first_frame": "TI2V",
               "latents": f"image-to-video: noise {z} + mask {mask} + image latents {z}"}[ckpt.condition]
        raise WanError(f"{where}: transformer in/out channels {t.get('in_channels')}/{t.get('out_channels')} "
                       f"do not fit a {ckpt.pipeline} with the VAE's z_dim {z} ({how} takes {want_in}/{z})")
    if ckpt.transformer_2 is not None:
        keys = ("in_channels", "out_channels", "text_dim", "patch_size", "image_dim", "added_kv_proj_dim")
        differ = [k for k in keys if ckpt.transformer_2.get(k) != t.get(k)]
        if ckpt.transformer_2.get("_class_name") != "WanTransformer3DModel" or differ:
            raise WanError(f"{where}: transformer_2 does not match transformer "
                           f"({', '.join(differ) or '_class_name'} differ); the two experts take the same inputs")
    if (t.get("image_dim") is not None) != ckpt.image_embeddings:
        raise WanError(f"{where}: the transformer's image_dim is {t.get('image_dim')} but the pipeline "
                       f"{'has' if ckpt.image_embeddings else 'has no'} image_encoder")
    if ckpt.image_embeddings:
        check_clip(ckpt)
    if t.get("text_dim", 4096) != te.get("d_model"):
        raise WanError(f"{where}: transformer text_dim {t.get('text_dim')} does not match the text encoder's "
                       f"d_model {te.get('d_model')}")
    if v.get("patch_size") not in (None, 1, 2):
        raise WanError(f"{where}: vae patch_size {v.get('patch_size')} is not supported (None or 2)")
    if ckpt.expand_timesteps and z != 48:
        raise WanError(f"{where}: expand_timesteps is set but the VAE is z_dim {z}; TI2V-5B uses the 48-channel "
                       "Wan2.2 VAE")
    for key in ("latents_mean", "latents_std"):
        values = v.get(key)
        if values is not None and len(values) != z:
            raise WanError(f"{where}: vae {key} has {len(values)} entries, z_dim is {z}")


def check_clip(ckpt: WanCheckpoint) -> None:
    """Wan2.1 I2V's CLIP vision tower and preprocessing: what the runtime's numpy copy of
    CLIPImageProcessor (runtime/clip.py) and the image_encoder stage handle."""
    where, c, p = f"'{ckpt.root}'", ckpt.image_encoder, ckpt.image_processor
    if ckpt.transformer.get("pos_embed_seq_len") is not None:
        raise WanError(f"{where} is a first-last-frame model (Wan2.1 FLF2V: pos_embed_seq_len), which is not "
                       "supported yet: export an image-to-video checkpoint")
    if c.get("model_type") != "clip_vision_model":
        raise WanError(f"{where}: image_encoder is a {c.get('model_type')!r} model, expected clip_vision_model")
    if c.get("hidden_size") != ckpt.transformer.get("image_dim"):
        raise WanError(f"{where}: image_encoder hidden_size {c.get('hidden_size')} does not match the "
                       f"transformer's image_dim {ckpt.transformer.get('image_dim')}")
    side = c.get("image_size", 224)
    crop = p.get("crop_size", side)
    crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
    if not p.get("do_center_crop", True) or crop != (side, side):
        raise WanError(f"{where}: image_processor crops to {crop}, the image encoder takes {side}x{side}")
    size = p.get("size", {"shortest_edge": side})
    size = size if isinstance(size, dict) else {"shortest_edge": size}
    if not p.get("do_resize", True) or not ({"shortest_edge"} == set(size) or {"height", "width"} == set(size)):
        raise WanError(f"{where}: image_processor size {size} is not supported (shortest_edge, or height "
                       "and width)")
    if min(size.values()) < side:
        raise WanError(f"{where}: image_processor resizes to {size}, smaller than its {side}x{side} crop")
    if p.get("resample", 3) not in range(6):
        raise WanError(f"{where}: image_processor resample {p.get('resample')!r} is not a PIL filter (0-5)")


def load_transformer(ckpt: WanCheckpoint, name: str = "transformer"):
    from diffusers import WanTransformer3DModel

    return _load(WanTransformer3DModel, ckpt.root / name, name.replace("_", " "))


def load_image_encoder(ckpt: WanCheckpoint):
    import transformers

    cls = getattr(transformers, ckpt.index["image_encoder"][1])  # one of IMAGE_ENCODERS, checked at read
    # the eager attention exports wherever sdpa's does not (as UMT5's); same weights
    return _load(cls, ckpt.root / "image_encoder", "image encoder", attn_implementation="eager")


def load_vae(ckpt: WanCheckpoint):
    from diffusers import AutoencoderKLWan

    return _load(AutoencoderKLWan, ckpt.root / "vae", "vae")


def load_text_encoder(ckpt: WanCheckpoint):
    from transformers import UMT5EncoderModel

    # torch.export fails on UMT5's sdpa attention; the eager attention exports (same weights).
    return _load(UMT5EncoderModel, ckpt.root / "text_encoder", "text encoder", attn_implementation="eager")


def _load(cls, folder: Path, what: str, **kwargs):
    import torch

    log.info("loading %s from %s", what, folder)
    try:
        model = cls.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        # diffusers' shape-mismatch error goes on to advise ignore_mismatched_sizes (random
        # weights): the first sentence is what the user needs
        reason = str(exc).strip().splitlines()[0].split(". ")[0].replace("Cannot load  because ", "")
        raise WanError(f"{what} in '{folder}' does not load with its config.json: {reason}") from None
    return model.eval()
