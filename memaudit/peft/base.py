"""The base class of every PEFT method: what trains, its units, adapter state, merging.

A method is built on a diffusers denoiser -- a ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, SDXL) or a
transformer (DiT: ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``PixArtTransformer2DModel``) -- and changes it
in place: it installs its extra modules (SV-DIFF's spectral shifts, DiffFit's scales, LoRA's low-rank factors), then
freezes every denoiser parameter that is not its own. Its trainable parameters are partitioned into *units*, the
bits of a MemControl mask (:mod:`memaudit.peft.units` says how, from the denoiser's family).

:meth:`PEFTMethod.merge` bakes the adaptation into the plain weights and removes every installed module, so the
denoiser is again a plain diffusers model with its original ``state_dict`` keys, loadable by diffusers without
memaudit. :meth:`PEFTMethod.unload` removes the installed modules *without* baking anything in (the mask search uses
it to give the live denoiser back after an evaluation).

A new method subclasses :class:`PEFTMethod` in its own file, overrides :meth:`PEFTMethod._install` (if it adds
modules), :meth:`PEFTMethod._trainable_names` and :meth:`PEFTMethod._merge`, and is registered with one line in
:mod:`memaudit.peft.registry`.
"""

from __future__ import annotations

import abc
import logging
import warnings
from collections.abc import Sequence

import torch

from memaudit.core.errors import ConfigError
from memaudit.peft.layers import Wrapper, is_peft_layer, replace_module
from memaudit.peft.units import GRANULARITIES, Unit, block_layout, units_command

__all__ = ["PEFTMethod"]

logger = logging.getLogger(__name__)


