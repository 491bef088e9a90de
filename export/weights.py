"""Building the reference modules: a safetensors checkpoint, the bundled weights, or seeded init.

All initialization lives here (DiT `models.py` style). A checkpoint is one safetensors file with
keys `vae.<name>` and `dit.<name>`, the module's own parameter names, so loading is a key copy;
its metadata may carry the model config (`wan_config`, JSON). Pickle formats are refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from export.config import ModelConfig
from export.dit import WanDiT
from export.vae import WanVAE
from runtime.errors import WanError
from runtime.files import regular_file

log = logging.getLogger(__name__)


def init_weights(vae: WanVAE, dit: WanDiT, seed: int) -> None:
    """Seeded, deterministic, non-degenerate weights (no zero-init gates: random weights must
    give a model whose outputs depend on every input, or parity tests would prove little)."""
    gen = torch.Generator().manual_seed(seed)
    for module in (*vae.modules(), *dit.modules()):
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            fan_in = module.weight[0].numel()
            module.weight.data.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
            if module.bias is not None:
                module.bias.data.copy_(torch.randn(module.bias.shape, generator=gen) * 0.02)
    for name, p in dit.named_parameters():
        if name.endswith("scale_shift_table") or name.endswith("scale_shift_table_temporal"):
            p.data.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


PACKAGE_DIR = Path(__file__).resolve().parent
# What an export holds at its peak, in fp32 copies of the weights: the modules, the DiT again
# with fused kernels, the exporter's program, the ONNX model and the session validating it.
# An estimate for refusing hopeless configs up front, not a measurement.
EXPORT_COPIES = 5


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the VAE and DiT, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        vae, dit = WanVAE(cfg.vae), WanDiT(cfg.dit, cfg.vae.z_dim)
    return sum(p.numel() for m in (vae, dit) for p in m.parameters())


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, or a cgroup limit if lower."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if text != "max":
            limits.append(int(text))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def check_memory(cfg: ModelConfig) -> None:
    """Refuse a config whose export would not fit in memory, before building anything."""
    params = parameter_count(cfg)
    need, have = EXPORT_COPIES * 4 * params, available_memory()
    if have is not None and need > have:
        raise WanError(f"config {cfg.name!r} has {params / 1e6:,.0f}M parameters: exporting it needs "
                       f"about {need / 2**30:.1f} GiB, and {have / 2**30:.1f} GiB is available here")


def default_checkpoint(cfg: ModelConfig) -> Path | None:
    """The config's bundled weights (`cfg.weights`, relative to the export package), if any."""
    return PACKAGE_DIR / cfg.weights if cfg.weights else None


def build_models(cfg: ModelConfig, checkpoint: str | Path | None = None) -> tuple[WanVAE, WanDiT]:
    """The reference VAE and DiT in eval mode: from `checkpoint`, else the config's bundled
    weights, else seeded from `cfg.seed`."""
    if cfg.shape_only:
        raise WanError(f"preset {cfg.name!r} is for analytic projections only and is never built")
    check_memory(cfg)
    vae = WanVAE(cfg.vae).eval()
    dit = WanDiT(cfg.dit, cfg.vae.z_dim).eval()
    if checkpoint is None and cfg.weights:
        checkpoint = default_checkpoint(cfg)
        if not checkpoint.is_file():
            raise WanError(f"the bundled weights of {cfg.name!r} are missing ('{checkpoint}'); "
                           f"reinstall wan-export, or retrain: python -m export.train --preset "
                           f"{cfg.name} --out {checkpoint}")
    if checkpoint is None:
        init_weights(vae, dit, cfg.seed)
    else:
        load_checkpoint(checkpoint, vae, dit)
    return vae, dit


def load_checkpoint(path: str | Path, vae: WanVAE, dit: WanDiT) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = regular_file(path, "checkpoint")
    if path.suffix != ".safetensors":
        raise WanError(f"checkpoint '{path}' is not a .safetensors file; only safetensors "
                       "weights are loaded (pickle files can run code)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise WanError(f"checkpoint '{path}' cannot be read as safetensors: {exc}")
    for prefix, module in (("vae.", vae), ("dit.", dit)):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = module.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        for problem, keys in (("is missing", missing), ("has unexpected", unexpected),
                              ("has wrongly shaped", wrong)):
            if keys:
                raise WanError(f"checkpoint '{path}' {problem} {prefix}* tensors (e.g. "
                               f"{prefix}{keys[0]}; {len(keys)} in all): it does not match this config")
        module.load_state_dict({k: v.float() for k, v in state.items()})
    log.info("loaded %d tensors from %s", len(tensors), path)


def save_checkpoint(path: str | Path, vae: WanVAE, dit: WanDiT, cfg: ModelConfig,
                    dtype: torch.dtype = torch.float32) -> None:
    from safetensors.torch import save_file

    tensors = {f"{prefix}{k}": v.detach().to(dtype).contiguous()
               for prefix, module in (("vae.", vae), ("dit.", dit))
               for k, v in module.state_dict().items()}
    save_file(tensors, str(path), metadata={"wan_config": json.dumps(cfg.to_dict())})
