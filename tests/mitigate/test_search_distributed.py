"""``memaudit mitigate search --workers N``: the search's evaluations on Ray workers.

Without Ray: evaluations that come back in any order are logged in ask order (the log of a sequential search), each
new mask is evaluated once per generation even when two genomes decode to it, and a generation that fails part-way
keeps the evaluations asked before the failure. On a local Ray instance with two CPU workers (one per test module, two
CPUs, no dashboard): two workers give the files of a search in this process, bit for bit, running the evaluations
concurrently and none in the driver; a worker process killed in the middle of an evaluation is replaced, the
evaluation runs again and the files stay the same; a search interrupted in this process is finished by the CLI with
two workers, which evaluate only what the logs lack; bad input (--workers 0, an unreachable --ray-address, Ray
missing, --ray-address without workers, a cluster too small) is one line and writes nothing.

Every Ray worker process runs a setup hook (``worker_process_setup_hook``) that logs the start and the end of each
evaluation it runs (process id, mask, learning rate, method, steps, time) to a file, and, while a marker file exists,
waits a while after logging the start: the kill test has time to kill a worker in the middle of an evaluation."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import memaudit.cli as cli
from memaudit.core.errors import ConfigError
from memaudit.mitigate.search import EvaluationLog, MaskEvaluator, SearchConfig, key_of, nsga2_search, run_mask_search

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # CI runs it; `pytest -m "not slow"` leaves it out

#: what may differ between a search in this process and one on Ray workers
DIFFERENT = {"wall_time_s", "workers", "ray_address", "versions", "path"}
#: settings of every search here; the CLI arguments that give the same settings
SETTINGS = dict(method="difffit", population=3, generations=2, inner_steps=2, schedule="screen", screen_steps=1,
                batch_size=2, lr_choices=(1e-3, 1e-2), quality_features="pixels", device="cpu")
CLI_ARGS = ["--method", "difffit", "--population", "3", "--generations", "2", "--inner-steps", "2", "--schedule",
            "screen", "--screen-steps", "1", "--batch-size", "2", "--lr-choices", "1e-3,1e-2", "--quality-features",
            "pixels", "--device", "cpu"]
FILES = ("evaluations.jsonl", "promoted.jsonl", "references.jsonl", "pareto.json", "mask.json", "search.json")


# -- without Ray: the driver's order -------------------------------------------------------------------------------
WEIGHTS = [2.0 ** (3 - i) for i in range(6)]


def _synthetic(mask, lr):
    ones = sum(mask)
    return {"objectives": {"ones": float(ones) + lr, "missed": sum(w for w, b in zip(WEIGHTS, mask) if not b)},
            "trainable_parameters": ones, "trainable_percent": 100.0 * ones / len(WEIGHTS)}


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_time_s"} for line in path.read_text().splitlines()]


def test_results_in_any_order_are_logged_in_ask_order_and_each_mask_once(tmp_path, monkeypatch):
    import memaudit.mitigate.search.nsga2 as search  # nsga2_search looks decode up in its own module

    # three learning rates on two genes: the gene value 3 decodes to the first rate, like 0, so two genomes of a
    # generation can stand for one evaluation
    args = dict(objectives=["ones", "missed"], lr_choices=(1e-3, 2e-3, 3e-3), population=10, generations=8, seed=3)
    nsga2_search(len(WEIGHTS), _synthetic, tmp_path / "sequential.jsonl", **args)
    generations, batches = [], []  # per generation: the keys asked, the keys sent
    real_decode = search.decode

    def decode(genome, n_units, lr_choices):
        mask, lr = real_decode(genome, n_units, lr_choices)
        generations[-1].append(key_of(mask, lr))
        return mask, lr

    def progress(stage, done, total):
        if stage == "generation" and (not generations or generations[-1]):
            generations.append([])  # a generation starts (or the search ends)

    monkeypatch.setattr(search, "decode", decode)

    def backwards(jobs, on_result):  # every job of a generation at once, the results in reverse order
        keys = [key_of(mask, lr) for mask, lr in jobs]
        batches.append(keys)
        for k in reversed(range(len(jobs))):
            on_result(k, _synthetic(*jobs[k]), 0.0)

    res = nsga2_search(len(WEIGHTS), None, tmp_path / "many.jsonl", evaluate_many=backwards, progress=progress,
                       **args)
    assert _rows(tmp_path / "many.jsonl") == _rows(tmp_path / "sequential.jsonl")
    keys = [k for batch in batches for k in batch]
    assert len(keys) == len(set(keys)) == res.evaluated == len(res.rows)  # each mask once, cached ones never sent
    assert len(batches) == len(res.history) and max(map(len, batches)) > 1
    # a generation asked for two genomes that decode to one (mask, lr), and for masks already logged: neither was sent
    generations = [g for g in generations if g]
    assert len(generations) == len(batches)
    assert any(len(set(g)) < len(g) for g in generations)
    assert sum(len(set(g)) for g in generations) > len(keys)


def test_a_generation_that_fails_keeps_the_evaluations_asked_before(tmp_path):
    args = dict(objectives=["ones", "missed"], population=4, generations=3, seed=1)
    nsga2_search(len(WEIGHTS), _synthetic, tmp_path / "whole.jsonl", **args)
    whole = _rows(tmp_path / "whole.jsonl")

    class Lost(Exception):
        pass

    def third_and_first_then_lost(jobs, on_result):  # job 2 and job 0 come back, then the run fails
        on_result(2, _synthetic(*jobs[2]), 0.0)
        on_result(0, _synthetic(*jobs[0]), 0.0)
        raise Lost

    path = tmp_path / "log.jsonl"
    with pytest.raises(Lost):
        nsga2_search(len(WEIGHTS), None, path, evaluate_many=third_and_first_then_lost, **args)
    assert _rows(path) == whole[:1]  # job 2 waited for job 1, which never came
    res = nsga2_search(len(WEIGHTS), _synthetic, path, **args)
    assert _rows(path) == whole and res.evaluated == len(whole) - 1


# -- on a local Ray instance ----------------------------------------------------------------------------------------
def _worker_hook(log: str, slow: str):
    """Run in every Ray worker process: log the start and end of each evaluation; wait after the start while the
    file ``slow`` exists."""

    def hook():
        import json
        import os
        import time

        from memaudit.mitigate.search import MaskEvaluator

        real = MaskEvaluator.__call__

        def call(self, mask, lr, method=None, steps=None):
            job = {"pid": os.getpid(), "mask": mask, "lr": lr, "method": method, "steps": steps}
            with open(log, "a") as f:
                f.write(json.dumps({**job, "event": "start", "time": time.time()}) + "\n")
            if os.path.exists(slow):
                time.sleep(1.5)
            out = real(self, mask, lr, method=method, steps=steps)
            with open(log, "a") as f:
                f.write(json.dumps({**job, "event": "end", "time": time.time()}) + "\n")
            return out

        MaskEvaluator.__call__ = call

    return hook


@pytest.fixture(scope="module")
def ray_log(tmp_path_factory):
    """A local Ray instance for the module; yields the file its workers log their evaluations to (the marker that
    slows them down is ``<log>.slow``)."""
    ray = pytest.importorskip("ray")
    log = tmp_path_factory.mktemp("ray") / "evaluations.log"
    log.touch()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _worker_hook(str(log), str(log) + ".slow")})
    yield log
    ray.shutdown()


def events(log: Path) -> list[dict]:
    """The workers' evaluation events, without a last line still being written."""
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def job_of(e: dict) -> tuple:
    return (None if e["mask"] is None else "".join(map(str, e["mask"])), e["lr"], e["method"], e["steps"])


