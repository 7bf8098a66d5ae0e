"""Mistakes fail before the work, with one line and nothing written; long runs say what they kept when stopped;
progress shows in logs; runs of any size start in bounded memory."""

from __future__ import annotations

import io
import json
import sys
import tracemalloc

import pytest
import torch

import memaudit.cli as cli
from memaudit.audit import AuditConfig, read_prompts
from memaudit.core.errors import ConfigError, DataError
from memaudit.data import load_dataset
from memaudit.sampling import Sampler

# A folder nobody can create, whoever runs the tests (root included): /proc takes no new entries.
UNWRITABLE = "/proc/memaudit-out"


def _main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["memaudit", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the mistakes below must be caught before it. The refusal sits inside
    ``load_target`` (its first step, resolving the device), since every caller binds ``load_target`` itself when it is
    imported."""
    import memaudit.target.load

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the output location was checked")

    monkeypatch.setattr(memaudit.target.load, "resolve_device", refuse)


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_unwritable_out_fails_before_any_model_loads(where, tmp_path, monkeypatch, capsys, tiny_dir_eps, data_dir,
                                                     no_model_load):
    (tmp_path / "file").write_text("x")
    out = UNWRITABLE if where == "proc" else str(tmp_path / "file" / "out")
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"kind": "memaudit.mask", "method": "bias", "granularity": "block", "mask": [1, 0],
                                "learning_rate": 1e-3}))
    base, train = str(tiny_dir_eps), str(data_dir)
    commands = [
        ["audit", base, "--train", train, "--out", out],
        ["finetune", base, "--train", train, "--out", out],
        ["mitigate", "search", base, "--train", train, "--out", out],
        ["mitigate", "finetune", base, "--mask", str(mask), "--train", train, "--out", out],
        ["demo", "--out", out],
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in commands:
        code, stdout, err = _main(monkeypatch, capsys, *args)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: --out") and "Traceback" not in err, (args, err)
        assert ("cannot be written" if where == "proc" else "is a file") in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_check_writable_leaves_nothing_behind(tmp_path):
    from memaudit.core.io import check_writable

    assert check_writable(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="--cache-dir /proc/memaudit-out cannot be written"):
        check_writable(UNWRITABLE, "--cache-dir")


def test_a_billion_generations_start_in_bounded_memory(tiny_dir_eps):
    from memaudit.target import load_target

    sampler = Sampler(load_target(str(tiny_dir_eps), device="cpu"), steps=1, batch_size=4)
    tracemalloc.start()
    chunk, seeds, used = next(sampler._chunks(["a", "b"], 10**9))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert chunk == [(0, 0), (0, 1), (0, 2), (0, 3)] and len(seeds) == 4 and used == ["a"] * 4
    assert peak < 1_000_000, peak  # the list of every job would be tens of GB
    # and the audit refuses what its clique search cannot take, at once
    with pytest.raises(ConfigError, match="--generations is at most 2000"):
        AuditConfig(generations=10**9, min_clique=2)


def test_unquoted_commas_in_captions_are_an_error_naming_the_line(tmp_path, tiny_dataset):
    tiny_dataset.to_pil(0).save(tmp_path / "a.png")
    tiny_dataset.to_pil(1).save(tmp_path / "b.png")
    (tmp_path / "captions.csv").write_text('file,caption\na.png,"a red astronaut, a crop"\n'
                                           "b.png,a red astronaut, a crop, of number 0\n")
    with pytest.raises(DataError, match=r"captions.csv line 3 has 4 fields but the header has 2.*quoted"):
        load_dataset(tmp_path, 16, 3)
    (tmp_path / "captions.csv").write_text('file,caption\na.png,"a red astronaut, a crop"\n')
    assert load_dataset(tmp_path, 16, 3).captions == ["a red astronaut, a crop"]
    (tmp_path / "p.csv").write_text("prompt\nfine\na cat, sitting\n")
    with pytest.raises(DataError, match="p.csv line 3 has more fields than its header.*quoted"):
        read_prompts(tmp_path / "p.csv")


def test_prompts_given_a_folder_say_so_before_any_model_loads(tmp_path, monkeypatch, capsys, tiny_dir_eps, data_dir,
                                                              no_model_load):
    with pytest.raises(DataError, match="is a folder; pass a .txt"):
        read_prompts(tmp_path)
    for option in ("--prompts", "--reference-prompts"):
        code, _, err = _main(monkeypatch, capsys, "audit", str(tiny_dir_eps), "--train", str(data_dir), option,
                             str(tmp_path), "--out", str(tmp_path / "out"))
        assert code == 2 and err.strip() == f"Error: prompts file {tmp_path} is a folder; pass a .txt (one prompt per " \
            "line), .csv or .jsonl file.", err
    assert not (tmp_path / "out").exists()


def test_plain_progress_lines_with_an_estimate():
    now = [0.0]
    stream = io.StringIO()
    bar = cli.PlainProgress(step=25, stream=stream, clock=lambda: now[0])
    loading = bar.add_task("loading model", total=1)
    now[0] = 3.0
    bar.update(loading, completed=1)  # one-step stages say nothing
    for done in range(10, 201, 10):  # a stage first reported after its first batch started at the last event
        now[0] = 3.0 + done * 0.5  # 0.5 s per image
        if done == 10:
            task = bar.add_task("sampling", total=200)
        bar.update(task, completed=done)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "sampling: 10/200 (5%), 0:00:05 elapsed, about 0:01:35 left"
    assert [ln.split(" (")[1].split("%")[0] for ln in lines] == ["5", "30", "55", "80", "100"]
    assert lines[-1] == "sampling: 200/200 (100%), 0:01:40 elapsed"


def test_progress_is_printed_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, capsys, tiny_dir_eps, data_dir):
    code, out, err = _main(monkeypatch, capsys, "finetune", str(tiny_dir_eps), "--train", str(data_dir), "--out",
                           str(tmp_path / "ft"), "--steps", "20", "--batch-size", "2", "--device", "cpu")
    assert code in (0, None), err
    lines = [ln for ln in err.splitlines() if ln.startswith("fine-tuning")]
    assert len(lines) >= 5 and lines[-1].startswith("fine-tuning") and "20/20 (100%)" in lines[-1], err
    assert any("left" in ln for ln in lines)


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path, monkeypatch, capsys, tiny_dir_eps, data_dir):
    real_update = cli.PlainProgress.update

    def interrupt_at_step_5(self, task, completed=None, **kw):
        real_update(self, task, completed=completed, **kw)
        if completed == 5:  # the checkpoint of step 4 is on disk
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.PlainProgress, "update", interrupt_at_step_5)
    out = tmp_path / "ft"
    args = ["finetune", str(tiny_dir_eps), "--train", str(data_dir), "--out", str(out), "--steps", "6",
            "--batch-size", "2", "--checkpoint-every", "2", "--device", "cpu"]
    code, _, err = _main(monkeypatch, capsys, *args)
    assert code == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("Interrupted. Kept the checkpoint") and "(step 4)" in last, last
    assert last.endswith("Resume with the same command: memaudit finetune " + " ".join(args[1:])), last
    monkeypatch.setattr(cli.PlainProgress, "update", real_update)
    code, _, err = _main(monkeypatch, capsys, *args)
    assert code in (0, None), err
    assert json.loads((out / "memaudit_finetune.json").read_text())["result"]["resumed_from_step"] == 4


def test_ctrl_c_in_an_audit_says_nothing_was_written(monkeypatch):
    message = cli.interrupt_message(["audit", "m", "--train", "my data"], None)
    assert message == ("Interrupted; nothing was written. Run it again from the start: "
                       "memaudit audit m --train 'my data'")


def test_threads_default_to_the_cpu_affinity_mask(monkeypatch, capsys):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
        assert cli.use_threads(None) == 3 and torch.get_num_threads() == 3
        assert cli.use_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    code, _, err = _main(monkeypatch, capsys, "demo", "--threads", "0")
    assert code == 2 and err.strip() == "Error: --threads 0 must be at least 1."
