"""Mitigation by capacity control (MemControl, Dutt et al.): parameter-efficient fine-tuning whose trainable units
are switched on and off by a binary mask.

:mod:`memaudit.peft` holds the PEFT methods (one file each, a registry in its ``__init__``) and
:mod:`memaudit.peft` saves, loads and merges what a method trained.
"""