def jobs_of(out: Path) -> Counter:
    """The evaluations a search's logs hold, as the workers' hook logs their calls."""
    screening = [(("".join(map(str, r["mask"]))), r["learning_rate"], None, 1) for r in EvaluationLog(out / FILES[0]).rows]
    promoted = [(("".join(map(str, r["mask"]))), r["learning_rate"], None, None)
                for r in EvaluationLog(out / FILES[1]).rows]
    references = [(None, r["learning_rate"], r["method"], None) for r in EvaluationLog(out / FILES[2]).rows]
    return Counter(screening + promoted + references)


def comparable(out: Path, also: tuple[str, ...] = ()) -> dict[str, str]:
    """The search's files without what may differ (:data:`DIFFERENT`, and the keys ``also``)."""
    different = DIFFERENT | set(also)

    def drop(d):
        if isinstance(d, dict):
            return {k: drop(v) for k, v in d.items() if k not in different}
        if isinstance(d, list):
            return [drop(v) for v in d]
        return d

    docs = {}
    for name in FILES:
        text = (out / name).read_text()
        items = [json.loads(line) for line in text.splitlines()] if name.endswith(".jsonl") else json.loads(text)
        docs[name] = json.dumps(drop(items), sort_keys=True)
    assert docs["search.json"] and (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    return docs


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, tiny_dir_eps, data_dir):
    """The search in this process (--workers 1, one torch thread): what every search on workers must give."""
    root = tmp_path_factory.mktemp("one")
    doc = run_mask_search(str(tiny_dir_eps), str(data_dir), root / "out", SearchConfig(**SETTINGS),
                          cache_dir=root / "cache")
    assert doc["workers"] == 1 and doc["ray_address"] is None and "ray" not in doc["versions"]
    assert doc["fine_tunes"]["screening"] >= 4 and doc["fine_tunes"]["promoted"] >= 1 and doc["chosen"] is not None
    assert doc["latent_cache"]["status"] == "built"
    return root / "out"


