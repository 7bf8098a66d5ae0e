"""Behaviour before and after a refactoring: the demo's results.json, a search's evaluations.jsonl and a
fine-tune's weights, compared byte for byte with times (and the folders they were written to) aside.

    python benchmarks/behaviour_identity.py run WORK/LABEL        # writes WORK/LABEL/identity.json
    python benchmarks/behaviour_identity.py collect WORK/LABEL    # re-reads the files of a run into identity.json
    python benchmarks/behaviour_identity.py compare A.json B.json  # exit 1 and the differing keys when they differ

Run it on the commit before and the commit after (each in its own checkout, one at a time: it takes about ten
minutes on two CPU cores). Keys whose values are times, the machine, versions or places on disk (``wall_time_s``,
``created_utc``, ``machine``, ``versions``, ``cache_dir``, ``model``, ``journal`` ...: :data:`VOLATILE`) are set
aside before comparing; everything else must be equal.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

# Keys that hold clocks, dates, machine facts or where a run wrote: they differ between any two runs.
VOLATILE = re.compile(r"(_time|^time|wall|seconds|elapsed|_s$|date|started|finished|created|machine|host|pid|"
                      r"^versions$|path|cache_dir|folder|^model$|^journal$)", re.IGNORECASE)


def normalized(value, dropped: set[str], key: str = ""):
    if isinstance(value, dict):
        kept = {}
        for k, v in value.items():
            if VOLATILE.search(str(k)):
                dropped.add(str(k))
                continue
            kept[k] = normalized(v, dropped, str(k))
        return kept
    if isinstance(value, list):
        return [normalized(v, dropped, key) for v in value]
    return value


def sha256(path: Path) -> str:
    """The file's SHA-256; for safetensors, of its header with keys sorted and its tensor bytes: the safetensors
    writer orders the ``__metadata__`` keys differently from one process to the next (a Rust HashMap), so the
    same weights can give different file bytes."""
    data = path.read_bytes()
    if path.suffix != ".safetensors":
        return hashlib.sha256(data).hexdigest()
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True).encode()
    return hashlib.sha256(header + data[8 + n:]).hexdigest()


def run(work: Path) -> dict:
    from memaudit import demo
    from memaudit.demo.run import run_demo
    from memaudit.finetune import FinetuneConfig, finetune
    from memaudit.mitigate.search import SearchConfig, run_mask_search

    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    run_demo(work / "demo", device="cpu")
    train = demo.faces_dataset("train")
    ft = work / "finetune"
    finetune(str(demo.BASE_MODEL), train, ft, FinetuneConfig(method="svdiff", steps=12, batch_size=8, seed=3,
                                                            checkpoint_every=5),
             device="cpu", cache_dir=cache)
    full = work / "finetune-full"
    finetune(str(demo.BASE_MODEL), train, full, FinetuneConfig(method="full", steps=6, batch_size=8, seed=4,
                                                              mitigation="rwa"),
             device="cpu", cache_dir=cache)
    search = work / "search"
    run_mask_search(str(demo.BASE_MODEL), train, search,
                    SearchConfig(method="difffit", granularity="block", population=3, generations=2, inner_steps=4,
                                 batch_size=8, proxy_fraction=0.25, memorization="amd", quality="kid",
                                 quality_features="pixels", seed=5, device="cpu"), cache_dir=cache)
    return collect(work)


def collect(work: Path) -> dict:
    """The normalized record of the runs in ``work`` (also usable on folders written by an earlier version)."""
    dropped: set[str] = set()
    results = json.loads((work / "demo" / "results.json").read_text())
    weights = {}
    for name, prefix in (("finetune", ""), ("finetune-full", "full/")):
        weights.update({prefix + str(p.relative_to(work / name)): sha256(p)
                        for p in sorted((work / name).rglob("*.safetensors"))})
    rows = [json.loads(line) for line in (work / "search" / "evaluations.jsonl").read_text().splitlines()
            if line.strip()]
    doc = {"demo_results": normalized(results, dropped), "weights": weights,
           "evaluations": normalized(rows, dropped), "dropped_keys": sorted(dropped)}
    (work / "identity.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    return doc


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'after' if k in b else 'before'}")
            else:
                out += differences(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items before, {len(b)} after"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} before, {b!r} after"]


def main(argv: list[str]) -> int:
    if argv[:1] == ["run"]:
        doc = run(Path(argv[1]))
        print(f"weights: {len(doc['weights'])} files; evaluations: {len(doc['evaluations'])}; "
              f"keys set aside: {', '.join(doc['dropped_keys'])}")
        return 0
    if argv[:1] == ["collect"]:
        collect(Path(argv[1]))
        return 0
    if argv[:1] == ["compare"]:
        a, b = (json.loads(Path(p).read_text()) for p in argv[1:3])
        a.pop("dropped_keys", None), b.pop("dropped_keys", None)
        diff = differences(a, b)
        for line in diff[:50]:
            print(line)
        print(f"{len(diff)} differences" if diff else
              f"identical: demo results.json, {len(a['weights'])} weight files, {len(a['evaluations'])} evaluations")
        return 1 if diff else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
