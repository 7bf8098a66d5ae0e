"""The inner loop of the mask search: :class:`MaskEvaluator` fine-tunes the base denoiser with a mask on the proxy
split and scores the result (memorization and quality)."""

from __future__ import annotations

import os
import time
from functools import cached_property

import torch

from memaudit.attacks.denoising import training_strength
from memaudit.attacks.extraction import analyze_prompt
from memaudit.features import get_extractor
from memaudit.latents import latents_for
from memaudit.metrics.amd import amd_bruteforce
from memaudit.metrics.quality import fid_from_features, kid_from_features
from memaudit.mitigate.search.config import SearchConfig
from memaudit.mitigate.search.nsga2 import OnResult, Progress
from memaudit.peft import get_method
from memaudit.sampling import Sampler
from memaudit.training import TrainConfig, train_denoiser

__all__ = ["MaskEvaluator", "method_units"]


def method_units(target, config: SearchConfig) -> tuple[list, dict]:
    """The units of ``config.method`` at ``config.granularity`` on ``target``'s denoiser, and the method's summary
    (parameter counts): read off the method built on the denoiser, which is then taken out again."""
    probe = get_method(config.method, target.denoiser, config.granularity, base=target.path or None)
    try:
        return probe.units(), probe.summary()
    finally:
        probe.unload()


