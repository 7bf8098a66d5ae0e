"""Training an autoencoder from scratch (:func:`train_vae`), with the training loop's conventions; it builds the
bundled demo model's VAE."""

from __future__ import annotations

import time

import torch

from memaudit.training.config import VAEConfig
from memaudit.training.loop import IndexStream, Progress, TrainResult

__all__ = ["train_vae"]


def train_vae(vae, images: torch.Tensor, config: VAEConfig | None = None, *, device: str | torch.device = "cpu",
              progress: Progress | None = None) -> TrainResult:
    """Train an ``AutoencoderKL`` on images in [-1, 1] (reconstruction MSE + a small KL term)."""
    config = config or VAEConfig()
    start = time.perf_counter()
    device = torch.device(device)
    generator = torch.Generator().manual_seed(config.seed)
    vae.to(device).train()
    vae.requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    stream = IndexStream(len(images))
    losses = []
    for step in range(1, config.steps + 1):
        idx = stream.take(config.batch_size, generator)
        x = images[idx].to(device)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(device)
        recon = vae.decode(z).sample
        rec = (recon - x).pow(2).mean()
        kl = dist.kl().mean() / x[0].numel()
        loss = rec + config.kl_weight * kl * x[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), config.max_grad_norm)
        optimizer.step()
        losses.append(float(rec.detach()))
        if progress is not None:
            progress(step, config.steps, {"loss": losses[-1]})
    vae.eval()
    vae.requires_grad_(False)
    return TrainResult(steps=config.steps, final_loss=losses[-1], losses=losses, skipped_steps=0,
                       wall_time_s=time.perf_counter() - start, config=config.to_dict(), stats={})
