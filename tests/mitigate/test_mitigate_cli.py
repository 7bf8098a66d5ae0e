"""``memaudit mitigate ...`` on the command line: the units listing, one-line errors that name the option to fix
(and write nothing), and what the search prints about its cost and its verdict."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from memaudit.cli import app, main
from memaudit.peft import get_method, method_class
from memaudit.target import load_target

runner = CliRunner()
ONLY = "the chosen mask is the best of the masks only."


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``memaudit ARGS`` in-process through the console entry point: exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["memaudit", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in err, err
    return lines[0]


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


# -- memaudit mitigate units ------------------------------------------------------------------------------------------
def test_units_lists_every_unit_and_the_counts_sum_to_the_trainable_count(tiny_dir_eps):
    res = runner.invoke(app, ["mitigate", "units", str(tiny_dir_eps), "--method", "difffit"])
    assert res.exit_code == 0, res.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in res.output.splitlines() if line.startswith("│")]
    method = get_method("difffit", load_target(tiny_dir_eps, device="cpu").unet)
    units = method.units()
    assert [(int(i), name) for i, name, _, _ in rows] == [(k, u.name) for k, u in enumerate(units)]
    counts = [int(n.replace(",", "")) for _, _, n, _ in rows]
    assert counts == [u.count for u in units] and sum(counts) == method.trainable_count()
    total = method.trainable_count()
    assert f"{len(units)} units, {total:,} trainable parameters" in flat(res.output)
    assert sum(float(p) for *_, p in rows) == pytest.approx(method.summary()["trainable_percent"], abs=1e-3)


def test_units_errors_are_one_line(monkeypatch, capsys, tiny_dir_eps, tmp_path):
    line = one_line_error(*run_main(monkeypatch, capsys, "mitigate", "units", tiny_dir_eps, "--method", "dora")[::2])
    assert "unknown PEFT method 'dora'; available: attention, bias, difffit" in line
    line = one_line_error(*run_main(monkeypatch, capsys, "mitigate", "units", tmp_path / "nope", "--method", "svdiff")[::2])
    assert "does not exist" in line
    code, out, _ = run_main(monkeypatch, capsys, "mitigate", "units", tiny_dir_eps, "--method", "freeze")
    assert code == 0 and "freeze trains nothing" in flat(out)


# -- mask-length errors ---------------------------------------------------------------------------------------------
def test_a_mask_of_the_wrong_length_points_to_the_units_command(monkeypatch, capsys, tiny_dir_eps, data_dir, tmp_path):
    out = tmp_path / "ft"
    line = one_line_error(*run_main(monkeypatch, capsys, "finetune", tiny_dir_eps, "--train", data_dir, "--out", out,
                                    "--method", "svdiff", "--mask", "01", "--device", "cpu")[::2])
    assert line == (f"Error: mask has 2 bits but method svdiff at block granularity has 13 units on {tiny_dir_eps}; "
                    "pass one 0/1 value per unit, in the order that "
                    f"`memaudit mitigate units {tiny_dir_eps} --method svdiff --granularity block` lists them.")
    assert not out.exists() and not (tmp_path / "ft.partial").exists()
    # stage 2 with a mask.json made for another model
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"kind": "memaudit.mask", "method": "difffit", "granularity": "layer", "mask": [1, 0, 1],
                                "learning_rate": 1e-3}))
    line = one_line_error(*run_main(monkeypatch, capsys, "mitigate", "finetune", tiny_dir_eps, "--mask", mask,
                                    "--train", data_dir, "--out", out, "--device", "cpu")[::2])
    assert "mask has 3 bits but method difffit at layer granularity has" in line
    assert f"memaudit mitigate units {tiny_dir_eps} --method difffit --granularity layer" in line
    assert not out.exists()


# -- memaudit mitigate search: errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("objectives, says", [
    ("privacy,beauty", "'privacy' is not a memorization objective and 'beauty' is not a quality objective"),
    ("denoising", "is not two names"),
])
def test_objectives_errors_name_the_option_and_the_accepted_values(monkeypatch, capsys, tmp_path, objectives, says):
    out = tmp_path / "search"
    line = one_line_error(*run_main(monkeypatch, capsys, "mitigate", "search", tmp_path / "base", "--train",
                                    tmp_path / "data", "--objectives", objectives, "--out", out)[::2])
    assert line.startswith(f"Error: --objectives {objectives!r}") and says in line
    assert "MEM one of denoising|extraction|amd and QUALITY one of kid|fid" in line and "--memorization" not in line
    assert not out.exists()


def test_a_population_larger_than_the_search_space_writes_nothing(monkeypatch, capsys, tiny_dir_eps, data_dir,
                                                                   tmp_path):
    out = tmp_path / "search"
    line = one_line_error(*run_main(monkeypatch, capsys, "mitigate", "search", tiny_dir_eps, "--train", data_dir,
                                    "--population", 10**9, "--out", out)[::2])
    assert line == "Error: search setting invalid: --population must be between 2 and 1,000 (got 1,000,000,000)."
    line = one_line_error(*run_main(monkeypatch, capsys, "mitigate", "search", tiny_dir_eps, "--train", data_dir,
                                    "--generations", 10**9, "--out", out)[::2])
    assert "--generations must be between 1 and 10,000" in line
    assert not out.exists()
    out.mkdir()  # an existing, empty --out stays empty
    # attention at block granularity: one unit per transformer block, 7 on the tiny UNet; one learning rate
    line = one_line_error(*run_main(monkeypatch, capsys, "mitigate", "search", tiny_dir_eps, "--train", data_dir,
                                    "--method", "attention", "--lr-choices", "1e-3", "--population", 129,
                                    "--device", "cpu", "--out", out)[::2])
    assert line == ("Error: --population 129 is larger than the search space: attention at block granularity has 7 "
                    "units, so there are 2^7 masks x 1 learning rate = 128 distinct candidates; pass --population 128 "
                    "or less (or search more units: --granularity layer, more --lr-choices).")
    assert list(out.iterdir()) == []


# -- memaudit mitigate export: errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("case, says", [
    ("missing", "Error: adapter folder {path} does not exist; pass the adapter/ folder inside the --out of memaudit "
                "finetune --method M (any method but full) or memaudit mitigate finetune."),
    ("file", "Error: {path} is a file, not an adapter folder; pass the folder that holds adapter.json and "
             "adapter.safetensors."),
    ("folder", "Error: {path} has no adapter.json, so it is not an adapter folder; pass the adapter/ folder that "
               "memaudit finetune --method M (any method but full) or memaudit mitigate finetune writes inside its "
               "--out."),
])
def test_export_says_what_is_wrong_with_the_adapter_path(monkeypatch, capsys, tmp_path, case, says):
    path = tmp_path / case
    if case == "file":
        path.write_text("not an adapter")
    elif case == "folder":
        path.mkdir()
    out = tmp_path / "merged"
    line = one_line_error(*run_main(monkeypatch, capsys, "mitigate", "export", path, "--out", out)[::2])
    assert line == says.format(path=path)
    assert not out.exists()


# -- memaudit mitigate search: what it prints -----------------------------------------------------------------------
def test_search_prints_how_many_fine_tunes_ran_and_why(monkeypatch, capsys, tiny_dir_eps, data_dir, tmp_path):
    """The tiny search of test_search (difffit, 1-step fine-tunes), one generation of 2: 2 mask evaluations and the
    2 references are 4 fine-tunes."""
    out = tmp_path / "search"
    args = ["mitigate", "search", tiny_dir_eps, "--train", data_dir, "--method", "difffit", "--population", 2,
            "--generations", 1, "--inner-steps", 1, "--batch-size", 2, "--lr-choices", "1e-3,1e-2", "--device", "cpu",
            "--out", out, "--cache-dir", tmp_path / "cache"]
    code, stdout, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    # 8 images: 2 for validation, half of the other 6 as the proxy, encoded once for all 4 fine-tunes
    assert "latent cache: 3 proxy image(s) encoded now, 0 found" in flat(stdout)
    assert "latent cache: 3/3 (100%)" in err
    doc = json.loads((out / "pareto.json").read_text())
    masks = len((out / "evaluations.jsonl").read_text().splitlines())
    assert masks == 2 and len((out / "references.jsonl").read_text().splitlines()) == 2
    assert doc["fine_tunes"]["total"] == 4 and doc["fine_tunes"]["references"] == ["method default", "full fine-tuning"]
    refs = (f"difffit with every unit at lr {method_class('difffit').default_lr:g}; "
            f"full fine-tuning at lr {method_class('full').default_lr:g}")
    text = flat(stdout)
    assert f"4 fine-tunes (4 run now): 2 mask evaluations + 2 references ({refs})" in text
    assert f"{len(doc['front'])} mask{'s' if len(doc['front']) != 1 else ''} on the front" in text
    opening = {"reference dominates": "No mask beats ", "references unbeaten": "No mask on the front beats the "
               "references on either objective", "masks competitive": "Masks on the front against the references:"}
    assert opening[doc["verdict"]["status"]] in text
    code, stdout, _ = run_main(monkeypatch, capsys, *args)  # the same command again: everything from the logs
    assert code == 0 and "4 fine-tunes (0 run now): 2 mask evaluations + 2 references" in flat(stdout)
    assert "latent cache" not in stdout  # no evaluation ran: no latent was needed
    # stage 2 on the whole set finds the proxy's latents and encodes the other 5 images
    n_units = len(get_method("difffit", load_target(tiny_dir_eps, device="cpu").unet).units())
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"kind": "memaudit.mask", "method": "difffit", "granularity": "block",
                                "mask": [1] + [0] * (n_units - 1), "learning_rate": 1e-3}))
    code, stdout, err = run_main(monkeypatch, capsys, "mitigate", "finetune", tiny_dir_eps, "--mask", mask, "--train",
                                 data_dir, "--out", tmp_path / "ft", "--steps", 1, "--batch-size", 2, "--device", "cpu",
                                 "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert "latent cache: 5 image(s) encoded now, 3 found" in flat(stdout)
    assert "latent cache: 5/5 (100%)" in err


def _fake_search(front_points, default_point, full_point):
    """A search result document built around hand-made objective values (memorization, quality)."""
    from memaudit.mitigate.search import reference_verdict

    front = [{"mask": [1, 0], "learning_rate": 1e-3, "trainable_percent": 1.0,
              "objectives": {"memorization": m, "quality": q}} for m, q in front_points]
    refs = {"method default": {"method": "difffit", "learning_rate": 1e-3,
                               "objectives": dict(zip(("memorization", "quality"), default_point))},
            "full fine-tuning": {"method": "full", "learning_rate": 1e-4,
                                 "objectives": dict(zip(("memorization", "quality"), full_point))}}
    doc = {"front": front, "chosen": front[0] if front else None, "references": refs,
           "fine_tunes": {"total": len(front) + 2, "mask_evaluations": len(front), "references": list(refs),
                          "run_now": 0, "without_training": 0},
           "verdict": reference_verdict(front, refs)}
    return lambda **_kwargs: doc


@pytest.mark.parametrize("front, default, full, sentence", [
    ([(1, 5), (2, 3)], (3, 6), (0.5, 1),
     f"No mask beats full fine-tuning: it is better on both memorization and quality than every mask on the front; "
     f"{ONLY}"),
    ([(1, 5), (2, 3)], (3, 6), (1, 3),  # ties: full fine-tuning equals the masks on one objective each
     f"No mask beats full fine-tuning: no mask on the front is better on memorization or on quality; {ONLY}"),
    ([(1, 5), (2, 3)], (0.5, 9), (9, 2),
     "No mask on the front beats the references on either objective: difffit with every unit has the lowest "
     f"memorization and full fine-tuning the best quality; {ONLY}"),
    ([(1, 5), (2, 3)], (3, 6), (1.5, 4),
     "Masks on the front against the references: 2 of 2 memorize less than difffit with every unit and 2 of 2 have "
     "better quality; 1 of 2 memorize less than full fine-tuning and 1 of 2 have better quality."),
    ([], (3, 6), (1.5, 4), "No evaluated mask meets --max-trainable-percent: there is no front and no chosen mask."),
])
def test_search_says_plainly_when_a_reference_beats_the_masks(monkeypatch, capsys, tmp_path, front, default, full,
                                                              sentence):
    import memaudit.mitigate.search as search

    monkeypatch.setattr(search, "run_mask_search", _fake_search(front, default, full))
    code, stdout, err = run_main(monkeypatch, capsys, "mitigate", "search", "base", "--train", tmp_path,
                                 "--out", tmp_path / "s")
    assert code == 0, err
    assert sentence in flat(stdout)
    assert ("No mask beats" in flat(stdout)) == sentence.startswith("No mask beats")


def test_search_counts_screening_promoted_and_untrained_fine_tunes(monkeypatch, capsys, tmp_path):
    import memaudit.mitigate.search as search

    fake = _fake_search([(1, 5), (2, 3)], (3, 6), (1.5, 4))
    doc = fake()
    doc["fine_tunes"].update(total=6, mask_evaluations=4, screening=3, promoted=1, without_training=1, run_now=5)
    doc["screening"] = {"steps": 1}
    monkeypatch.setattr(search, "run_mask_search", fake)
    code, stdout, err = run_main(monkeypatch, capsys, "mitigate", "search", "base", "--train", tmp_path,
                                 "--inner-steps", 50, "--out", tmp_path / "s")
    assert code == 0, err
    text = flat(stdout)
    assert ("6 fine-tunes (5 run now): 4 mask evaluations (3 screening fine-tunes of 1 step, 1 promoted to 50 steps) "
            "+ 2 references (difffit with every unit at lr 0.001; full fine-tuning at lr 0.0001)") in text
    assert "1 mask evaluation switched every unit off: scored on the base model, without training" in text
    assert "2 masks on the front" in text
