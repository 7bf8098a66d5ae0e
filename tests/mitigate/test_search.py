"""The NSGA-II mask search on cheap synthetic objectives (no training): it finds the known Pareto front, a killed and
resumed search writes the same log as an uninterrupted one, and a cached mask is never evaluated again."""

from __future__ import annotations

import json

import pytest

from memaudit.core.errors import ConfigError
from memaudit.mitigate.search import (
    EvaluationLog,
    choose,
    decode,
    key_of,
    lr_bits,
    nsga2_search,
    pareto_front,
)

WEIGHTS = [2.0 ** (3 - i) for i in range(8)]  # 8 bits: 256 masks, of which the search tries about 140
OBJ = ["ones", "missed"]


class Killed(Exception):
    pass


def synthetic(calls: list, kill_after: int | None = None):
    """ones = bits set; missed = the weight of the bits left unset. The Pareto-optimal masks set the k heaviest
    bits, so the front is {(k, sum(WEIGHTS[k:])) for k = 0..6}."""

    def evaluate(mask, lr):
        if kill_after is not None and len(calls) >= kill_after:
            raise Killed
        calls.append((tuple(mask), lr))
        ones = sum(mask)
        return {"objectives": {"ones": float(ones), "missed": sum(w for w, b in zip(WEIGHTS, mask) if not b)},
                "trainable_parameters": ones * 10, "trainable_percent": 100.0 * ones / len(WEIGHTS)}

    return evaluate


def _search(path, calls, **kw):
    args = dict(objectives=OBJ, population=12, generations=20, seed=0)
    args.update(kw)
    return nsga2_search(len(WEIGHTS), synthetic(calls), path, **args)


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]


def test_finds_the_known_pareto_front(tmp_path):
    calls = []
    res = _search(tmp_path / "log.jsonl", calls)
    expected = {(float(k), sum(WEIGHTS[k:])) for k in range(len(WEIGHTS) + 1)}
    found = {(r["objectives"]["ones"], r["objectives"]["missed"]) for r in res.front}
    assert found == expected
    for r in res.front:  # the optimal masks are prefixes of ones
        k = sum(r["mask"])
        assert r["mask"] == [1] * k + [0] * (len(WEIGHTS) - k)
    # the knee of a symmetric-ish front is an interior point, never an extreme
    assert 0 < sum(res.chosen["mask"]) < len(WEIGHTS)
    assert len(calls) == len(set(calls)) == res.evaluated == len(res.rows) < 2 ** len(WEIGHTS) * 0.6  # no brute force


def test_killed_and_resumed_gives_the_same_log(tmp_path):
    whole_calls = []
    _search(tmp_path / "whole.jsonl", whole_calls)
    whole = [json.loads(line) for line in (tmp_path / "whole.jsonl").read_text().splitlines()]
    for k in (1, 7, len(whole) - 1):
        path = tmp_path / f"resumed-{k}.jsonl"
        calls = []
        with pytest.raises(Killed):
            nsga2_search(len(WEIGHTS), synthetic(calls, kill_after=k), path, objectives=OBJ, population=12,
                         generations=20, seed=0)
        assert len(path.read_text().splitlines()) == k
        more = []
        res = nsga2_search(len(WEIGHTS), synthetic(more), path, objectives=OBJ, population=12, generations=20, seed=0)
        assert len(more) == len(whole) - k  # nothing repeated, nothing lost
        assert _strip(json.loads(line) for line in path.read_text().splitlines()) == _strip(whole)
        assert res.evaluated == len(whole) - k


def test_a_cached_mask_is_not_evaluated_again(tmp_path):
    calls = []
    _search(tmp_path / "log.jsonl", calls)
    again = []
    res = _search(tmp_path / "log.jsonl", again)
    assert again == [] and res.evaluated == 0 and len(res.rows) == len(calls)