class PEFTMethod(abc.ABC):
    """A parameter-efficient fine-tuning method on a diffusers denoiser (UNet or DiT), with maskable units.

    Building it changes ``denoiser`` in place (see the module docstring); :meth:`merge` undoes the structural
    change keeping the adaptation, :meth:`unload` undoes it dropping the adaptation.
    """

    name: str = ""
    default_lr: float = 1e-4
    description: str = ""
    #: the base model the denoiser was loaded from, when the caller knows it (:func:`get_method`'s ``base``); only used
    #: to name it in messages
    base: str | None = None

    def __init__(self, denoiser: torch.nn.Module, granularity: str = "block"):
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}; "
                              "use block (one unit per transformer block) or layer (one unit per layer).")
        installed = [n for n, m in denoiser.named_modules() if isinstance(m, Wrapper) or is_peft_layer(m)]
        if installed:
            raise ConfigError(f"this denoiser already carries a PEFT method (at {installed[0]}); merge it first "
                              "(method.merge()) or load a fresh base model.")
        self.denoiser = denoiser
        self.granularity = granularity
        self._merged = False
        # the base's own parameters (the same objects stay in the model through install, merge and unload) and
        # whether each required gradients, for unload()
        self._base = [(p, p.requires_grad) for p in denoiser.parameters()]
        self._denoiser_parameters = sum(p.numel() for p in denoiser.parameters())
        self._layout = block_layout(denoiser)  # the block units, from the denoiser's family
        self._transformers = list(self._layout.transformers)
        self._install()
        chosen = set(self._trainable_names())
        self._names = [n for n, _ in denoiser.named_parameters() if n in chosen]
        unknown = chosen - set(self._names)
        if unknown:  # a bug in a method, not a user mistake
            raise RuntimeError(f"method {self.name} selected parameters the denoiser does not have: "
                               f"{sorted(unknown)[:3]}")
        for n, p in denoiser.named_parameters():
            p.requires_grad_(n in chosen)
        self._units = self._build_units()
        logger.info("%s (%s): %d trainable parameters in %d units", self.name, granularity,
                    self.trainable_count(), len(self._units))

    @property
    def unet(self) -> torch.nn.Module:
        """Deprecated name of :attr:`denoiser` (from when every denoiser was a UNet), read-only; kept for one
        release."""
        warnings.warn("PEFTMethod.unet is deprecated; use PEFTMethod.denoiser", DeprecationWarning, stacklevel=2)
        return self.denoiser

    # -- what subclasses provide ------------------------------------------------------------------------------
    def _install(self) -> None:  # noqa: B027 (optional hook: most methods install nothing)
        """Install the method's extra modules in ``self.denoiser`` (default: none)."""

    @abc.abstractmethod
    def _trainable_names(self) -> list[str]:
        """Qualified names (as in ``denoiser.named_parameters()`` after :meth:`_install`) of the trainable
        parameters."""

    def _merge(self) -> None:  # noqa: B027 (optional hook: nothing to merge when nothing was installed)
        """Bake the adaptation into plain weights and remove installed modules (default: nothing installed)."""

    def _unload(self) -> None:
        """Remove every installed module without merging: each :class:`Wrapper` gives back its plain layer and each
        ``peft`` layer its base layer, with their own (unchanged) parameters. Subclasses that install something else
        extend it."""
        wrapped = [(n, m) for n, m in self.denoiser.named_modules() if isinstance(m, Wrapper)]
        for name, m in wrapped:
            replace_module(self.denoiser, name, m.unwrap())
        from_peft = [(n, m) for n, m in self.denoiser.named_modules()
                     if is_peft_layer(m) and hasattr(m, "get_base_layer")]
        for name, m in from_peft:
            replace_module(self.denoiser, name, m.get_base_layer())

    def _layer_of(self, param_name: str) -> str:
        """The layer unit of a trainable parameter: by default the module owning it (a parameter of the denoiser
        itself, such as PixArt's ``scale_shift_table``, is its own unit)."""
        return param_name.rpartition(".")[0] or param_name

    # -- helpers for subclasses -----------------------------------------------------------------------------
    def _names_where(self, predicate) -> list[str]:
        """Names of the parameters directly owned by modules for which ``predicate(module_name, module)`` holds."""
        out = []
        for mname, module in self.denoiser.named_modules():
            if predicate(mname, module):
                out += [f"{mname}.{p}" if mname else p for p, t in module.named_parameters(recurse=False)]
        return out

    def _in_transformer(self, module_name: str) -> bool:
        return self._layout.in_transformer(module_name)

    # -- units ----------------------------------------------------------------------------------------------
    def _build_units(self) -> list[Unit]:
        sizes = dict(self.denoiser.named_parameters())
        rank = {name: i for i, name in enumerate(self._layout.names)}
        groups: dict[str, list[str]] = {}
        order: dict[str, tuple[int, int]] = {}
        for i, pname in enumerate(self._names):
            block = self._layout.block_of(pname)
            key = block if self.granularity == "block" else self._layer_of(pname)
            if key not in groups:
                groups[key] = []
                order[key] = (rank[block], i)
            groups[key].append(pname)
        names = sorted(groups, key=order.__getitem__)
        return [Unit(n, groups[n], sum(sizes[p].numel() for p in groups[n])) for n in names]

    # -- the public interface -------------------------------------------------------------------------------
    def _check_live(self) -> None:
        if self._merged:
            raise ConfigError(f"the {self.name} method was merged into (or unloaded from) the denoiser; build a new "
                              "method to train again.")

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """Every trainable parameter of the method, by qualified name, in ``denoiser.named_parameters()`` order."""
        self._check_live()
        params = dict(self.denoiser.named_parameters())
        return {n: params[n] for n in self._names}

    def trainable_count(self) -> int:
        return sum(u.count for u in self._units)

    def units(self) -> list[Unit]:
        """The maskable units: a partition of :meth:`trainable` (see the module docstring for their order)."""
        self._check_live()
        return [Unit(u.name, list(u.param_names), u.count) for u in self._units]

    def check_units(self, made_for: dict) -> None:
        """ConfigError (one line, naming the first unit that differs) unless this method's units are those a mask was
        made for: ``made_for["units"]`` is ``[[name, parameters], ...]`` in mask order, as ``mask.json`` records them
        (:func:`memaudit.mitigate.finetune.mask_units`), with the model it was made on in ``base``, ``family`` and
        ``denoiser`` (optional, for the message). A mask is bits by position: on other units it would switch other
        parameters than the search chose."""
        try:
            expected = [(str(name), int(count)) for name, count in made_for["units"]]
        except (KeyError, TypeError, ValueError):
            raise ConfigError("the mask's units must be [[name, parameters], ...], as mask.json records "
                              "them.") from None
        here = [(u.name, u.count) for u in self._units]
        if expected == here:
            return
        i = next((k for k, (a, b) in enumerate(zip(expected, here)) if a != b), min(len(expected), len(here)))

        def show(units: list[tuple[str, int]]) -> str:
            return f"{units[i][0]} ({units[i][1]:,} parameters)" if i < len(units) else "(none)"

        made = [str(made_for[k]) for k in ("base", "family", "denoiser") if made_for.get(k)]
        origin = f" (made on {', '.join(made)})" if made else ""
        on = f"{self.base}, " if self.base else ""
        raise ConfigError(f"the mask{origin} was made for other units than {self.name} at {self.granularity} "
                          f"granularity has here ({on}{type(self.denoiser).__name__}): its unit {i} is {show(expected)}, "
                          f"here unit {i} is {show(here)} ({len(expected)} vs {len(here)} units); search a mask on "
                          f"this model (memaudit mitigate search).")

    def check_mask(self, mask: Sequence, made_for: dict | None = None) -> list[int]:
        """``mask`` as a list of 0/1 ints, one per unit; ConfigError when it does not fit this method, or (with
        ``made_for``, see :meth:`check_units`) when it was made for other units."""
        if made_for is not None:
            self.check_units(made_for)
        try:
            bits = list(mask)
        except TypeError:
            raise ConfigError(f"mask must be a sequence of 0/1 values, one per unit, not {type(mask).__name__}.") from None
        if len(bits) != len(self._units):
            on = f" on {self.base}" if self.base else ""
            raise ConfigError(f"mask has {len(bits)} bits but method {self.name} at {self.granularity} granularity has "
                              f"{len(self._units)} units{on}; pass one 0/1 value per unit, in the order that "
                              f"`{units_command(self.name, self.granularity, self.base)}` lists them.")
        out = []
        for i, b in enumerate(bits):
            if isinstance(b, str) or b not in (0, 1):
                raise ConfigError(f"mask bit {i} is {b!r}; every bit must be 0 or 1.")
            out.append(int(b))
        return out

    def parameters_for(self, mask: Sequence, made_for: dict | None = None) -> list[torch.nn.Parameter]:
        """The parameters of the units whose bit is 1, in unit order (``made_for``: see :meth:`check_units`).

        They become the only parameters of the denoiser that require gradients (the method's other parameters are
        frozen), so the switched-off units cost no gradient computation. An all-zero mask gives ``[]``: nothing to
        train, and the caller should skip training.
        """
        bits = self.check_mask(mask, made_for)
        params = self.trainable()
        chosen = [n for u, b in zip(self._units, bits) if b for n in u.param_names]
        on = set(chosen)
        for n, p in params.items():
            p.requires_grad_(n in on)
        return [params[n] for n in chosen]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """What training changed, enough to rebuild the adapted denoiser on its base: every trainable tensor (CPU)."""
        return {n: p.detach().to("cpu").contiguous().clone() for n, p in self.trainable().items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy an :meth:`adapter_state` into the method's parameters; every key and shape must match."""
        params = self.trainable()
        missing = [n for n in params if n not in state]
        if missing:
            raise ConfigError(f"the adapter state lacks {missing[0]} ({len(missing)} missing) for method {self.name} "
                              f"at {self.granularity} granularity; it was saved by another method or base model.")
        unexpected = [k for k in state if k not in params]
        if unexpected:
            raise ConfigError(f"the adapter state has an unexpected tensor {unexpected[0]} for method {self.name}; "
                              "it was saved by another method or base model.")
        for n, p in params.items():
            t = state[n]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ConfigError(f"adapter tensor {n} has shape {got} but this denoiser needs {tuple(p.shape)}; "
                                  "load the adapter onto the base model it was trained from.")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n].to(device=p.device, dtype=p.dtype))

    def merge(self) -> None:
        """Bake the adaptation into plain denoiser weights and remove every installed module.

        Afterwards the denoiser is a plain diffusers model (``UNet2DConditionModel``, ``SD3Transformer2DModel``, ...)
        with its original ``state_dict`` keys and every parameter frozen; the method is spent (build a new one to
        train again).
        """
        self._check_live()
        with torch.no_grad():
            self._merge()
        for p in self.denoiser.parameters():
            p.requires_grad_(False)
        self._merged = True

    def unload(self) -> None:
        """Remove every installed module *without* merging, and give every parameter back the ``requires_grad`` it
        had before the method was built; the method is spent.

        What the method installed (spectral shifts, scales, LoRA factors) is dropped, so a method that trains only
        its own modules (``svdiff``, ``lora``) leaves the denoiser bit-for-bit the base, however it was trained. A
        method that trains base parameters directly (``full``, ``attention``, ``bias``, ``norm``, DiffFit's biases
        and norms) changed them in place: :meth:`base_parameters` says which, and a caller that wants the base back
        keeps a copy of those beforehand (as :class:`memaudit.mitigate.search.MaskEvaluator` does).
        """
        self._check_live()
        with torch.no_grad():
            self._unload()
        for p, flag in self._base:
            p.grad = None
            p.requires_grad_(flag)
        self._merged = True

    def base_parameters(self, params: Sequence[torch.nn.Parameter] | None = None) -> list[torch.nn.Parameter]:
        """Those of ``params`` (default: every trainable parameter) that belong to the base denoiser itself rather than
        to a module the method installed: the tensors that training changes in place in the base model."""
        params = list(self.trainable().values()) if params is None else list(params)
        base = {id(p) for p, _ in self._base}
        return [p for p in params if id(p) in base]

    @property
    def merged(self) -> bool:
        return self._merged

    @property
    def denoiser_parameters(self) -> int:
        """The parameter count of the (original) denoiser."""
        return self._denoiser_parameters

    def summary(self) -> dict:
        """Method, granularity, units with their sizes, and the trainable share of the (original) denoiser
        (its size under the historical key ``unet_parameters``)."""
        n = self.trainable_count()
        return {
            "method": self.name,
            "granularity": self.granularity,
            "units": [{"name": u.name, "count": u.count} for u in self._units],
            "trainable_parameters": n,
            "unet_parameters": self._denoiser_parameters,
            "trainable_percent": 100.0 * n / max(self._denoiser_parameters, 1),
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, granularity={self.granularity!r}, "
                f"units={len(self._units)}, trainable={self.trainable_count()})")
