"""The one training loop every method shares.

:func:`train_denoiser` fine-tunes (or trains from scratch) the denoiser of a :class:`~memaudit.target.Target` on an
image-caption dataset with the Stable Diffusion objective: AdamW at a constant learning rate, gradient clipping,
caption dropout for classifier-free guidance, gradient accumulation, mixed precision on CUDA, every random draw
from one seeded CPU generator. The images' VAE posteriors come from the latent cache on disk
(:mod:`memaudit.latents`: each image is encoded once, for every later run on it) and are read a batch at a time, so
the size of the training set is bounded by the disk, not the memory. Later features plug in through
:class:`TrainHook` (random word addition edits the captions, threshold mitigation weights the per-sample loss,
parameter masks edit the gradients) and through the ``params`` argument (which parameters are trained). Checkpoints
are diffusers pipeline folders written atomically, plus the optimizer, generator and hook states, so an interrupted
run resumes where it stopped and ends at the same weights. Each checkpoint lists its files and sizes
(``manifest.json``); a resume skips a damaged one (a file truncated or missing, or a training state whose CRCs fail)
for the previous intact one with a warning, and when none is intact says in one line which folder to delete
(:func:`checkpoint_problem`).

:func:`train_vae` trains an autoencoder from scratch with the same conventions; it is used to build the bundled
demo model.

- :mod:`~memaudit.training.config`: :class:`TrainConfig`, :class:`VAEConfig`.
- :mod:`~memaudit.training.hooks`: the hook protocol (:class:`TrainHook`, :class:`Batch`, :class:`LossContext`,
  :class:`TrainState`).
- :mod:`~memaudit.training.checkpoints`: writing, checking and resuming checkpoints.
- :mod:`~memaudit.training.loop`: :func:`train_denoiser` (``train_unet``: its deprecated name).
- :mod:`~memaudit.training.vae`: :func:`train_vae`.
"""

from memaudit.training.checkpoints import (
    LATEST,
    MANIFEST_FILE,
    STATE_FILE,
    STEP_DIR,
    RunClock,
    checkpoint_dirs,
    checkpoint_problem,
    latest_checkpoint,
    save_checkpoint,
)
from memaudit.training.config import TrainConfig, VAEConfig
from memaudit.training.hooks import Batch, LossContext, TrainHook, TrainState
from memaudit.training.loop import Progress, TrainResult, autocast, train_denoiser, train_unet
from memaudit.training.vae import train_vae

__all__ = [
    "LATEST",
    "MANIFEST_FILE",
    "STATE_FILE",
    "STEP_DIR",
    "Batch",
    "LossContext",
    "Progress",
    "RunClock",
    "TrainConfig",
    "TrainHook",
    "TrainResult",
    "TrainState",
    "VAEConfig",
    "autocast",
    "checkpoint_dirs",
    "checkpoint_problem",
    "latest_checkpoint",
    "save_checkpoint",
    "train_denoiser",
    "train_unet",
    "train_vae",
]
