"""``memaudit audit``: which training images does a model reproduce? One sampling pass, three measures.

1. Sample ``generations`` images per prompt with the :class:`~memaudit.sampling.Sampler`; the guidance norms it
   records give every prompt's denoising strength (Wen et al.) at no extra UNet cost.
2. As batches stream in: features of each image against a faiss index of the training set give AMD (mean over
   images of the minimum cosine distance to the training set); once a prompt's generations are complete, the
   extraction attack (Carlini et al.) looks for a large clique of near-identical generations and checks its medoid
   against the training set.
3. Reference prompts known not to be memorized (optional) calibrate the denoising threshold at a chosen
   false-positive rate; the extraction verdicts label prompts for an ROC of the denoising score.

Results go to ``out/`` atomically: ``results.json`` (schema in :mod:`memaudit.report`), PNG grids of flagged
prompts, the nearest training images (never with ``redact``), and ``report.html``. Nothing is written until every
input has been checked; a failed run leaves an earlier ``out/`` untouched.

Work units and the journal. Prompts are sampled in work units of whole prompts (:func:`unit_prompts`: as many as
make the sampler's batches exactly those of one pass over every prompt), and each unit is reduced by
:meth:`AuditWorker.run_unit` to what the audit keeps of it: guidance norms, image features, the clique part of the
extraction verdict with its medoid, and the grid of a flagged prompt. The same method runs in this process
(``workers=1``) and in every Ray worker (``workers>1``, :mod:`memaudit.distributed`); the driver owns the faiss index,
the medoid lookup, the journal and every file. While an audit runs, each finished unit is appended to a journal in
``OUT.partial/`` (:class:`AuditJournal`): running the same audit again after a crash or Ctrl-C takes every journaled
prompt from it and samples only the others, and ends with the same ``results.json``; other settings, model, data or
prompts are refused. ``OUT.partial/`` is deleted when ``out/`` is complete. With ``redact`` the journal holds no
grid of an extracted prompt and no image features (only distances), and it is deleted at the end like the rest.

The package, step by step:

- :mod:`~memaudit.audit.config`: :class:`AuditConfig`, the settings in an audit's identity, seeds and score window;
- :mod:`~memaudit.audit.prompts`: prompt files (:func:`read_prompts`);
- :mod:`~memaudit.audit.inputs`: what an audit reads, checked before anything is written, and its identity;
- :mod:`~memaudit.audit.training`: the training set's feature index and thumbnail lookup, cached by content;
- :mod:`~memaudit.audit.worker`: :class:`AuditWorker`, sampling whole prompts, in this process or on Ray;
- :mod:`~memaudit.audit.units`: work units, and the driver's reduction of each against the training set;
- :mod:`~memaudit.audit.journal`: :class:`AuditJournal` in ``OUT.partial/``;
- :mod:`~memaudit.audit.assemble`: the results dict from the journaled units (pure);
- :mod:`~memaudit.audit.run`: :func:`run_audit`, the recipe.
"""

from memaudit.audit.assemble import denoising_note
from memaudit.audit.config import (
    MAX_GENERATIONS,
    NOT_IN_IDENTITY,
    AuditConfig,
    Progress,
    identity_settings,
    reference_seed,
    score_window,
)
from memaudit.audit.inputs import audit_inputs, model_digest
from memaudit.audit.journal import (
    IDENTITY_PARTS,
    JOURNAL_KIND,
    JOURNAL_VERSION,
    AuditJournal,
    journal_dir,
    journal_kept,
)
from memaudit.audit.prompts import read_prompts
from memaudit.audit.run import run_audit
from memaudit.audit.training import cache_key
from memaudit.audit.units import MAX_UNIT_PROMPTS, unit_prompts, work_units
from memaudit.audit.worker import AuditWorker, WorkerSpec
from memaudit.core.provenance import versions  # benchmarks read the versions a result records from here

__all__ = ["IDENTITY_PARTS", "JOURNAL_KIND", "JOURNAL_VERSION", "MAX_GENERATIONS", "MAX_UNIT_PROMPTS",
           "NOT_IN_IDENTITY", "AuditConfig", "AuditJournal", "AuditWorker", "Progress", "WorkerSpec", "audit_inputs",
           "cache_key", "denoising_note", "identity_settings", "journal_dir", "journal_kept", "model_digest",
           "read_prompts", "reference_seed", "run_audit", "score_window", "unit_prompts", "versions", "work_units"]
