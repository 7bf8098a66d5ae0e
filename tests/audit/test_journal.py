"""Resumable audits (in this process, without Ray): an audit stopped after k prompts, by Ctrl-C or a crash, and run
again ends with the results.json of an uninterrupted audit and samples no image twice; a torn journal line costs its
unit only; a journal of other settings is refused with one line; with --redact the journal holds no training pixel."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import memaudit.cli as cli
from memaudit.audit import AuditConfig, journal_dir, journal_kept, run_audit, unit_prompts, work_units
from memaudit.core.errors import ConfigError
from memaudit.data import from_arrays
from memaudit.sampling import Sampler

N_PROMPTS = 6
REFERENCE = ["a red square", "a blue circle"]
#: what may differ between two runs of one audit
WALL = {"created_utc", "wall_time_s", "sampling_time_s", "reused"}  # reused: what this run took from earlier ones


@pytest.fixture(scope="module")
def train():
    g = torch.Generator().manual_seed(0)
    return from_arrays(torch.rand(N_PROMPTS, 3, 16, 16, generator=g), [f"a photo of item {i}" for i in range(N_PROMPTS)])


def comparable(out: Path) -> str:
    """results.json without its wall times, as text (NaN compares equal to NaN)."""

    def drop(d):
        if isinstance(d, dict):
            return {k: drop(v) for k, v in d.items() if k not in WALL}
        if isinstance(d, list):
            return [drop(v) for v in d]
        return d

    return json.dumps(drop(json.loads((out / "results.json").read_text())), sort_keys=True)


def count_calls(monkeypatch) -> Counter:
    """Count every image the sampler makes, by (prompt, seed), around the real (or already patched) sampler."""
    calls: Counter = Counter()
    real = Sampler.sample_batch

    def sample_batch(self, prompts, seeds):
        calls.update(zip(prompts, seeds))
        return real(self, prompts, seeds)

    monkeypatch.setattr(Sampler, "sample_batch", sample_batch)
    return calls


def stop_after(stage: str, images: int, error=KeyboardInterrupt):
    """A progress callback that raises once ``stage`` has ``images`` images done (after their journaling)."""

    def progress(s, done, total):
        if s == stage and done == images:
            raise error("stopped by the test")

    return progress


def _config(**kw):
    return AuditConfig(**{"generations": 4, "min_clique": 2, "steps": 2, "batch_size": 4, "device": "cpu", **kw})


def test_units_keep_the_batches_of_one_pass():
    assert unit_prompts(4, 4) == 1 and unit_prompts(16, 16) == 1 and unit_prompts(500, 16) == 4
    assert unit_prompts(6, 5) == 5 and unit_prompts(10, 50) == 5 and unit_prompts(3, 4) == 4
    assert unit_prompts(3, 50) == 16  # lcm(3, 50) would be 50 prompts: as many as fit in a batch
    assert work_units(7, 3) == [(0, 3), (3, 6), (6, 7)]


def test_interrupted_audit_resumes_to_the_same_results_sampling_nothing_twice(tmp_path, monkeypatch, tiny_dir_eps,
                                                                               train):
    cfg = _config()
    prompts = train.captions
    run_audit(str(tiny_dir_eps), train, tmp_path / "whole", prompts=prompts, reference_prompts=REFERENCE, config=cfg)
    assert not journal_dir(tmp_path / "whole").exists()  # removed once the results are complete
    calls = count_calls(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_audit(str(tiny_dir_eps), train, out, prompts=prompts, reference_prompts=REFERENCE, config=cfg,
                  progress=stop_after("sampling", 3 * 4))
    assert not out.exists()
    assert journal_kept(out) == f"Kept 3 of 6 prompts and 2 of 2 reference prompts in {journal_dir(out)}; none is " \
        "sampled again."
    first = sum(calls.values())
    assert first == (2 + 3) * 4  # the reference prompts and 3 prompts, not one image more
    resumed = run_audit(str(tiny_dir_eps), train, out, prompts=prompts, reference_prompts=REFERENCE, config=cfg)
    assert comparable(out) == comparable(tmp_path / "whole")
    assert resumed["summary"]["reused"] | {"journal": None} == {
        "prompts_resumed": 3, "reference_prompts_resumed": 2, "training_features": "cache",
        "training_thumbnails": "cache", "training_images": 6, "journal": None}
    assert sum(calls.values()) == (2 + 6) * 4 and max(calls.values()) == 1  # every image once, over both runs
    assert {p for p, _ in calls} == set(prompts) | set(REFERENCE)
    assert not journal_dir(out).exists() and journal_kept(out) is None


def test_every_kept_field_survives_the_journal(tmp_path, monkeypatch, tiny_dir_eps, train):
    """Units of several prompts, rwa words, the calibrated edge, held-out quality, alignment and flagged grids: an audit
    that crashes (an error in the sampler) after its second unit and is run again gives the same results and files."""
    from memaudit.metrics.alignment import register_scorer

    register_scorer("test-journal", lambda device="cpu": lambda images, prompts: [
        float(images[k].mean()) if "item" in p else float("nan") for k, p in enumerate(prompts)])
    g = torch.Generator().manual_seed(1)
    held = from_arrays(torch.rand(4, 3, 16, 16, generator=g), [f"a held-out photo {i}" for i in range(4)])
    cfg = _config(generations=3, batch_size=4, mitigation="rwa", calibrate_edge=True, edge_quantile=0.5,
                  quality_features="pixels", quality_feature_options={"size": 4}, alignment="test-journal")
    assert unit_prompts(3, 4) == 4  # 6 prompts: units [0, 4) and [4, 6); 4 reference prompts: one unit
    whole = run_audit(str(tiny_dir_eps), train, tmp_path / "whole", heldout=held, config=cfg)
    assert whole["summary"]["flagged_prompts"] > 0 and whole["summary"]["quality"] is not None  # grids to keep

    calls = count_calls(monkeypatch)
    real = Sampler.sample_batch
    crash = {"after": 1 + 3}  # the reference unit's 3 batches and one batch of the first audited unit

    def crashing(self, prompts, seeds):
        if crash["after"] == 0:
            raise RuntimeError("the machine went away")
        crash["after"] -= 1
        return real(self, prompts, seeds)

    monkeypatch.setattr(Sampler, "sample_batch", crashing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="went away"):
        run_audit(str(tiny_dir_eps), train, out, heldout=held, config=cfg)
    assert journal_kept(out).startswith("Kept 0 of 6 prompts and 4 of 4 reference prompts")
    monkeypatch.setattr(Sampler, "sample_batch", real)
    calls.clear()
    resumed = run_audit(str(tiny_dir_eps), train, out, heldout=held, config=cfg)
    # the audited prompts only (with their random words), each image once: the reference prompts came from the journal
    assert sum(calls.values()) == 6 * 3 and max(calls.values()) == 1 and not any("held-out" in p for p, _ in calls)
    assert comparable(out) == comparable(tmp_path / "whole")
    files = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert files and files == sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*.png"))
    assert all((out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes() for f in files)
    assert resumed["summary"]["alignment"]["n_images"] == 18 and resumed["settings"]["edge_threshold_used"] != 0.1


def test_a_torn_last_line_costs_its_unit_only(tmp_path, monkeypatch, tiny_dir_eps, train):
    cfg = _config()
    run_audit(str(tiny_dir_eps), train, tmp_path / "whole", config=cfg)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_audit(str(tiny_dir_eps), train, out, config=cfg, progress=stop_after("sampling", 4 * 4))
    lines = journal_dir(out) / "journal.jsonl"
    data = lines.read_bytes()
    assert data.count(b"\n") == 4
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[1]
    lines.write_bytes(data[: len(data) - len(last) - 1] + last[: len(last) // 2])  # the 4th line cut short
    assert journal_kept(out).startswith("Kept 3 of 6 prompts")
    calls = count_calls(monkeypatch)
    run_audit(str(tiny_dir_eps), train, out, config=cfg)
    assert {p for p, _ in calls} == set(train.captions[3:]) and max(calls.values()) == 1
    assert comparable(out) == comparable(tmp_path / "whole")


def test_a_journal_of_other_settings_is_refused_with_one_line(tmp_path, monkeypatch, capsys, tiny_dir_eps, train):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_audit(str(tiny_dir_eps), train, out, config=_config(), progress=stop_after("sampling", 4))
    folder = journal_dir(out)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as e:
        run_audit(str(tiny_dir_eps), train, out, config=_config(generations=5))
    message = str(e.value)
    assert "\n" not in message and "--generations" in message and str(folder) in message
    assert message.endswith(f"run the same command as before to resume it, or delete {folder} to start over.")
    with pytest.raises(ConfigError, match=r"other settings, model, data or prompts \(prompts\)"):
        run_audit(str(tiny_dir_eps), train, out, prompts=train.captions[:5], config=_config())
    assert not out.exists() and {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    # the settings that change no result may change: another cache folder and the workers' count are not refused
    run_audit(str(tiny_dir_eps), train, out, config=_config(cache_dir=str(tmp_path / "other-cache")))
    assert out.is_dir() and not folder.exists()

    # the command line: one line, exit 2, nothing written
    with pytest.raises(KeyboardInterrupt):
        run_audit(str(tiny_dir_eps), train, tmp_path / "cli", config=_config(), progress=stop_after("sampling", 4))
    data = tmp_path / "data"
    from memaudit.testing import save_image_folder

    save_image_folder(train, data)
    monkeypatch.setattr(sys, "argv", ["memaudit", "audit", str(tiny_dir_eps), "--train", str(data), "--out",
                                      str(tmp_path / "cli"), "--generations", "4", "--min-clique", "2", "--steps", "2",
                                      "--batch-size", "4", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith(f"Error: {journal_dir(tmp_path / 'cli')} "
                                                                         "holds an unfinished audit"), err
    assert "(train)" in err[0]  # a folder of the same images is another training set (its files are the key)
    assert not (tmp_path / "cli").exists()


def test_ctrl_c_says_what_the_journal_kept_and_the_same_command_resumes(tmp_path, monkeypatch, capsys, tiny_dir_eps,
                                                                         train):
    from memaudit.testing import save_image_folder

    data = save_image_folder(train, tmp_path / "data")
    out = tmp_path / "out"
    args = ["audit", str(tiny_dir_eps), "--train", str(data), "--out", str(out), "--generations", "4", "--min-clique",
            "2", "--steps", "2", "--batch-size", "4", "--device", "cpu"]
    real_update = cli.PlainProgress.update

    def interrupt(self, task, completed=None, **kw):
        real_update(self, task, completed=completed, **kw)
        if self.tasks[task]["description"] == "sampling" and completed == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.PlainProgress, "update", interrupt)
    monkeypatch.setattr(sys, "argv", ["memaudit", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"Interrupted. Kept 2 of 6 prompts in {journal_dir(out)}; none is sampled again. Resume with "
                    f"the same command: memaudit {' '.join(args)}"), last
    monkeypatch.setattr(cli.PlainProgress, "update", real_update)
    calls = count_calls(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code in (0, None)
    assert {p for p, _ in calls} == set(train.captions[2:]) and sum(calls.values()) == 4 * 4
    assert json.loads((out / "results.json").read_text())["settings"]["workers"] == 1


def _holds_training_pixels(folder: Path, train) -> list[str]:
    """Files under ``folder`` holding a training image: its uint8 or float32 pixels, or a PNG that shows it."""
    from PIL import Image

    x01 = (train.images + 1) / 2
    needles = []
    for k in range(len(train)):
        u8 = (x01[k] * 255).round().byte()
        needles += [u8.permute(1, 2, 0).numpy().tobytes()[:48], x01[k].numpy().astype(np.float32).tobytes()[:64]]
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if any(n in data for n in needles):
            found.append(str(path.relative_to(folder)))
        elif path.suffix == ".png":
            arr = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
            for scale in range(1, 9):
                tile = arr[::scale, ::scale][:16, :16]
                if tile.shape[:2] == (16, 16) and any(
                        np.abs(tile - (x01[k] * 255).round().permute(1, 2, 0).numpy()).max() <= 3
                        for k in range(len(train))):
                    found.append(str(path.relative_to(folder)))
                    break
    return found


def test_a_redacted_journal_holds_no_training_pixel(tmp_path, tiny_dir_eps, train, copying_sampler):
    copying_sampler(train)
    kept = {}
    for redact in (False, True):
        out = tmp_path / f"redact-{redact}"
        with pytest.raises(KeyboardInterrupt):
            run_audit(str(tiny_dir_eps), train, out, config=_config(redact=redact),
                      progress=stop_after("sampling", 3 * 4))
        kept[redact] = _holds_training_pixels(journal_dir(out), train)
    assert any(f.startswith("grids/") for f in kept[False]), kept  # the search sees them where they are
    assert kept[True] == []
    res = run_audit(str(tiny_dir_eps), train, tmp_path / "redact-True", config=_config(redact=True))
    assert res["summary"]["extracted_prompts"] == N_PROMPTS and all(p["grid_withheld"] for p in res["prompts"])
    assert not journal_dir(tmp_path / "redact-True").exists()  # and the journal is gone


def test_a_missing_or_changed_journal_file_is_sampled_again(tmp_path, monkeypatch, tiny_dir_eps, train,
                                                            copying_sampler):
    copying_sampler(train)  # every prompt flagged: every unit journals a grid
    cfg = _config()
    run_audit(str(tiny_dir_eps), train, tmp_path / "whole", config=cfg)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_audit(str(tiny_dir_eps), train, out, config=cfg, progress=stop_after("sampling", 3 * 4))
    folder = journal_dir(out)
    (folder / "grids/prompt-00000.png").unlink()  # a grid deleted by hand
    npz = folder / "units/audit-000001.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # changed in place, same size
    npz.write_bytes(bytes(data))
    calls = count_calls(monkeypatch)
    res = run_audit(str(tiny_dir_eps), train, out, config=cfg)
    assert {p for p, _ in calls} == {train.captions[i] for i in (0, 1, 3, 4, 5)} and max(calls.values()) == 1
    assert res["summary"]["reused"]["prompts_resumed"] == 1
    assert comparable(out) == comparable(tmp_path / "whole")


def test_a_model_changed_in_place_is_not_resumed(tmp_path, tiny_dir_eps, train):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_dir_eps, model)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_audit(str(model), train, out, config=_config(), progress=stop_after("sampling", 4))
    folder = journal_dir(out)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    weights = next((model / "unet").glob("*.safetensors"))
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 1.0  # re-fine-tuned in place: same path, same size, other weights
    stamp = weights.stat()
    save_file(state, weights)
    import os

    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # even with its modification time kept
    with pytest.raises(ConfigError, match="before its files changed") as e:
        run_audit(str(model), train, out, config=_config())
    assert "\n" not in str(e.value) and str(folder) in str(e.value)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before and not out.exists()