class MaskEvaluator:
    """Fine-tunes the base denoiser with a mask on the proxy split and scores it (the inner loop).

    Every evaluation works on the target's own denoiser, never on a copy (a copy of SDXL's UNet is 10 GB, Flux's
    transformer 48 GB in float32): the method is installed on it, trained and scored, then taken out again without
    merging (:meth:`memaudit.peft.PEFTMethod.unload`), so what it installed (spectral shifts, scales, LoRA
    factors) is dropped and the plain layers come back with their own parameters. The base parameters the mask
    trains directly (``full``, ``attention``, ``bias``, ``norm``, DiffFit's biases and norms;
    :meth:`~memaudit.peft.PEFTMethod.base_parameters`) are copied to the CPU before training and copied
    back afterwards: only those tensors, and only for the evaluation's duration. SV-DIFF and LoRA copy nothing; full
    fine-tuning (the reference evaluation) is the one case that copies every denoiser parameter. After each
    evaluation the denoiser is bit-for-bit the base again (same tensors, ``requires_grad`` flags, no gradients, eval
    mode), so every evaluation starts from the same base, as with a fresh copy.

    Images are streamed: the proxy images' latents come from the latent cache in ``cache_dir`` (default: memaudit's
    cache folder; :mod:`memaudit.latents`), filled at the first evaluation and found by every later one (and by later
    searches and fine-tunes on the same images); the validation and proxy images' features are computed a batch of
    ``batch_size`` images at a time.

    Training sees every image of the proxy split with all its copies (the duplication a search on a duplicated set
    must keep); the objectives score each distinct image once (:meth:`memaudit.data.ImageCaptionDataset.distinct`):
    one prompt per distinct proxy image for memorization and one per distinct validation image for quality, as the
    audit of a duplicated set asks each distinct training image once, so that a product seen 32 times is neither
    sampled 32 times nor counted 32 times in the quality reference.
    """

    def __init__(self, target, proxy, val, config: SearchConfig, progress: Progress | None = None,
                 cache_dir: str | os.PathLike | None = None, batch_size: int = 64):
        self.target, self.proxy, self.val, self.config = target, proxy, val, config
        # the images the objectives score: each distinct image once (the datasets themselves when they hold no copies)
        self.scored_proxy, self._scored_proxy_index = proxy.distinct()
        self.scored_val = val.distinct()[0]
        self.cache_dir, self.batch_size = cache_dir, batch_size
        self.progress = progress or (lambda *_: None)
        self.units, self.summary = method_units(target, config)
        self.extractor = get_extractor(config.quality_features, device=str(target.device))
        # the features of the validation and proxy images are computed at the first evaluation (never, when every
        # evaluation comes from the logs)

    def _features(self, dataset):
        parts = [self.extractor((x + 1) / 2) for _, x in dataset.batches(self.batch_size)]
        return torch.cat(parts)

    @cached_property
    def val_features(self):
        return self._features(self.scored_val)

    @cached_property
    def proxy_features(self):
        return self._features(self.scored_proxy)

    @cached_property
    def latents(self):
        """The proxy images' VAE posteriors in the latent cache (encoded at the first use if the cache lacks them)."""
        return latents_for(self.target, self.proxy, self.cache_dir,
                           progress=lambda done, total: self.progress("latent cache", done, total))

    @property
    def cache_report(self) -> dict | None:
        """What the latent cache held and encoded for this search (None when no evaluation ran)."""
        return self.latents.report if "latents" in self.__dict__ else None

    @cached_property
    def proxy_latents(self):
        """The scored proxy images' latents (posterior means)."""
        return self.latents.means(self._scored_proxy_index)

    def fresh(self, method: str | None = None):
        """``method`` (default: the searched one) installed on the target's denoiser, in place; the caller takes it
        out again with ``unload()`` (as :meth:`__call__` does)."""
        return get_method(method or self.config.method, self.target.denoiser, self.config.granularity,
                          base=self.target.path or None)

    def __call__(self, mask: list[int] | None, lr: float, method: str | None = None, steps: int | None = None) -> dict:
        """Fine-tune with ``mask`` (None: every unit) at ``lr`` for ``steps`` (default: the inner steps) and score;
        ``method`` overrides the searched one. The denoiser is the base again afterwards (see the class docstring),
        also when training or scoring fails."""
        cfg = self.config
        steps = cfg.inner_steps if steps is None else steps
        denoiser = self.target.denoiser
        was_training = denoiser.training
        peft = self.fresh(method)
        saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        try:
            params = peft.parameters_for(mask if mask is not None else [1] * len(peft.units()))
            n = sum(p.numel() for p in params)
            # the base tensors training will change in place, kept on the CPU until the evaluation ends
            saved = [(p, p.detach().to("cpu", copy=True)) for p in peft.base_parameters(params)]
            if params:
                train_denoiser(self.target, self.proxy, TrainConfig(steps=steps, batch_size=cfg.batch_size,
                                                                learning_rate=lr, seed=cfg.seed, log_every=0),
                           params=params, progress=lambda s, t, _logs: self.progress("step", s, t),
                           latents=self.latents)
            denoiser.eval()
            mem, details = self.memorization()
            quality = self.quality()
        finally:
            with torch.no_grad():
                for p, copy in saved:
                    p.copy_(copy)
            peft.unload()
            denoiser.train(was_training)
        return {"objectives": {"memorization": mem, "quality": quality}, "trainable_parameters": n,
                "trainable_percent": 100.0 * n / self.summary["unet_parameters"], "details": details,
                "inner_steps": steps if params else 0}

    def run(self, jobs: list[dict], on_result: OnResult) -> None:
        """Evaluate ``jobs`` one after the other in this process (a :data:`RunJobs`): each a dict with ``mask``
        (None: every unit), ``learning_rate`` and optionally ``method`` and ``steps``, as :meth:`__call__` takes
        them."""
        for k, job in enumerate(jobs):
            t0 = time.perf_counter()
            out = self(job.get("mask"), job["learning_rate"], method=job.get("method"), steps=job.get("steps"))
            on_result(k, out, time.perf_counter() - t0)

    def _sample(self, captions: list[str], seed: int):
        cfg = self.config
        sampler = Sampler(self.target, steps=cfg.sample_steps, guidance=cfg.guidance, batch_size=64, seed=seed)
        return list(sampler.run(captions, cfg.generations_per_prompt))

    def memorization(self) -> tuple[float, dict]:
        cfg = self.config
        if cfg.memorization == "denoising":
            g = torch.Generator().manual_seed(cfg.seed)
            reps = [training_strength(self.target, self.proxy_latents, self.scored_proxy.captions, generator=g)
                    for _ in range(4)]
            value = float(torch.stack(reps).mean())
            return value, {"denoising_strength": value}
        batches = self._sample(self.scored_proxy.captions, cfg.seed + 2)
        images = torch.cat([b.images for b in batches])
        if cfg.memorization == "amd":
            feats = self.extractor(images).numpy()
            value = float(amd_bruteforce(feats, self.proxy_features.numpy()).amd)
            return -value, {"amd": value}
        ext = cfg.extraction()
        per = images.reshape(len(self.scored_proxy), cfg.generations_per_prompt, *images.shape[1:])
        extracted = 0
        # each prompt's medoid is compared with its own image only: the proxy images are read a batch at a time
        for index, x in self.scored_proxy.batches(self.batch_size):
            for k, i in enumerate(index.tolist()):
                extracted += analyze_prompt(per[i], ext, (x[k : k + 1] + 1) / 2, 0).extracted
        return float(extracted), {"extracted": int(extracted)}

    def quality(self) -> float:
        batches = self._sample(self.scored_val.captions, self.config.seed + 3)
        fake = self.extractor(torch.cat([b.images for b in batches]))
        if self.config.quality == "fid":
            return float(fid_from_features(self.val_features, fake))
        return float(kid_from_features(self.val_features, fake, seed=self.config.seed)[0])
