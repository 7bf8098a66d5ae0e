"""The search's references: the method with every unit at its default learning rate, and full fine-tuning, scored like
the masks (:func:`reference_evaluations`), and how the masks on the front compare with them
(:func:`reference_verdict`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memaudit.mitigate.search.config import OBJECTIVES, SearchConfig
from memaudit.mitigate.search.log import EvaluationLog, InOrder
from memaudit.mitigate.search.nsga2 import RunJobs
from memaudit.peft import method_class

__all__ = ["reference_evaluations", "reference_verdict"]


def reference_evaluations(run: RunJobs, out: Path, config: SearchConfig) -> tuple[dict, int]:
    """The method's default (every unit at its default learning rate) and full fine-tuning, scored the same way as
    the search's evaluations (cached in ``references.jsonl``, written in that order), and how many of them were
    fine-tuned now."""
    log = EvaluationLog(out / "references.jsonl")
    wanted = []
    for name, method in (("method default", config.method), ("full fine-tuning", "full")):
        lr = method_class(method).default_lr
        wanted.append((name, method, lr, f"{method}:all-units@{lr:.6g}"))
    todo = [k for k, (_, _, _, key) in enumerate(wanted) if log.get(key) is None]

    def emit(k: int, item) -> None:
        _, method, lr, key = wanted[k]
        if item is not None:
            res, seconds = item
            log.append({**res, "key": key, "method": method, "learning_rate": lr, "wall_time_s": seconds})

    ordered = InOrder(len(wanted), emit)
    for k in set(range(len(wanted))) - set(todo):
        ordered.put(k)
    run([{"mask": None, "learning_rate": wanted[k][2], "method": wanted[k][1]} for k in todo],
        lambda j, res, seconds: ordered.put(todo[j], (res, seconds)))
    return {name: log.get(key) for name, _, _, key in wanted}, len(todo)


def reference_verdict(front: Sequence[dict], references: dict[str, dict],
                      objectives: Sequence[str] = OBJECTIVES) -> dict:
    """How the masks on the front compare with the references (every objective minimized).

    Returns ``status``:

    - ``"no front"``: the front is empty (no mask met the constraint);
    - ``"reference dominates"``: some reference is better than or equal to every mask on the front on every
      objective, i.e. no mask beats it on any (``dominating`` names them; ``strictly`` those better on every
      objective than every mask): the chosen mask is only the best of the masks;
    - ``"references unbeaten"``: no single reference does that, but on each objective the best reference
      (``best_reference``) is at least as good as every mask, so no mask beats the references on either objective;
    - ``"masks competitive"``: some mask beats the best reference on some objective.

    ``masks_better[reference][objective]`` counts the masks on the front strictly better than the reference on that
    objective; ``front_size`` is the number of masks compared.
    """
    objectives = list(objectives)
    out: dict = {"front_size": len(front), "dominating": [], "strictly": [], "best_reference": {}, "masks_better": {}}
    if not references:
        return {**out, "status": "no references"}
    names = list(references)
    ref = np.array([[references[n]["objectives"][o] for o in objectives] for n in names], dtype=float)
    out["best_reference"] = {o: names[int(np.argmin(ref[:, j]))] for j, o in enumerate(objectives)}
    if not front:
        return {**out, "status": "no front"}
    pts = np.array([[r["objectives"][o] for o in objectives] for r in front], dtype=float)
    for i, name in enumerate(names):
        better = pts < ref[i]  # [mask, objective]: the mask beats the reference on that objective
        out["masks_better"][name] = {o: int(better[:, j].sum()) for j, o in enumerate(objectives)}
        if not better.any():
            out["dominating"].append(name)
            if (ref[i] < pts).all():
                out["strictly"].append(name)
    if out["dominating"]:
        status = "reference dominates"
    elif (pts >= ref.min(0)).all():
        status = "references unbeaten"
    else:
        status = "masks competitive"
    return {**out, "status": status}