def test_two_workers_give_the_results_of_one(tmp_path, monkeypatch, ray_log, tiny_dir_eps, data_dir, in_process):
    import ray

    ray_log.write_text("")
    here = []
    real = MaskEvaluator.__call__
    monkeypatch.setattr(MaskEvaluator, "__call__", lambda self, *a, **kw: here.append(a) or real(self, *a, **kw))
    stages = []
    doc = run_mask_search(str(tiny_dir_eps), str(data_dir), tmp_path / "out", SearchConfig(**SETTINGS, workers=2),
                          cache_dir=tmp_path / "cache", progress=lambda s, d, t: stages.append((s, d, t)))
    assert comparable(tmp_path / "out") == comparable(in_process)
    assert (tmp_path / "out" / "mask.json").read_bytes() == (in_process / "mask.json").read_bytes()
    assert doc["workers"] == 2 and doc["ray_address"] is None and doc["versions"]["ray"] == ray.__version__
    assert json.loads((tmp_path / "out" / "search.json").read_text())["settings"]["workers"] == 2
    # every evaluation once, in the workers, none in the driver; the proxy encoded once, by one worker
    seen = events(ray_log)
    ends = [e for e in seen if e["event"] == "end"]
    assert Counter(map(job_of, ends)) == jobs_of(in_process) and not here
    pids = {e["pid"] for e in seen}
    assert len(pids) == 2 and os.getpid() not in pids
    assert len(list((tmp_path / "cache" / "latents").glob("*/chunk-*.npy"))) == 1
    # the evaluations ran concurrently: two from different workers overlap in time
    spans = {}
    for e in seen:
        spans.setdefault((e["pid"], job_of(e)), {})[e["event"]] = e["time"]
    assert any(a[0] != b[0] and sa["start"] < sb["end"] and sb["start"] < sa["end"]
               for a, sa in spans.items() for b, sb in spans.items())
    assert ("starting workers", 2, 2) in stages and ("latent cache", 3, 3) in stages
    assert not ray.util.list_named_actors()  # the workers are gone with the search


def test_a_worker_killed_during_an_evaluation_is_replaced_and_the_results_stay(tmp_path, ray_log, tiny_dir_eps,
                                                                                data_dir, in_process):
    import ray

    ray_log.write_text("")
    slow = Path(str(ray_log) + ".slow")
    slow.touch()
    killed, stop = [], threading.Event()

    def kill_one():
        """After two evaluations ended, kill a worker that has started one and not ended it."""
        while not stop.is_set() and not killed:
            seen = events(ray_log)
            last = {e["pid"]: e for e in seen}
            running = [e for e in last.values() if e["event"] == "start"]
            if sum(e["event"] == "end" for e in seen) >= 2 and running:
                os.kill(running[0]["pid"], signal.SIGKILL)
                killed.append(running[0])
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one, daemon=True)
    watcher.start()
    try:
        run_mask_search(str(tiny_dir_eps), str(data_dir), tmp_path / "out", SearchConfig(**SETTINGS, workers=2),
                        cache_dir=tmp_path / "cache")
    finally:
        stop.set()
        watcher.join()
        slow.unlink()
    assert killed
    pid = killed[0]["pid"]
    with pytest.raises(OSError):
        os.kill(pid, 0)  # that process is gone
    assert comparable(tmp_path / "out") == comparable(in_process)
    seen = events(ray_log)
    # the killed evaluation never ended in that process, and ran again in another one
    assert [e["event"] for e in seen if e["pid"] == pid][-1] == "start"
    assert any(e["event"] == "end" and job_of(e) == job_of(killed[0]) and e["pid"] != pid for e in seen)
    assert Counter(job_of(e) for e in seen if e["event"] == "end") == jobs_of(in_process)
    assert len({e["pid"] for e in seen}) == 3  # the killed worker, the other, and the restarted one
    assert not ray.util.list_named_actors()


