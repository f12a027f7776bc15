"""Build, save and load the bundled digits models (weights ship inside the package)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import configs

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_NAMES = ("dit-digits", "pixart-digits", "flux-digits", "flux-heldout")
#: the rectified-flow models (Euler flow matching) and their transformer configs
FLOW_MODELS = {"flux-digits": "FLUX_DIGITS", "flux-heldout": "FLUX_HELDOUT"}
#: the script that trains each bundled model
TRAIN_COMMANDS = {"dit-digits": "python python/train_digits.py --model dit-digits",
                  "pixart-digits": "python python/train_digits.py --model pixart-digits",
                  "flux-digits": "python python/train_flux_digits.py",
                  "flux-heldout": "python python/train_flux_digits.py --name flux-heldout --seed 1"}


@dataclass
class BundledModel:
    """A bundled diffusion transformer with what sampling needs beside it."""

    name: str
    transformer: torch.nn.Module
    text_encoder: torch.nn.Module | None
    scheduler_config: dict
    info: dict = field(default_factory=dict)

    @property
    def is_text_conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def image_size(self) -> int:
        # pixel space: latent size == image size (flux-digits packs 2x2 pixels into a token; no sample_size)
        return int(self.transformer.config.get("sample_size", None) or configs.IMAGE_SIZE)

    @property
    def is_flow_matching(self) -> bool:
        """Rectified-flow model sampled with ``FlowMatchEulerDiscreteScheduler`` (``flux-digits``, ``flux-heldout``)."""
        return self.name in FLOW_MODELS

    @property
    def recommended_cfg(self) -> float:
        return float(self.info.get("recommended_cfg", 4.0))

    @property
    def tgate_scheduler(self) -> str | None:
        """The sampler T-GATE's gate is measured with when none is asked (``learn.gate``): DPM-Solver++ for the
        DDPM models, as their T-GATE settings were measured; None (the model's own) for flow matching."""
        return None if self.is_flow_matching else "dpm++"


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; bundled models are {', '.join(MODEL_NAMES)}")


def build(name: str) -> BundledModel:
    """A freshly initialised model of the bundled architecture (what the training script trains)."""
    _check_name(name)
    if name == "dit-digits":
        from diffusers import DiTTransformer2DModel

        return BundledModel(name, DiTTransformer2DModel(**configs.DIT_DIGITS), None, dict(configs.NOISE_SCHEDULE))
    from .text_encoder import DigitTextEncoder

    if name in FLOW_MODELS:   # output layer zeroed: the flow starts as the identity
        from diffusers import FluxTransformer2DModel

        tr = FluxTransformer2DModel(**getattr(configs, FLOW_MODELS[name]))
        torch.nn.init.zeros_(tr.proj_out.weight)
        torch.nn.init.zeros_(tr.proj_out.bias)
        return BundledModel(name, tr, DigitTextEncoder(**configs.TEXT_ENCODER), dict(configs.FLOW_MATCH_SCHEDULE))
    from diffusers import PixArtTransformer2DModel

    return BundledModel(name, PixArtTransformer2DModel(**configs.PIXART_DIGITS),
                        DigitTextEncoder(**configs.TEXT_ENCODER), dict(configs.NOISE_SCHEDULE))


def save_bundle(name: str, transformer, text_encoder, out_dir: Path, info: dict,
                scheduler_config: dict | None = None) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v.detach().float().contiguous() for k, v in transformer.state_dict().items()}
    if text_encoder is not None:
        tensors.update({f"text_encoder.{k}": v.detach().float().contiguous()
                        for k, v in text_encoder.state_dict().items()})
    tmp = out_dir / f"{name}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"model": name})
    tmp.replace(out_dir / f"{name}.safetensors")
    meta = dict(name=name, transformer_config=dict(transformer.config),
                text_encoder_config=None if text_encoder is None else text_encoder.config,
                scheduler_config=dict(scheduler_config or configs.NOISE_SCHEDULE), training=info)
    old = out_dir / f"{name}.json"
    if old.exists():  # keep evaluation notes (recommended_cfg, accuracy) written after training
        prev = json.loads(old.read_text())
        for k in ("recommended_cfg", "evaluation"):
            if k in prev:
                meta[k] = prev[k]
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=1, default=str))


def load(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         weights_dir: Path | None = None) -> BundledModel:
    """Load a bundled model from the package's own files: no network is touched.

    Returns a :class:`BundledModel` whose ``transformer`` is the diffusers model in eval mode
    on ``device`` / ``dtype`` (and ``text_encoder`` for ``pixart-digits``).
    """
    from safetensors.torch import load_file

    _check_name(name)
    wdir = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    wfile, mfile = wdir / f"{name}.safetensors", wdir / f"{name}.json"
    if not wfile.exists() or not mfile.exists():
        raise FileNotFoundError(f"weights for {name!r} not found in {wdir}; train them with "
                                f"`{TRAIN_COMMANDS[name]}`")
    meta = json.loads(mfile.read_text())
    bundle = build(name)
    state = load_file(str(wfile))
    for prefix, module in (("transformer.", bundle.transformer), ("text_encoder.", bundle.text_encoder)):
        if module is None:
            continue
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
        module.to(device=device).eval()
        if prefix == "transformer." and dtype != torch.float32:
            module.to(dtype=dtype)
        module.requires_grad_(False)
    bundle.info = dict(meta.get("training", {}))
    bundle.info.update({k: meta[k] for k in ("recommended_cfg", "evaluation") if k in meta})
    return bundle
