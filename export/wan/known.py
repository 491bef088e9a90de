"""The released Wan checkpoints (diffusers layout) and their recommended sampling.

A folder is recognised by its transformer's shape (so a fine-tune of a release gets the
release's defaults); the defaults go into the manifest, where `wan-run` takes them from. A folder
that matches none gets diffusers' pipeline defaults and the flow shift of its own scheduler.
Sources: the Wan-AI model cards, the Wan2.1 / Wan2.2 repositories' generation configs (A14B:
40 steps, T2V guidance 4.0 high noise / 3.0 low noise and shift 12, I2V 3.5 / 3.5 and shift 5) and
diffusers' WanPipeline docs (480p: flow shift 3.0, 720p: 5.0).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    name: str  # the Hugging Face repository
    shape: dict  # transformer config values that identify it
    supported: bool  # exported by this version of wan-export
    frames: int
    height: int
    width: int
    steps: int = 50
    guidance: float = 5.0
    guidance_2: float | None = None  # A14B: the low-noise expert's
    flow_shift: float = 5.0
    fps: int = 16
    note: str = ""


def _t(heads: int, layers: int, ffn: int, in_channels: int = 16, **extra) -> dict:
    return {"num_attention_heads": heads, "attention_head_dim": 128, "num_layers": layers,
            "ffn_dim": ffn, "in_channels": in_channels, **extra}


KNOWN_MODELS = (
    KnownModel("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", _t(12, 30, 8960), True, 81, 480, 832, flow_shift=3.0,
               note="text-to-video, 480p"),
    KnownModel("Wan-AI/Wan2.1-T2V-14B-Diffusers", _t(40, 40, 13824), True, 81, 720, 1280, flow_shift=5.0,
               note="text-to-video, 720p (480p: --height 480 --width 832 --shift 3)"),
    KnownModel("Wan-AI/Wan2.2-TI2V-5B-Diffusers", _t(24, 30, 14336, 48), True, 121, 704, 1280, fps=24,
               note="text-to-video and image+text-to-video, 720p, 48-channel VAE"),
    KnownModel("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", _t(40, 40, 13824, 36, image_dim=1280), True, 81, 480, 832,
               steps=40, flow_shift=3.0, note="image-to-video (CLIP image embeddings), 480p"),
    KnownModel("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", _t(40, 40, 13824, 36, image_dim=1280), True, 81, 720,
               1280, steps=40, note="image-to-video (CLIP image embeddings), 720p"),
    KnownModel("Wan-AI/Wan2.2-T2V-A14B-Diffusers", _t(40, 40, 13824), True, 81, 720, 1280, steps=40, guidance=4.0,
               guidance_2=3.0, flow_shift=12.0, note="two experts, text-to-video"),
    KnownModel("Wan-AI/Wan2.2-I2V-A14B-Diffusers", _t(40, 40, 13824, 36), True, 81, 720, 1280, steps=40,
               guidance=3.5, guidance_2=3.5, note="two experts, image-to-video (+ --last-image)"),
    KnownModel("Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers", _t(40, 40, 13824, 36, image_dim=1280,
                                                            pos_embed_seq_len=514), False, 81, 720, 1280,
               note="first-last-frame with CLIP embeddings: not yet"),
)


def match(transformer_config: dict, two_experts: bool = False, folder: str = "",
          flow_shift: float | None = None) -> KnownModel | None:
    """The release a transformer config has the shape of (fine-tunes included), if any. Releases
    of one shape (Wan2.1 I2V 480P / 720P) are told apart by the folder's name ("...720P..."),
    else by the scheduler's flow shift, else the first is taken."""
    found = [known for known in KNOWN_MODELS if ("A14B" in known.name) == two_experts
             and all(transformer_config.get(k) == v for k, v in known.shape.items())]
    for test in (lambda k: f"{k.height}p" in folder.lower(), lambda k: k.flow_shift == flow_shift):
        hits = [k for k in found if test(k)]
        if len(hits) == 1:
            return hits[0]
    return found[0] if found else None


def table() -> str:
    """`wan-export --list-models`: what is accepted and its defaults."""
    rows = [f"{'checkpoint':<40} {'exports':<8} {'size':<10} {'frames':>6} {'steps':>5} {'guidance':>8} "
            f"{'shift':>5} {'fps':>4}  notes"]
    for k in KNOWN_MODELS:
        if not k.supported:  # refused in one line by wan-export --model; no defaults to promise
            rows.append(f"{k.name:<40} {'not yet':<8} {'':<10} {'':>6} {'':>5} {'':>8} {'':>5} {'':>4}  {k.note}")
            continue
        guidance = f"{k.guidance:g}" + (f"/{k.guidance_2:g}" if k.guidance_2 is not None else "")
        rows.append(f"{k.name:<40} {'yes':<8} {f'{k.width}x{k.height}':<10} "
                    f"{k.frames:>6} {k.steps:>5} {guidance:>8} {k.flow_shift:>5g} {k.fps:>4}  {k.note}")
    return "\n".join(rows)
