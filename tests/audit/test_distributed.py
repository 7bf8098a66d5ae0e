"""``--workers N`` on a local Ray instance with CPU workers (one per test module, two CPUs, no dashboard): two workers
give the results of one, bit for bit; a worker process killed mid-audit is replaced and the results stay; a journal
of an in-process audit is finished by two workers, sampling only what it lacks; a prompt that keeps failing stops the
audit with one line and the journal keeps the rest; bad input (--workers 0, an unreachable --ray-address, Ray
missing) is one line and writes nothing.

Every Ray worker process runs a setup hook (``worker_process_setup_hook``) that logs each image its sampler makes
(process id, prompt, seed) to a file, and fails on the prompt ``POISON``: the test counts the images sampled in the
workers, and has a prompt that fails wherever it runs."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import memaudit.cli as cli
from memaudit.audit import AuditConfig, journal_dir, journal_kept, run_audit
from memaudit.core.errors import ConfigError, MemauditError
from memaudit.data import from_arrays
from memaudit.sampling import Sampler

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # CI runs it; `pytest -m "not slow"` leaves it out

ray = pytest.importorskip("ray")

POISON = "POISON"
REFERENCE = ["a red square", "a blue circle"]
#: what may differ between an in-process audit and one on Ray workers
DIFFERENT = {"created_utc", "wall_time_s", "sampling_time_s", "workers", "ray_address", "ray", "reused"}


def _worker_hook(log: str):
    """Run in every Ray worker process: log each sampled image, and fail on the poisoned prompt."""

    def hook():
        import os

        from memaudit.sampling import Sampler

        real = Sampler.sample_batch

        def sample_batch(self, prompts, seeds):
            if POISON in prompts:
                raise RuntimeError("poisoned prompt")
            with open(log, "a") as f:
                f.writelines(f"{os.getpid()}\t{p}\t{s}\n" for p, s in zip(prompts, seeds))
            return real(self, prompts, seeds)

        Sampler.sample_batch = sample_batch

    return hook


@pytest.fixture(scope="module")
def ray_log(tmp_path_factory):
    """A local Ray instance for the module; yields the file its workers log their sampled images to."""
    log = tmp_path_factory.mktemp("ray") / "sampled.tsv"
    log.touch()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _worker_hook(str(log))})
    yield log
    ray.shutdown()


def sampled_in_workers(log: Path) -> list[tuple[int, str, int]]:
    rows = [line.split("\t") for line in log.read_text().splitlines()]
    return [(int(pid), prompt, int(seed)) for pid, prompt, seed in rows]


@pytest.fixture(scope="module")
def train():
    g = torch.Generator().manual_seed(0)
    return from_arrays(torch.rand(6, 3, 16, 16, generator=g), [f"a photo of item {i}" for i in range(6)])


def _config(**kw):
    # a high edge threshold joins every pair: every prompt is flagged, so grids, the medoid check and the VAE round
    # trip of the nearest training images all go through the workers too
    return AuditConfig(**{"generations": 4, "min_clique": 2, "steps": 2, "batch_size": 4, "device": "cpu",
                          "edge_threshold": 10.0, "quality_features": "pixels", "quality_feature_options": {"size": 4},
                          **kw})


@pytest.fixture(scope="module")
def heldout():
    g = torch.Generator().manual_seed(1)
    return from_arrays(torch.rand(3, 3, 16, 16, generator=g), REFERENCE + ["a green triangle"])


def comparable(out: Path) -> str:
    def drop(d):
        if isinstance(d, dict):
            return {k: drop(v) for k, v in d.items() if k not in DIFFERENT}
        if isinstance(d, list):
            return [drop(v) for v in d]
        return d

    return json.dumps(drop(json.loads((out / "results.json").read_text())), sort_keys=True)


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png"))}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, tiny_dir_eps, train, heldout):
    """The audit in this process (--workers 1): what every run on workers must give."""
    out = tmp_path_factory.mktemp("one") / "out"
    res = run_audit(str(tiny_dir_eps), train, out, heldout=heldout, config=_config())
    assert res["summary"]["flagged_prompts"] == 6 and res["summary"]["quality"] is not None
    assert "ray" not in res["versions"] and res["settings"]["workers"] == 1
    return out


def test_two_workers_give_the_results_of_one(tmp_path, ray_log, tiny_dir_eps, train, heldout, in_process):
    ray_log.write_text("")
    out = tmp_path / "out"
    stages = []
    res = run_audit(str(tiny_dir_eps), train, out, heldout=heldout, config=_config(workers=2),
                    progress=lambda s, d, t: stages.append((s, d, t)))
    assert comparable(out) == comparable(in_process)
    assert files(out) == files(in_process) and any(f.startswith("train/") and f.endswith("-vae.png") for f in files(out))
    assert res["settings"]["workers"] == 2 and res["settings"]["ray_address"] is None
    assert res["versions"]["ray"] == ray.__version__
    sampled = sampled_in_workers(ray_log)
    counts = Counter((p, s) for _, p, s in sampled)
    assert len(counts) == (6 + 3) * 4 and max(counts.values()) == 1  # every image once, in the workers
    assert len({pid for pid, _, _ in sampled}) == 2 and os.getpid() not in {pid for pid, _, _ in sampled}
    assert ("starting workers", 2, 2) in stages and ("sampling", 24, 24) in stages
    assert not ray.util.list_named_actors()  # the workers are gone with the audit
    assert not journal_dir(out).exists()


def test_a_killed_worker_is_replaced_and_the_results_stay(tmp_path, ray_log, tiny_dir_eps, train, heldout,
                                                          in_process):
    ray_log.write_text("")
    killed = []

    def kill_one(stage, done, total):
        if stage == "sampling" and done == 4 and not killed:  # one unit of six journaled, the others in flight
            names = sorted(n for n in ray.util.list_named_actors() if n.startswith("memaudit-audit-"))
            assert len(names) == 2
            pid = ray.get(ray.get_actor(names[0]).pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    out = tmp_path / "out"
    run_audit(str(tiny_dir_eps), train, out, heldout=heldout, config=_config(workers=2), progress=kill_one)
    assert killed
    with pytest.raises(OSError):
        os.kill(killed[0], 0)  # that process is gone
    assert comparable(out) == comparable(in_process) and files(out) == files(in_process)
    pids = {pid for pid, _, _ in sampled_in_workers(ray_log)}
    # the killed worker and the other; the restarted one samples too unless the other finished every unit first
    assert killed[0] in pids and len(pids) in (2, 3)


def test_an_in_process_journal_is_finished_by_two_workers(tmp_path, monkeypatch, ray_log, tiny_dir_eps, train,
                                                         heldout, in_process):
    here = Counter()
    real = Sampler.sample_batch

    def counting(self, prompts, seeds):
        here.update(zip(prompts, seeds))
        return real(self, prompts, seeds)

    monkeypatch.setattr(Sampler, "sample_batch", counting)

    def stop(stage, done, total):
        if stage == "sampling" and done == 2 * 4:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_audit(str(tiny_dir_eps), train, out, heldout=heldout, config=_config(), progress=stop)
    assert journal_kept(out).startswith("Kept 2 of 6 prompts and 3 of 3 reference prompts")
    ray_log.write_text("")
    run_audit(str(tiny_dir_eps), train, out, heldout=heldout, config=_config(workers=2))
    assert comparable(out) == comparable(in_process)
    there = Counter((p, s) for _, p, s in sampled_in_workers(ray_log))
    assert {p for p, _ in there} == set(train.captions[2:])  # what the journal lacked, and nothing else
    assert not set(here) & set(there) and len(here) + len(there) == (6 + 3) * 4
    assert max((here + there).values()) == 1


def test_a_prompt_that_keeps_failing_stops_the_audit_with_one_line(tmp_path, ray_log, tiny_dir_eps, train):
    from memaudit.distributed import MAX_TRIES

    prompts = [*train.captions[:3], POISON, *train.captions[3:5]]
    out = tmp_path / "out"
    with pytest.raises(MemauditError) as e:
        run_audit(str(tiny_dir_eps), train, out, prompts=prompts, config=_config(workers=2, quality_features=None))
    message = str(e.value)
    assert "\n" not in message
    assert message == f"prompt 3 ('{POISON}') failed {MAX_TRIES} times on the Ray workers: RuntimeError: poisoned prompt"
    assert not out.exists()
    # the units done, and those in flight when it stopped, are in the journal; the poisoned one is not
    lines = [json.loads(line) for line in (journal_dir(out) / "journal.jsonl").read_text().splitlines()]
    starts = sorted(line["start"] for line in lines)
    assert starts and 3 not in starts and set(starts) <= {0, 1, 2, 4, 5}
    assert journal_kept(out) == f"Kept {len(starts)} of 6 prompts in {journal_dir(out)}; none is sampled again."
    assert not ray.util.list_named_actors()


def _main(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["memaudit", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["workers 0", "unreachable", "ray missing", "address without workers"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys, tiny_dir_eps, data_dir):
    out = tmp_path / "out"
    args = ["audit", str(tiny_dir_eps), "--train", str(data_dir), "--out", str(out), "--device", "cpu"]
    expected = {
        "workers 0": (["--workers", "0"], "Error: --workers 0 must be at least 1 (1 runs the audit in this process)."),
        "unreachable": (["--workers", "2", "--ray-address", "127.0.0.1:9"], "Error: --ray-address 127.0.0.1:9 cannot "
                        "be reached (Connection refused); start the cluster there with `ray start --head`, or check "
                        "the address."),
        "ray missing": (["--workers", "2"], "Error: --workers > 1 runs the audit on Ray, which is not installed; "
                        "install it with pip install 'memaudit[ray]' (or run with --workers 1)."),
        "address without workers": (["--ray-address", "127.0.0.1:9"], "Error: --ray-address needs --workers 2 or more: "
                                    "one worker runs in this process, without Ray."),
    }
    extra, line = expected[case]
    if case == "ray missing":
        monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    before = sorted(tmp_path.iterdir())
    code, err = _main(monkeypatch, capsys, *args, *extra)
    assert code == 2 and err.strip().splitlines() == [line], err
    assert sorted(tmp_path.iterdir()) == before
    with pytest.raises(ConfigError):  # and the library says the same
        run_audit(str(tiny_dir_eps), str(data_dir), out, config=_config(**{
            "workers 0": {"workers": 0}, "unreachable": {"workers": 2, "ray_address": "127.0.0.1:9"},
            "ray missing": {"workers": 2}, "address without workers": {"ray_address": "127.0.0.1:9"}}[case]))
    assert sorted(tmp_path.iterdir()) == before