def test_a_truncated_last_line_is_dropped(tmp_path):
    path = tmp_path / "log.jsonl"
    log = EvaluationLog(path)
    log.append({"key": "01@0.001", "objectives": {"a": 1.0}})
    with open(path, "a") as f:
        f.write('{"key": "11@0.0')  # a crash in the middle of a write
    again = EvaluationLog(path)
    assert len(again) == 1 and path.read_text().count("\n") == 1
    path.write_text('{"key": "1"}\nnot json\n')
    with pytest.raises(Exception, match="corrupt line 2"):
        EvaluationLog(path)


def test_learning_rate_genes_and_constraint(tmp_path):
    assert lr_bits(1) == 0 and lr_bits(2) == 1 and lr_bits(3) == 2 and lr_bits(4) == 2
    assert decode([1, 0, 1, 1], 2, [1e-4, 1e-3, 1e-2]) == ([1, 0], 1e-4)  # 0b11 = 3 -> 3 mod 3 = 0
    assert decode([0, 1, 0, 1], 2, [1e-4, 1e-3]) == ([0, 1], 1e-3)
    assert key_of([1, 0], 1e-3) == "10@0.001"
    calls = []
    res = _search(tmp_path / "log.jsonl", calls, lr_choices=(1e-4, 1e-3), max_trainable_percent=50.0)
    assert {lr for _, lr in calls} == {1e-4, 1e-3}
    assert all(r["trainable_percent"] <= 50.0 for r in res.front)
    assert max(sum(r["mask"]) for r in res.front) == 4  # at most 4 of 8 units fit under 50 %


def test_front_and_choice_by_hand():
    rows = [{"objectives": {"a": a, "b": b}, "trainable_percent": 1.0} for a, b in
            [(0, 10), (1, 5), (2, 2), (3, 3), (10, 0), (2, 2)]]
    front = pareto_front(rows, ["a", "b"])
    assert [(r["objectives"]["a"], r["objectives"]["b"]) for r in front] == [(0, 10), (1, 5), (2, 2), (10, 0)]
    # normalized: (0,1), (.1,.5), (.2,.2), (1,0): the knee (nearest the origin) is (2, 2)
    assert choose(front, ["a", "b"])["objectives"] == {"a": 2, "b": 2}
    assert choose(front, ["a", "b"], preference=[1, 0])["objectives"] == {"a": 0, "b": 10}
    with pytest.raises(ConfigError, match="preference"):
        choose(front, ["a", "b"], preference=[1])
    with pytest.raises(ConfigError):
        nsga2_search(0, lambda m, lr: {}, "x.jsonl", objectives=["a"])


