"""Chen, Liu, Shah & Xu, ICLR 2025, "Exploring Local Memorization in Diffusion Models via Bright Ending Attention"
(code: ``chenchen-usyd/BE-PRSS``, ``detect_mem.py``, ``controller.py``, ``local_sd_pipeline.py``).

The *bright ending* map ``m`` of a generation is the cross-attention to the prompt's end token at the final
denoising step, in the conditional branch, averaged over heads and over the highest-resolution down-block
cross-attention layers (SD 1.x at 512 px: ``down_blocks.0.attentions.{0,1}``, the 64x64 layers); memorized regions
attend to the end token brightly. Their localized detection score is Wen et al.'s magnitude restricted to that
region, ``LD = ||m * (eps_c - eps_u)||_2 / mean(m)`` over the whole latent (``m`` broadcast over the channels),
averaged over the sampling steps and the generations as Wen's. Higher is more memorized, as in the paper.

Cost: no extra denoiser call. Their code samples twice with the same seeds (the first pass for the map, the second
to apply it); here the pass keeps ``eps_c - eps_u`` of every step (one latent per step and image) until the last
step gives the map. The probabilities are computed beside the model's own attention on those layers at the last
step only.

Differences from the paper's code: the layers are found by their query count at run time (the down-block
cross-attention layers with the most queries; their code hard-codes 64x64, so other resolutions store nothing); when
that resolution is below the latent's (SDXL's first attention block is its second down block) the map is upsampled
bilinearly to the latent; a DiT without down blocks (PixArt) takes its first two cross-attention layers. The end
token is at index ``min(tokens, length) - 1`` as theirs (``tokens`` counted with the start and end tokens). Not for
SD3 and Flux: their text attention is joint (see
:meth:`~memaudit.families.base.Family.cross_attention_layers`). The map itself (:meth:`BrightEnding.maps`) is the
paper's localization of the memorized region.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from memaudit.detectors.base import Detector
from memaudit.families.base import Family
from memaudit.families.pipeline import StepView

__all__ = ["BrightEnding", "end_token_map"]

#: families whose denoiser has cross-attention layers (UNets and PixArt's DiT)
ATTENTION_FAMILIES = ("sd", "sdxl", "pixart")


def end_token_map(attention: dict[str, torch.Tensor], tokens: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``[B, 1, H, W]``: the attention to each prompt's end token (index ``min(tokens, keys) - 1``), averaged over
    the given layers with the most queries, as a map of the latent's size ``shape`` (bilinear when smaller)."""
    most = max(p.shape[1] for p in attention.values())
    probs = torch.stack([p for p in attention.values() if p.shape[1] == most]).mean(0)  # [B, Q, K]
    end = (tokens.to(probs.device).long().clamp(max=probs.shape[2]) - 1).clamp(min=0)
    m = probs[torch.arange(len(probs), device=probs.device), :, end]  # [B, Q]
    h, w = shape
    side = round((most * h / w) ** 0.5)
    m = m.reshape(len(m), 1, side, most // side)
    return m if (side, most // side) == (h, w) else F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)


class BrightEnding(Detector):
    name = "bright_ending"
    summary = "||m * (eps_c - eps_u)|| / mean(m), m the end token's cross-attention at the last step"
    source = "Chen et al., ICLR 2025, localized detection with the bright ending map (LD), mean over steps"
    families = ATTENTION_FAMILIES
    attention_steps = ("last",)

    @classmethod
    def attention_layers(cls, family: Family, denoiser: torch.nn.Module) -> list[str]:
        layers = family.cross_attention_layers(denoiser)
        down = [name for name in layers if name.startswith("down_blocks.")]
        return down or layers[:2]

    def __init__(self, n: int, tokens: torch.Tensor | None = None, layers: Sequence[str] = ()):
        super().__init__(n, tokens, layers)
        self.deltas: list[torch.Tensor] = []
        self.map: torch.Tensor | None = None

    def step(self, view: StepView) -> None:
        self.deltas.append(view.delta)
        attention = self.attention(view)
        if attention and view.step == view.steps - 1:
            self.map = end_token_map(attention, self.tokens, tuple(view.delta.shape[-2:]))

    def maps(self) -> torch.Tensor | None:
        """``[B, 1, H, W]`` the bright ending maps (latent resolution), None before the last step."""
        return self.map

    def scores(self) -> torch.Tensor:
        if self.map is None or not self.deltas:
            return self.nan()
        m = self.map.to(self.deltas[0].device)
        mean = m.flatten(1).mean(1)
        per_step = torch.stack([(m * d).flatten(1).norm(dim=1) / mean for d in self.deltas], dim=1)
        return per_step.mean(1).float().cpu()
