"""A released Wan checkpoint in the diffusers layout: what it is, checked before anything loads.

    DIR/model_index.json                 the pipeline class and its components
    DIR/transformer/  config.json + diffusion_pytorch_model*.safetensors (+ .index.json if sharded)
    DIR/vae/          config.json + diffusion_pytorch_model.safetensors
    DIR/text_encoder/ config.json + model*.safetensors
    DIR/tokenizer/    tokenizer.json (+ tokenizer_config.json)
    DIR/scheduler/    scheduler_config.json

`read_checkpoint` reads only the JSON files and the names of the weight files, and refuses in one
line what this exporter does not run (another pipeline, two experts, CLIP image conditioning,
pickle weights, a missing shard, configs that contradict each other). `load_*` then build the
modules through diffusers' and transformers' own classes, from safetensors only.
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

    @property
    def expand_timesteps(self) -> bool:
        """Wan2.2 TI2V-5B: a timestep per token (0 for the image's tokens)."""
        return bool(self.index.get("expand_timesteps", False))

    @property
    def takes_image(self) -> bool:
        """Image+text-to-video: TI2V's image is latent frame 0 (WanImageToVideoPipeline)."""
        return self.pipeline == "WanImageToVideoPipeline" or self.expand_timesteps

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
    if index.get("transformer_2") not in (None, [None, None]) or index.get("boundary_ratio") is not None:
        raise WanError(f"'{root}' is a two-expert (Wan2.2 A14B) pipeline, which is not supported yet: "
                       "export a single-transformer Wan2.1 or Wan2.2 TI2V-5B checkpoint")
    if index.get("image_encoder") not in (None, [None, None]):
        raise WanError(f"'{root}' conditions on CLIP image embeddings (Wan2.1 image-to-video), which is not "
                       "supported yet: export a text-to-video or TI2V-5B checkpoint")
    for name in COMPONENTS:
        if index.get(name) in (None, [None, None]):
            raise WanError(f"'{root}' has no {name} in model_index.json; a Wan pipeline needs "
                           f"{', '.join(COMPONENTS)}")
        if not (root / name).is_dir():
            raise WanError(f"'{root}' has no {name}/ folder (model_index.json names one)")
    configs = {name: _json(root / name / "config.json", f"{name} config")
               for name in ("transformer", "vae", "text_encoder")}
    for name in ("transformer", "vae", "text_encoder"):
        check_weights(root / name, name)
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
                         configs["text_encoder"], scheduler, tokenizer_file, pad)
    check_consistent(ckpt)
    return ckpt


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
    if t.get("image_dim") is not None or t.get("added_kv_proj_dim") is not None:
        raise WanError(f"{where}: the transformer takes CLIP image embeddings (Wan2.1 image-to-video), not "
                       "supported yet")
    z = v.get("z_dim", 16)
    if t.get("in_channels", 16) != z or t.get("out_channels", 16) != z:
        raise WanError(f"{where}: transformer in/out channels {t.get('in_channels')}/{t.get('out_channels')} do "
                       f"not match the VAE's z_dim {z} (image-to-video by channel concat is not supported yet)")
    if t.get("text_dim", 4096) != te.get("d_model"):
        raise WanError(f"{where}: transformer text_dim {t.get('text_dim')} does not match the text encoder's "
                       f"d_model {te.get('d_model')}")
    if v.get("patch_size") not in (None, 1, 2):
        raise WanError(f"{where}: vae patch_size {v.get('patch_size')} is not supported (None or 2)")
    if ckpt.pipeline == "WanImageToVideoPipeline" and not ckpt.expand_timesteps:
        raise WanError(f"{where}: image-to-video by condition latents (Wan2.1 I2V, Wan2.2 I2V-A14B) is not "
                       "supported yet; Wan2.2 TI2V-5B (expand_timesteps) is")
    if ckpt.expand_timesteps and z != 48:
        raise WanError(f"{where}: expand_timesteps is set but the VAE is z_dim {z}; TI2V-5B uses the 48-channel "
                       "Wan2.2 VAE")
    for key in ("latents_mean", "latents_std"):
        values = v.get(key)
        if values is not None and len(values) != z:
            raise WanError(f"{where}: vae {key} has {len(values)} entries, z_dim is {z}")


def load_transformer(ckpt: WanCheckpoint):
    from diffusers import WanTransformer3DModel

    return _load(WanTransformer3DModel, ckpt.root / "transformer", "transformer")


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
