"""The demo data generator: known truth, recorded flips, style traps, determinism."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from schemas.pairs import validate_pair
from streams.exceptions import ConfigError
from streams.local.generate import CATEGORIES, GenerateConfig, as_clean, generate, truly_better
from streams.runtime.processors.verifiers import verify_code, verify_math


def test_same_seed_same_pairs_and_another_seed_differs():
    a = list(generate(GenerateConfig(n=120, seed=7)))
    assert a == list(generate(GenerateConfig(n=120, seed=7)))
    assert a != list(generate(GenerateConfig(n=120, seed=8)))


def test_at_least_ten_categories_every_pair_valid_and_truth_recorded():
    pairs = list(generate(GenerateConfig(n=600, seed=1)))
    cats = Counter(p["metadata"]["gen_category"] for p in pairs)
    assert len(cats) >= 10 and min(cats.values()) >= 40
    for p in pairs:
        validate_pair(p)
        m = p["metadata"]
        assert m["truth"] == ("rejected" if m["flipped"] == "true" else "chosen")


def test_flipped_share_is_configurable_and_flips_swap_the_better_answer():
    for share in (0.0, 0.2, 0.5):
        pairs = list(generate(GenerateConfig(n=1000, seed=2, flip_share=share)))
        got = sum(p["metadata"]["flipped"] == "true" for p in pairs) / len(pairs)
        assert abs(got - share) < 0.04, (share, got)
    clean = {p["pair_id"]: p for p in generate(GenerateConfig(n=200, seed=3, flip_share=0.0))}
    noisy = list(generate(GenerateConfig(n=200, seed=3, flip_share=0.2)))
    flipped = [p for p in noisy if p["metadata"]["flipped"] == "true"]
    assert flipped
    for p in noisy:  # a flip changes only the published label, and as_clean undoes it
        assert truly_better(p) == truly_better(as_clean(p))
        assert as_clean(p)["chosen"] == truly_better(p)
        assert {p["chosen"], p["rejected"]} == {as_clean(p)["chosen"], as_clean(p)["rejected"]}
    assert len(clean) == 200


def test_style_traps_make_the_worse_answer_longer_and_markdown():
    pairs = [p for p in generate(GenerateConfig(n=600, seed=4, style_trap_share=0.3)) if p["metadata"]["style_trap"] == "true"]
    assert len(pairs) > 100
    for p in pairs:
        good = truly_better(p)
        bad = p["rejected"] if good == p["chosen"] else p["chosen"]
        assert len(bad) > len(good) and bad.startswith("## ") and "**" in bad and "## " not in good


def test_verifiers_agree_with_the_recorded_truth():
    pairs = list(generate(GenerateConfig(n=480, seed=5)))
    math = [p for p in pairs if "answer" in p["metadata"]]
    code = [p for p in pairs if "tests" in p["metadata"]][:12]  # each runs two sandboxed interpreters
    assert len(math) >= 150 and len(code) == 12
    assert all(verify_math(p) == p["metadata"]["truth"] for p in math)
    assert all(verify_code(p) == p["metadata"]["truth"] for p in code)


def test_unknown_category_is_refused():
    with pytest.raises(ConfigError, match="unknown categories"):
        list(generate(GenerateConfig(n=1, categories=("poetry",))))


def test_cli_writes_the_same_pairs_and_refuses_bad_options(tmp_path, stack_settings):
    from tests.helpers import run_cli

    out = tmp_path / "pairs.jsonl"
    run_cli(["generate", "-n", "30", "--seed", "9", "--category", "safety", "--category", "arithmetic", "-o", str(out)],
            stack_settings)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == list(generate(GenerateConfig(n=30, seed=9, categories=("safety", "arithmetic"))))
    bad = run_cli(["generate", "--category", "poetry"], stack_settings, check=False)
    assert bad.returncode == 2 and "choose from" in bad.stderr and "arithmetic" in bad.stderr
    bad = run_cli(["generate", "--flip-share", "1.5"], stack_settings, check=False)
    assert bad.returncode == 2 and "flip-share" in bad.stderr
    assert set(CATEGORIES) >= {"safety", "arithmetic"}


MIX = GenerateConfig(n=3000, seed=11, flip_share=0.06, style_flip_share=0.05, confident_flip_share=0.04,
                     noisy_source_share=0.15, noisy_source_flip_rate=0.4)


def test_the_noise_mix_comes_out_as_configured():
    from streams.local.generate import NOISY_SOURCE

    pairs = list(generate(MIX))
    wrong = Counter(p["metadata"]["noise"] for p in pairs if p["metadata"]["flipped"] == "true")
    share = {k: v / len(pairs) for k, v in wrong.items()}
    for kind, want in (("random", 0.06), ("style", 0.05), ("confident", 0.04), ("source", 0.15 * 0.4)):
        assert abs(share[kind] - want) < 0.015, (kind, share)
    noisy = [p for p in pairs if p["source"] == NOISY_SOURCE]
    assert abs(len(noisy) / len(pairs) - 0.15) < 0.02
    assert all(p["metadata"]["noise"] == "source" for p in noisy)
    rate = sum(p["metadata"]["flipped"] == "true" for p in noisy) / len(noisy)
    assert abs(rate - 0.4) < 0.06  # the one noisy source, far above the rest
    rest = [p for p in pairs if p["source"] != NOISY_SOURCE]
    assert sum(p["metadata"]["flipped"] == "true" for p in rest) / len(rest) < 0.2


def test_the_truth_of_each_kind_of_noise_is_recorded_and_right():
    from streams.local.generate import OBJECTIVE_CATEGORIES, STYLE_TRAP_CATEGORIES

    pairs = list(generate(MIX))
    math = verify_math
    for p in pairs:
        m = p["metadata"]
        assert m["truth"] == ("rejected" if m["flipped"] == "true" else "chosen")
        good, bad = truly_better(p), (p["rejected"] if truly_better(p) == p["chosen"] else p["chosen"])
        if m["noise"] == "style":  # the dressed-up worse answer won
            assert m["gen_category"] in STYLE_TRAP_CATEGORIES and m["style_trap"] == "true"
            assert p["chosen"] == bad and len(bad) > len(good) and bad.startswith("## ") and "**" in bad
        if m["noise"] == "confident":  # the confidently wrong answer won, and a checker still says so
            assert m["gen_category"] in OBJECTIVE_CATEGORIES and p["chosen"] == bad
            assert any(w in bad for w in ("certain", "no question", "guaranteed"))
            if "answer" in m:
                assert math(p) == "rejected"
        if m["noise"] in ("random", "style", "confident"):
            assert m["flipped"] == "true"
    assert {"random", "style", "confident", "source", "none"} == {p["metadata"]["noise"] for p in pairs}
    assert all(as_clean(p)["metadata"]["flipped"] == "false" and as_clean(p)["chosen"] == truly_better(p) for p in pairs)
    assert all(as_clean(p)["metadata"]["noise"] == "none" for p in pairs if p["metadata"]["flipped"] == "true")


def test_a_noise_mix_the_pairs_cannot_hold_is_refused(tmp_path, stack_settings):
    from tests.helpers import run_cli

    with pytest.raises(ConfigError, match="lower flip_share"):
        list(generate(GenerateConfig(n=1, flip_share=0.5, style_flip_share=0.4)))
    out = tmp_path / "mix.jsonl"
    run_cli(["generate", "-n", "40", "--seed", "3", "--flip-share", "0.05", "--style-flip-share", "0.1",
             "--confident-flip-share", "0.1", "--noisy-source-share", "0.2", "--noisy-source-flip-rate", "0.5",
             "-o", str(out)], stack_settings)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == list(generate(GenerateConfig(n=40, seed=3, flip_share=0.05, style_flip_share=0.1,
                                               confident_flip_share=0.1, noisy_source_share=0.2,
                                               noisy_source_flip_rate=0.5)))
    bad = run_cli(["generate", "--flip-share", "0.6", "--confident-flip-share", "0.5"], stack_settings, check=False)
    assert bad.returncode == 2 and "lower flip_share" in bad.stderr


def test_noise_planted_in_hh_pairs_comes_out_as_configured_with_the_truth_recorded():
    from streams.local.generate import confident_wrong, plant_noise
    from tests.helpers import hh_valid_pairs, require_hh_rlhf

    require_hh_rlhf()
    pairs = hh_valid_pairs(1000)
    cfg = GenerateConfig(seed=3, flip_share=0.06, style_trap_share=0.15, style_flip_share=0.05,
                         confident_flip_share=0.04, noisy_source_share=0.15, noisy_source_flip_rate=0.4)
    noisy = list(plant_noise(pairs, cfg))
    assert noisy == list(plant_noise(pairs, cfg)) and len(noisy) == len(pairs)
    kinds = Counter(p["metadata"]["noise"] for p in noisy if p["metadata"]["flipped"] == "true")
    n = len(pairs)
    for kind, share in (("random", 0.06), ("style", 0.05), ("confident", 0.04), ("source", 0.15 * 0.4)):
        assert abs(kinds[kind] / n - share) < 0.025, (kind, kinds[kind] / n)
    for before, after in zip(pairs, noisy, strict=True):
        validate_pair(after)
        # The truth is the published HH label: the truly better answer is the original chosen one, dressed or not.
        assert truly_better(after) == before["chosen"] and after["pair_id"] == before["pair_id"]
        worse = after["chosen"] if after["metadata"]["truth"] == "rejected" else after["rejected"]
        if after["metadata"]["noise"] == "confident":
            assert worse != before["rejected"] and before["rejected"] in worse
        if after["metadata"]["style_trap"] == "true":
            assert worse.startswith("## Answer")
    probe = confident_wrong(pairs[:20], seed=1)
    assert all(p["chosen"] == q["chosen"] and q["rejected"] in p["rejected"] != q["rejected"]
               for p, q in zip(probe, pairs[:20], strict=True))
