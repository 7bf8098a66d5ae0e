"""Load a diffusers text-to-image checkpoint of any supported family as an audit *target*.

A :class:`Target` holds a diffusers pipeline and its :mod:`family <memaudit.families>` (Stable Diffusion 1.x/2.x,
SDXL, SD3, Flux, PixArt), and gives the audit what it needs in one place: prompt conditioning (cached), the noise
prediction *in epsilon space* whatever the model predicts (epsilon, v, sample or a flow velocity), noising and
training targets, and the latent encode/decode of images.

- :mod:`~memaudit.target.target`: the :class:`Target` dataclass.
- :mod:`~memaudit.target.load`: :func:`load_target` (folders, hub ids in the local cache), :func:`from_pipeline`.
- :mod:`~memaudit.target.lora`: LoRA adapters (:func:`apply_lora`), their checks, scale and digests.

Devices and dtypes (:func:`resolve_device`, :func:`resolve_dtype`) live in :mod:`memaudit.core.devices`.
"""

from memaudit.core.devices import resolve_device, resolve_dtype
from memaudit.families.base import PREDICTION_TYPES, output_to_eps, training_target
from memaudit.target.load import from_pipeline, index_components, load_target
from memaudit.target.lora import apply_lora, file_sha256, lora_module_name, lora_scale
from memaudit.target.target import Target

__all__ = ["PREDICTION_TYPES", "Target", "apply_lora", "file_sha256", "from_pipeline", "index_components",
           "load_target", "lora_module_name", "lora_scale", "output_to_eps", "resolve_device", "resolve_dtype",
           "training_target"]