# -- the real search on a tiny model ---------------------------------------------------------------------------
def test_mask_search_on_a_tiny_model_resumes_and_feeds_stage_two(tmp_path, tiny_dir_eps, tiny_dataset):
    from diffusers import StableDiffusionPipeline
    from typer.testing import CliRunner

    from memaudit.cli import app
    from memaudit.mitigate.finetune import finetune_with_mask, read_mask
    from memaudit.mitigate.search import SearchConfig, run_mask_search

    cfg = SearchConfig(method="difffit", population=2, generations=2, inner_steps=1, batch_size=2, val_fraction=0.25,
                       lr_choices=(1e-3, 1e-2), generations_per_prompt=2, sample_steps=2, quality_features="pixels",
                       device="cpu")
    out = tmp_path / "search"
    doc = run_mask_search(str(tiny_dir_eps), tiny_dataset, out, cfg)
    rows = (out / "evaluations.jsonl").read_text().splitlines()
    assert doc["evaluations"] == len(rows) == doc["evaluated_now"] >= 2
    assert set(doc["references"]) == {"method default", "full fine-tuning"}
    refs = (out / "references.jsonl").read_text().splitlines()
    assert doc["fine_tunes"] == {"total": len(rows) + 2, "mask_evaluations": len(rows), "run_now": len(rows) + len(refs),
                                 "references": ["method default", "full fine-tuning"],
                                 "without_training": sum(r["inner_steps"] == 0 for r in map(json.loads, rows))}
    assert doc["verdict"]["status"] in ("reference dominates", "references unbeaten", "masks competitive")
    assert json.loads((out / "pareto.json").read_text())["fine_tunes"] == doc["fine_tunes"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mask = read_mask(out)
    assert mask["method"] == "difffit" and len(mask["mask"]) == len(mask["units"]) and mask["learning_rate"] in (1e-3, 1e-2)
    # the same command again: everything comes from the logs
    again = run_mask_search(str(tiny_dir_eps), tiny_dataset, out, cfg)
    assert again["evaluated_now"] == 0 and again["chosen"] == doc["chosen"]
    assert again["fine_tunes"] == {**doc["fine_tunes"], "run_now": 0}
    with pytest.raises(ConfigError, match="other settings"):
        run_mask_search(str(tiny_dir_eps), tiny_dataset, out, SearchConfig(**{**cfg.to_dict(), "inner_steps": 2}))
    # stage 2 with the chosen mask, then export its adapter as a plain pipeline
    ft = tmp_path / "stage2"
    settings = finetune_with_mask(str(tiny_dir_eps), tiny_dataset, out / "mask.json", ft, steps=2, batch_size=2,
                                  device="cpu")
    assert settings["settings"]["mask"] == mask["mask"] and settings["settings"]["learning_rate"] == mask["learning_rate"]
    if any(mask["mask"]):
        res = CliRunner().invoke(app, ["mitigate", "export", str(ft / "adapter"), "--out", str(tmp_path / "merged")])
        assert res.exit_code == 0, res.output
        assert StableDiffusionPipeline.from_pretrained(tmp_path / "merged", safety_checker=None).unet is not None


def test_search_settings_errors():
    from memaudit.mitigate.search import SearchConfig

    for kw, match in [(dict(method="full"), "--method"),
                      (dict(memorization="ssim"), "'ssim' .*--objectives.* denoising\\|extraction\\|amd"),
                      (dict(quality="is"), "'is' .*--objectives.* kid\\|fid"), (dict(proxy_fraction=0), "--proxy-fraction"),
                      (dict(population=1), "--population")]:
        with pytest.raises(ConfigError, match=match):
            SearchConfig(**kw)


def test_screen_schedule_promotes_the_screening_front(tmp_path, tiny_dir_eps, tiny_dataset):
    from dataclasses import replace

    from memaudit.mitigate.search import EvaluationLog, SearchConfig, pareto_front, run_mask_search, spread_order

    cfg = SearchConfig(method="difffit", population=3, generations=1, inner_steps=3, schedule="screen", screen_steps=1,
                       batch_size=2, val_fraction=0.25, lr_choices=(1e-3,), generations_per_prompt=2, sample_steps=2,
                       quality_features="pixels", device="cpu")
    out = tmp_path / "screen"
    doc = run_mask_search(str(tiny_dir_eps), tiny_dataset, out, cfg)
    screened = EvaluationLog(out / "evaluations.jsonl").rows
    promoted = EvaluationLog(out / "promoted.jsonl").rows
    assert screened and all(r["inner_steps"] in (0, 1) for r in screened)  # 0: an all-zero mask trains nothing
    screen_front = pareto_front(screened, ["memorization", "quality"])
    # exactly the screening front is trained again, for the full inner steps
    assert sorted(r["key"] for r in promoted) == sorted(r["key"] for r in screen_front)
    assert all(r["inner_steps"] in (0, 3) for r in promoted)
    assert doc["chosen"]["key"] in {r["key"] for r in promoted} and doc["screening"]["evaluations"] == len(screened)
    assert doc["chosen"]["objectives"] == next(r for r in promoted if r["key"] == doc["chosen"]["key"])["objectives"]
    assert doc["inner_steps_total"] == sum(r["inner_steps"] for r in screened + promoted)
    ft = doc["fine_tunes"]
    assert (ft["screening"], ft["promoted"]) == (len(screened), len(promoted))
    assert ft["total"] == ft["mask_evaluations"] + 2 == len(screened) + len(promoted) + 2
    again = run_mask_search(str(tiny_dir_eps), tiny_dataset, out, cfg)
    assert again["evaluated_now"] == 0 and again["chosen"] == doc["chosen"]
    # --promote 1: only the first mask of the screening front's spread order is trained again
    one = run_mask_search(str(tiny_dir_eps), tiny_dataset, tmp_path / "one", replace(cfg, promote=1))
    first = spread_order(pareto_front(EvaluationLog(tmp_path / "one" / "evaluations.jsonl").rows,
                                      ["memorization", "quality"]))[0]
    assert [r["key"] for r in EvaluationLog(tmp_path / "one" / "promoted.jsonl").rows] == [first["key"]]
    assert one["chosen"]["key"] == first["key"] and one["screening"]["promoted"] == 1


def test_screen_settings_errors():
    from memaudit.mitigate.search import SearchConfig

    assert SearchConfig(schedule="screen", inner_steps=150).screen_steps == 30
    assert SearchConfig().screen_steps is None
    for kw, match in [(dict(schedule="halving"), "--schedule"),
                      (dict(schedule="screen", inner_steps=10, screen_steps=20), "--screen-steps"),
                      (dict(schedule="screen", promote=0), "--promote")]:
        with pytest.raises(ConfigError, match=match):
            SearchConfig(**kw)


def test_spread_order_takes_the_ends_then_the_farthest_point():
    from memaudit.mitigate.search import spread_order

    # a front from (0, 10) to (10, 0); scaled to [0, 1] per objective. After the two ends, (5, 5) is farthest from
    # both (distance sqrt(0.5)); then (2, 8) and (8, 2) tie at sqrt(0.08) from their nearest, and the earlier row wins.
    pts = [(2, 8), (0, 10), (5, 5), (8, 2), (10, 0), (9, 1)]
    front = [{"key": str(p), "objectives": {"memorization": p[0], "quality": p[1]}} for p in pts]
    order = [r["key"] for r in spread_order(front)]
    assert order == ["(0, 10)", "(10, 0)", "(5, 5)", "(2, 8)", "(8, 2)", "(9, 1)"]
    assert [r["key"] for r in spread_order(front[:2])] == ["(0, 10)", "(2, 8)"]


# -- objectives, bounds, the search space ------------------------------------------------------------------------
def test_objectives_are_parsed_and_errors_name_the_option_and_the_accepted_values():
    from memaudit.mitigate.search import parse_objectives

    assert parse_objectives("denoising,kid") == ("denoising", "kid")
    assert parse_objectives(" AMD , FID ") == ("amd", "fid")
    for text, says in [("privacy,beauty", "'privacy' is not a memorization objective and 'beauty' is not a quality"),
                       ("denoising", "is not two names"), ("denoising,kid,fid", "is not two names"),
                       ("extraction,beauty", "'beauty' is not a quality objective")]:
        with pytest.raises(ConfigError) as e:
            parse_objectives(text)
        msg = str(e.value)
        assert says in msg and msg.startswith(f"--objectives {text!r}")
        assert "denoising|extraction|amd" in msg and "kid|fid" in msg and "--memorization" not in msg
    with pytest.raises(ConfigError, match="order reversed: pass denoising,kid"):
        parse_objectives("kid,denoising")


def test_absurd_population_and_generations_are_refused_up_front():
    from memaudit.mitigate.search import MAX_GENERATIONS, MAX_POPULATION, SearchConfig

    with pytest.raises(ConfigError, match="--population must be between 2 and 1,000 \\(got 1,000,000,000\\)"):
        SearchConfig(population=10**9)
    with pytest.raises(ConfigError, match="--generations must be between 1 and 10,000 \\(got 1,000,000,000\\)"):
        SearchConfig(generations=10**9)
    cfg = SearchConfig(population=MAX_POPULATION, generations=MAX_GENERATIONS)  # the bounds themselves are allowed
    assert (cfg.population, cfg.generations) == (1000, 10000)
    with pytest.raises(ConfigError, match="--generations"):  # the library entry point checks too
        nsga2_search(3, synthetic([]), "never-written.jsonl", objectives=OBJ, population=2, generations=10**9)


def test_search_space_size_and_a_population_larger_than_it(tmp_path):
    from memaudit.mitigate.search import check_population, search_space_size

    assert search_space_size(3, [1e-3]) == 8
    assert search_space_size(3, [1e-3, 1e-2, 1e-1]) == 24  # 3 rates: the 2 genes alias one rate, still 24 candidates
    assert search_space_size(2, [1e-3, 0.001, 1e-2]) == 8  # a repeated rate is one candidate
    check_population(8, 3, [1e-3])  # exactly the space: allowed
    with pytest.raises(ConfigError) as e:
        check_population(9, 3, [1e-3], "difffit at block granularity")
    assert str(e.value) == ("--population 9 is larger than the search space: difffit at block granularity has 3 units, "
                            "so there are 2^3 masks x 1 learning rate = 8 distinct candidates; pass --population 8 or "
                            "less (or search more units: --granularity layer, more --lr-choices).")
    path = tmp_path / "log.jsonl"
    with pytest.raises(ConfigError, match="--population 5 is larger than the search space.* 2 units.* = 4 distinct"):
        nsga2_search(2, synthetic([]), path, objectives=OBJ, population=5, generations=3)
    assert not path.exists()


def test_a_population_as_large_as_the_space_stops_when_it_is_exhausted(tmp_path):
    """pymoo runs out of new genomes (duplicates are removed) and the search ends early instead of crashing;
    10,000 generations are never looped over or allocated."""
    calls = []
    res = nsga2_search(2, synthetic(calls), tmp_path / "log.jsonl", objectives=OBJ, population=4, generations=10_000)
    assert sorted(m for m, _ in calls) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(res.rows) == 4 and len(res.history) < 10


def test_reference_verdict_on_hand_made_points():
    from memaudit.mitigate.search import reference_verdict

    def rows(*pts):
        return [{"objectives": {"memorization": m, "quality": q}} for m, q in pts]

    front = rows((1.0, 5.0), (2.0, 3.0), (4.0, 1.0))
    full, default = rows((0.5, 0.5), (3.0, 4.0))
    # dominated: full fine-tuning is better on both objectives than every mask
    v = reference_verdict(front, {"method default": default, "full fine-tuning": full})
    assert v["status"] == "reference dominates" and v["dominating"] == v["strictly"] == ["full fine-tuning"]
    assert v["masks_better"] == {"method default": {"memorization": 2, "quality": 2},
                                 "full fine-tuning": {"memorization": 0, "quality": 0}}
    assert v["best_reference"] == {"memorization": "full fine-tuning", "quality": "full fine-tuning"}
    # not dominated: the masks beat both references somewhere
    v = reference_verdict(front, {"method default": default, "full fine-tuning": rows((1.5, 0.5))[0]})
    assert v["status"] == "masks competitive" and v["dominating"] == []
    assert v["masks_better"]["full fine-tuning"] == {"memorization": 1, "quality": 0}
    # tie: equal to the knee mask, better than the others where it is not equal: nothing beats it, but not strictly
    tie = rows((1.0, 1.0))[0]
    v = reference_verdict(front, {"full fine-tuning": tie})
    assert v["status"] == "reference dominates" and v["dominating"] == ["full fine-tuning"] and v["strictly"] == []
    assert reference_verdict(rows((1.0, 1.0)), {"full fine-tuning": tie})["strictly"] == []  # an exact tie
    # neither reference beats every mask alone, but each objective's best reference is unbeaten
    v = reference_verdict(front, {"method default": rows((0.5, 6.0))[0], "full fine-tuning": rows((5.0, 0.5))[0]})
    assert v["status"] == "references unbeaten" and v["dominating"] == []
    assert v["best_reference"] == {"memorization": "method default", "quality": "full fine-tuning"}
    assert reference_verdict([], {"full fine-tuning": full})["status"] == "no front"


# -- streaming: the latent cache and the proxy and validation images --------------------------------------------
def test_the_search_encodes_the_proxy_once_and_later_runs_find_it(tmp_path, tiny_dir_eps, tiny_dataset, monkeypatch):
    from memaudit.finetune import FinetuneConfig, finetune
    from memaudit.mitigate.search import SearchConfig, run_mask_search
    from memaudit.target import Target

    encoded: list[int] = []
    real = Target.encode_images
    monkeypatch.setattr(Target, "encode_images",
                        lambda self, images, batch_size=64: encoded.append(len(images)) or real(self, images, batch_size))
    cfg = SearchConfig(method="difffit", population=2, generations=1, inner_steps=1, batch_size=2, val_fraction=0.25,
                       lr_choices=(1e-3,), generations_per_prompt=2, sample_steps=2, device="cpu")
    cache = tmp_path / "cache"
    stages = []
    doc = run_mask_search(str(tiny_dir_eps), tiny_dataset, tmp_path / "s1", cfg, cache_dir=cache,
                          progress=lambda stage, done, total: stages.append((stage, done, total)))
    n_proxy = len(json.loads((tmp_path / "s1" / "search.json").read_text())["proxy"])
    assert n_proxy == 3  # 8 images: 2 for validation, half of the other 6 as the proxy
    assert doc["fine_tunes"]["run_now"] == 4  # 2 masks and 2 references, all on the same latents
    assert encoded == [n_proxy]  # encoded once for every evaluation
    assert ("latent cache", 3, 3) in stages
    assert (doc["latent_cache"]["status"], doc["latent_cache"]["encoded"]) == ("built", 3)
    again = run_mask_search(str(tiny_dir_eps), tiny_dataset, tmp_path / "s2", cfg, cache_dir=cache)
    assert encoded == [n_proxy] and again["latent_cache"]["status"] == "reused"
    # a fine-tune on the whole set finds the proxy's entries and encodes only the other images
    s = finetune(tiny_dir_eps, tiny_dataset, tmp_path / "ft", FinetuneConfig(steps=1, batch_size=2), device="cpu",
                 cache_dir=cache)
    assert (s["latent_cache"]["found"], s["latent_cache"]["encoded"]) == (3, 5) and encoded == [3, 5]


def _evaluator(target, dataset, memorization, batch_size):
    from memaudit.mitigate.search import MaskEvaluator, SearchConfig

    cfg = SearchConfig(method="difffit", memorization=memorization, generations_per_prompt=3, min_clique=2,
                       device="cpu")
    return MaskEvaluator(target, dataset.subset([0, 1, 2]), dataset.subset([3, 4, 5, 6, 7]), cfg,
                         batch_size=batch_size)


def test_extraction_and_amd_objectives_read_the_proxy_a_batch_at_a_time(tmp_path, tiny_dir_eps, tiny_dataset,
                                                                        monkeypatch):
    from types import SimpleNamespace

    import torch

    from memaudit.metrics.amd import amd_bruteforce
    from memaudit.target import load_target

    monkeypatch.setenv("MEMAUDIT_CACHE_DIR", str(tmp_path))
    pixels = (tiny_dataset.images + 1) / 2
    # prompt 0 and 2 reproduce their own image three times; prompt 1 reproduces image 5, not its own
    gens = torch.cat([pixels[i].expand(3, -1, -1, -1) for i in (0, 5, 2)])
    ev = _evaluator(load_target(tiny_dir_eps, device="cpu"), tiny_dataset, "extraction", batch_size=2)  # 0, 1 | 2
    monkeypatch.setattr(ev, "_sample", lambda captions, seed: [SimpleNamespace(images=gens)])
    assert ev.memorization() == (2.0, {"extracted": 2})
    target = load_target(tiny_dir_eps, device="cpu")  # an evaluator installs its method on the target's UNet
    ev = _evaluator(target, tiny_dataset, "amd", batch_size=2)
    monkeypatch.setattr(ev, "_sample", lambda captions, seed: [SimpleNamespace(images=gens)])
    value, details = ev.memorization()
    expected = amd_bruteforce(ev.extractor(gens).numpy(), ev.extractor(pixels[[0, 1, 2]]).numpy()).amd
    assert details == {"amd": float(expected)} and value == -float(expected)
    assert details["amd"] > 0.0  # image 5 is not in the proxy
    # the validation features, a batch at a time, equal those of the whole split at once
    assert torch.equal(ev.val_features, ev.extractor(pixels[[3, 4, 5, 6, 7]]))
    # the proxy latents come from the cache and equal the VAE's encoding of the proxy images, in the cache's encoding
    # batches (all 3 at once at 16 px), not the evaluator's reading batches
    assert torch.equal(ev.proxy_latents, target.encode_images(tiny_dataset.images[[0, 1, 2]])[0])


def test_copies_of_an_image_stay_together_in_the_search_splits(tmp_path, tiny_dir_eps, tiny_dataset):
    """A training set with copies (duplication drives memorization): no image is both in validation and trained on
    in the inner loop, and the proxy holds every copy of each image it takes, so it keeps the set's duplication."""
    from memaudit.data import from_arrays
    from memaudit.mitigate.search import SearchConfig, run_mask_search

    copies = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 5, 6, 7, 7, 7]  # 8 distinct images, 16 items
    data = from_arrays((tiny_dataset.images[copies] + 1) / 2, [tiny_dataset.captions[i] for i in copies], source="copies")
    image_of = dict(zip(data.names, data.content_groups().tolist()))  # each item's distinct image
    cfg = SearchConfig(method="difffit", population=2, generations=1, inner_steps=1, batch_size=2, val_fraction=0.25,
                       lr_choices=(1e-3,), generations_per_prompt=2, sample_steps=2, device="cpu")
    run_mask_search(str(tiny_dir_eps), data, tmp_path / "s", cfg, cache_dir=tmp_path / "cache")
    doc = json.loads((tmp_path / "s" / "search.json").read_text())
    val = {image_of[n] for n in doc["validation"]}
    proxy = {image_of[n] for n in doc["proxy"]}
    assert len(val) == 2 and not val & proxy  # 2 of the 8 distinct images, none trained on in the inner loop
    assert len(proxy) == 3  # half of the other 6 distinct images, each with all its copies:
    assert len(doc["proxy"]) == sum(copies.count(i) for i in sorted(set(copies)) if i in proxy)
    assert len(doc["validation"]) == sum(copies.count(i) for i in sorted(set(copies)) if i in val)