def _main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["memaudit", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    captured = capsys.readouterr()
    return e.value.code or 0, captured.out, captured.err


def test_a_search_interrupted_in_process_is_finished_by_two_workers(tmp_path, monkeypatch, capsys, ray_log,
                                                                     tiny_dir_eps, data_dir, in_process):
    out, cache = tmp_path / "out", tmp_path / "cache"

    def stop(stage, done, total):
        if stage == "evaluation" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_mask_search(str(tiny_dir_eps), str(data_dir), out, SearchConfig(**SETTINGS), cache_dir=cache,
                        progress=stop)
    kept = jobs_of(out)
    assert sum(kept.values()) == 2
    ray_log.write_text("")
    code, stdout, err = _main(monkeypatch, capsys, "mitigate", "search", tiny_dir_eps, "--train", data_dir, "--out",
                              out, "--cache-dir", cache, "--workers", "2", *CLI_ARGS)
    assert code == 0, err
    # the same, but for what this run did: fewer evaluations, the latent cache found
    assert comparable(out, also=("evaluated_now", "run_now", "latent_cache")) == \
        comparable(in_process, also=("evaluated_now", "run_now", "latent_cache"))
    ran = Counter(job_of(e) for e in events(ray_log) if e["event"] == "end")
    assert ran == jobs_of(in_process) - kept  # what the logs lacked, and nothing else
    doc = json.loads((out / "pareto.json").read_text())
    assert doc["workers"] == 2 and doc["evaluated_now"] == doc["evaluations"] - 2
    assert doc["fine_tunes"]["run_now"] == sum(ran.values()) == sum(jobs_of(in_process).values()) - 2
    assert doc["latent_cache"]["status"] == "reused"  # encoded by the interrupted search, found by the workers
    assert f"({sum(ran.values())} run now)" in " ".join(stdout.split())


@pytest.mark.parametrize("case", ["workers 0", "unreachable", "ray missing", "address without workers", "too small"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys, ray_log, tiny_dir_eps,
                                                  data_dir):
    import ray

    out = tmp_path / "out"
    expected = {
        "workers 0": (["--workers", "0"], "Error: --workers 0 must be at least 1 (1 runs the search in this process)."),
        "unreachable": (["--workers", "2", "--ray-address", "127.0.0.1:9"], "Error: --ray-address 127.0.0.1:9 cannot "
                        "be reached (Connection refused); start the cluster there with `ray start --head`, or check "
                        "the address."),
        "ray missing": (["--workers", "2"], "Error: --workers > 1 runs the search on Ray, which is not installed; "
                        "install it with pip install 'memaudit[ray]' (or run with --workers 1)."),
        "address without workers": (["--ray-address", "127.0.0.1:9"], "Error: --ray-address needs --workers 2 or more: "
                                    "one worker runs in this process, without Ray."),
        "too small": (["--workers", "3"], "Error: --workers 3 with 1 thread(s) each needs 3 CPUs but the Ray cluster "
                      "has 2; use fewer --workers or --threads."),
    }
    extra, line = expected[case]
    if case == "ray missing":
        monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    before = sorted(tmp_path.iterdir())
    code, _, err = _main(monkeypatch, capsys, "mitigate", "search", tiny_dir_eps, "--train", data_dir, "--out", out,
                         "--cache-dir", tmp_path / "cache", *CLI_ARGS, *extra)
    assert code == 2 and err.strip().splitlines() == [line], err
    assert sorted(tmp_path.iterdir()) == before
    with pytest.raises(ConfigError) as e:  # and the library says the same
        kw = {"workers 0": {"workers": 0}, "unreachable": {"workers": 2, "ray_address": "127.0.0.1:9"},
              "ray missing": {"workers": 2}, "address without workers": {"ray_address": "127.0.0.1:9"},
              "too small": {"workers": 3}}[case]
        run_mask_search(str(tiny_dir_eps), str(data_dir), out, SearchConfig(**SETTINGS, **kw),
                        cache_dir=tmp_path / "cache")
    assert f"Error: {e.value}" == line
    assert sorted(tmp_path.iterdir()) == before
    if case != "ray missing":
        assert ray.is_initialized() and not ray.util.list_named_actors()