def test_objectives_score_each_distinct_image_once(tmp_path, tiny_dir_eps, tiny_dataset, monkeypatch):
    """On a proxy and a validation split with copies, the sampler is asked once per distinct image and the
    references hold each distinct image once (a product seen 32 times is not sampled 32 times)."""
    from types import SimpleNamespace

    import torch

    from memaudit.data import from_arrays
    from memaudit.mitigate.search import MaskEvaluator, SearchConfig
    from memaudit.target import load_target

    monkeypatch.setenv("MEMAUDIT_CACHE_DIR", str(tmp_path))
    pixels = (tiny_dataset.images + 1) / 2

    def with_copies(items):
        return from_arrays(pixels[items], [tiny_dataset.captions[i] for i in items], source="copies")

    proxy, val = with_copies([0, 0, 0, 1, 2, 2]), with_copies([3, 3, 4, 5, 5, 5])
    asked = []

    def sample(captions, seed):
        asked.append(list(captions))
        return [SimpleNamespace(images=torch.cat([pixels[tiny_dataset.captions.index(c)][None] for c in captions]
                                                 ).repeat_interleave(3, 0))]

    cfg = SearchConfig(method="difffit", memorization="amd", generations_per_prompt=3, device="cpu")
    target = load_target(tiny_dir_eps, device="cpu")
    ev = MaskEvaluator(target, proxy, val, cfg)
    monkeypatch.setattr(ev, "_sample", sample)
    value, details = ev.memorization()
    ev.quality()
    assert asked == [[tiny_dataset.captions[i] for i in (0, 1, 2)], [tiny_dataset.captions[i] for i in (3, 4, 5)]]
    assert abs(details["amd"]) < 1e-6  # every generation is its own proxy image
    assert torch.equal(ev.val_features, ev.extractor(pixels[[3, 4, 5]]))
    assert torch.equal(ev.proxy_features, ev.extractor(pixels[[0, 1, 2]]))
    # the denoising objective's latents: one per distinct proxy image, from the cache of all the proxy's items
    assert torch.equal(ev.proxy_latents, target.encode_images(tiny_dataset.images[[0, 1, 2]])[0])
    assert len(ev.latents) == 6  # training still sees every copy
