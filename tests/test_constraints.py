"""Constraints, their one-sided bounds and violations (Eq. 4/5, Sec. 6.2), reward references and reward checks."""

from __future__ import annotations

import math

import pytest
import torch

from l3m.confidence import training_estimate
from l3m.constraints import (Bound, Constraint, compute_rewards, parse_constraints, satisfied_mask,
                             surrogate_violations, target_metrics, violations)
from l3m.training.reinforce import constraint_advantages
from l3m.errors import L3MConfigError
from l3m.rewards import REWARD_REGISTRY, length_chars, length_tokens, length_words, resolve_reward

# ----------------------------------------------------------------------------------------------------------------
# bounds and violations
# ----------------------------------------------------------------------------------------------------------------


def test_range_expands_into_min_and_max_bounds():
    (c,) = parse_constraints([{"name": "length", "reward": "length_words", "min": 3, "max": 8}])
    bounds = c.bounds()
    assert [b.name for b in bounds] == ["length/min", "length/max"]
    assert all(isinstance(b, Bound) and b.constraint is c for b in bounds)
    rewards = {"length": torch.tensor([1.0, 3.0, 5.0, 8.0, 12.0])}
    got = violations(bounds, rewards)
    assert got.shape == (5, 2)
    # min side: b - r = 3 - r; max side: r - max = r - 8
    torch.testing.assert_close(got[:, 0], torch.tensor([2.0, 0.0, -2.0, -5.0, -9.0]))
    torch.testing.assert_close(got[:, 1], torch.tensor([-7.0, -5.0, -3.0, 0.0, 4.0]))
    # satisfied (<= 0) on both sides exactly for rewards inside [3, 8]
    inside = (got <= 0).all(dim=1)
    assert inside.tolist() == [False, True, True, True, False]
    assert [c.is_satisfied_by(r) for r in rewards["length"].tolist()] == inside.tolist()


def test_single_sided_constraints_keep_their_name():
    lo, hi = parse_constraints([
        {"name": "long_enough", "reward": "length_words", "min": 4},
        {"name": "short_enough", "reward": "length_chars", "max": 10.5},
    ])
    assert [b.name for b in lo.bounds()] == ["long_enough"]
    assert [b.name for b in hi.bounds()] == ["short_enough"]
    rewards = {"long_enough": torch.tensor([2.0, 6.0]), "short_enough": torch.tensor([12.0, 10.0])}
    got = violations(lo.bounds() + hi.bounds(), rewards)
    # [4 - 2, 12 - 10.5] and [4 - 6, 10 - 10.5]
    torch.testing.assert_close(got, torch.tensor([[2.0, 1.5], [-2.0, -0.5]]))


def test_name_defaults_to_the_reward_name_and_bounds_are_floats():
    c = Constraint(reward="length_tokens", min=20, max=40)
    assert c.name == "length_tokens"
    assert isinstance(c.min, float) and isinstance(c.max, float)
    assert [b.name for b in c.bounds()] == ["length_tokens/min", "length_tokens/max"]

    def my_reward(prompts, completions, completion_ids, **kwargs):
        return [0.0] * len(completions)

    assert Constraint(reward=my_reward, min=0).name == "my_reward"


def test_min_equal_to_max_is_allowed():
    c = Constraint(reward="length_words", min=5, max=5)
    assert [b.name for b in c.bounds()] == ["length_words/min", "length_words/max"]
    assert c.is_satisfied_by(5.0) and not c.is_satisfied_by(4.0) and not c.is_satisfied_by(6.0)


# ----------------------------------------------------------------------------------------------------------------
# config errors name the field
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_reward_name():
    with pytest.raises(L3MConfigError, match=r"^constraints\[len\]\.reward: unknown reward 'nope'") as err:
        parse_constraints([{"name": "len", "reward": "nope", "min": 1}])
    assert "length_tokens" in str(err.value)  # lists the known ones
    with pytest.raises(L3MConfigError, match=r"^constraints\[nope\]\.reward"):
        Constraint(reward="nope", min=1)


def test_min_greater_than_max():
    with pytest.raises(L3MConfigError, match=r"^constraints\[len\]: min \(50\) > max \(10\)"):
        parse_constraints([{"name": "len", "reward": "length_words", "min": 50, "max": 10}])


def test_neither_min_nor_max():
    with pytest.raises(L3MConfigError, match=r"^constraints\[len\]: .*'min' or 'max'"):
        parse_constraints([{"name": "len", "reward": "length_words"}])


def test_duplicated_names():
    with pytest.raises(L3MConfigError, match=r"^constraints: duplicated name\(s\) \['len'\]"):
        parse_constraints([
            {"name": "len", "reward": "length_words", "min": 1},
            {"name": "len", "reward": "length_chars", "max": 100},
        ])
    # two constraints on the same reward without names clash on the default name
    with pytest.raises(L3MConfigError, match=r"duplicated name\(s\) \['length_words'\]"):
        parse_constraints([{"reward": "length_words", "min": 1}, {"reward": "length_words", "max": 9}])
    # distinct names make them fine
    assert len(parse_constraints([{"name": "a", "reward": "length_words", "min": 1},
                                  {"name": "b", "reward": "length_words", "max": 9}])) == 2


def test_unknown_keys_in_a_record():
    with pytest.raises(L3MConfigError, match=r"^constraints\[1\]: unknown key\(s\) \['maximum'\]"):
        parse_constraints([{"reward": "length_words", "min": 1}, {"reward": "length_chars", "maximum": 3}])


@pytest.mark.parametrize("bad", ["20", {"a": 1}, [1], float("nan"), float("inf"), True])
def test_non_numeric_min(bad):
    with pytest.raises(L3MConfigError, match=r"^constraints\[len\]\.min: expected a finite number"):
        parse_constraints([{"name": "len", "reward": "length_words", "min": bad}])


def test_non_numeric_max():
    with pytest.raises(L3MConfigError, match=r"^constraints\[len\]\.max: expected a finite number"):
        parse_constraints([{"name": "len", "reward": "length_words", "max": "ten"}])


def test_unknown_kind():
    with pytest.raises(L3MConfigError, match=r"^constraints\[len\]\.kind: unknown kind 'almost_sure'; supported: "
                                             r"expectation, chance, uniform"):
        parse_constraints([{"name": "len", "reward": "length_words", "min": 1, "kind": "almost_sure"}])
    assert parse_constraints([{"reward": "length_words", "min": 1, "kind": "expectation"}])[0].kind == "expectation"


# ----------------------------------------------------------------------------------------------------------------
# constraint kinds (Sec. 4.1): chance and uniform
# ----------------------------------------------------------------------------------------------------------------


def _bounds(kind: str, **options):
    (c,) = parse_constraints([{"name": "len", "reward": "length_words", "min": 3, "max": 8, "kind": kind, **options}])
    return c, c.bounds()


def test_chance_values_are_the_indicator_against_one_minus_epsilon():
    c, bounds = _bounds("chance", epsilon=0.25)
    rewards = {"len": torch.tensor([1.0, 3.0, 5.0, 8.0, 12.0])}
    got = violations(bounds, rewards)
    # min side meets r >= 3 for the last four; max side meets r <= 8 for the first four: c = 0.75 - 1{met}
    torch.testing.assert_close(got[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25, -0.25]))
    torch.testing.assert_close(got[:, 1], torch.tensor([-0.25, -0.25, -0.25, -0.25, 0.75]))
    # the mean is (1 - eps) - P[met]: 0.75 - 4/5 = -0.05 <= 0 on both sides, so the chance constraint holds
    torch.testing.assert_close(got.mean(dim=0), torch.tensor([-0.05, -0.05]))
    assert c.is_met_by(rewards["len"])
    assert satisfied_mask(bounds, rewards).tolist() == [[False, True], [True, True], [True, True], [True, True],
                                                        [True, False]]
    # 2 of 4 samples fail the min side: P = 1/2 < 1 - 0.25
    assert not c.is_met_by(torch.tensor([1.0, 2.0, 4.0, 5.0]))


def test_chance_surrogate_has_a_signal_when_every_sample_fails():
    c, bounds = _bounds("chance", epsilon=0.1, indicator_temperature=2.0)
    rewards = {"len": torch.tensor([9.0, 12.0, 20.0, 30.0])}  # all above max 8: every sample fails the max side
    values = violations(bounds, rewards)[:, 1]
    torch.testing.assert_close(values, torch.full((4,), 0.9))  # the indicator cannot tell the samples apart ...
    advantages = constraint_advantages(values[:, None], torch.tensor([1.0]), "leave_one_out")
    torch.testing.assert_close(advantages, torch.zeros(4))  # ... so its REINFORCE estimate is zero
    surrogate = surrogate_violations(bounds, rewards)[:, 1]
    # c~ = 0.9 - sigmoid((8 - r) / 2): the sample closest to the bound is the least violating
    torch.testing.assert_close(surrogate, 0.9 - torch.sigmoid((8.0 - rewards["len"]) / 2.0))
    assert surrogate.tolist() == sorted(surrogate.tolist())
    advantages = constraint_advantages(surrogate[:, None], torch.tensor([1.0]), "leave_one_out")
    assert advantages[0] < 0 < advantages[-1]  # the gradient step raises the shortest sample's probability most
    # the surrogate tends to the indicator as the temperature goes to 0 (away from the bound)
    (sharp,) = parse_constraints([{"name": "s", "reward": "length_words", "max": 8, "kind": "chance", "epsilon": 0.1,
                                   "indicator_temperature": 1e-3}])
    r = torch.tensor([2.0, 7.0, 9.0, 30.0])
    torch.testing.assert_close(sharp.bounds()[0].surrogate(r), sharp.bounds()[0].values(r))


def test_uniform_values_are_the_mean_shortfall_minus_delta():
    c, bounds = _bounds("uniform")
    assert c.delta == 0.0
    rewards = {"len": torch.tensor([1.0, 3.0, 5.0, 8.0, 12.0])}
    got = violations(bounds, rewards)
    torch.testing.assert_close(got[:, 0], torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0]))  # max(0, 3 - r)
    torch.testing.assert_close(got[:, 1], torch.tensor([0.0, 0.0, 0.0, 0.0, 4.0]))  # max(0, r - 8)
    assert not c.is_met_by(rewards["len"])  # with delta 0: satisfied only if every sample is inside
    assert c.is_met_by(torch.tensor([3.0, 5.0, 8.0]))
    # the shortfall keeps a signal when every sample fails: the farther sample gets the larger violation
    all_fail = violations(bounds, {"len": torch.tensor([0.0, 2.0])})[:, 0]
    torch.testing.assert_close(all_fail, torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(surrogate_violations(bounds, {"len": torch.tensor([0.0, 2.0])})[:, 0], all_fail)
    tolerant, tolerant_bounds = _bounds("uniform", delta=0.5)
    # mean shortfalls 2/5 = 0.4 and 4/5 = 0.8, minus 0.5
    torch.testing.assert_close(violations(tolerant_bounds, rewards).mean(dim=0), torch.tensor([-0.1, 0.3]))
    assert not tolerant.is_met_by(rewards["len"])


# ----------------------------------------------------------------------------------------------------------------
# satisfaction targets (issue 15): margin and confidence
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, options", [("expectation", {}), ("chance", {"epsilon": 0.25}), ("uniform", {})])
def test_a_margin_moves_the_training_target_inward_and_leaves_evaluation_alone(kind, options):
    plain, plain_bounds = _bounds(kind, **options)
    c, bounds = _bounds(kind, margin=1.0, **options)  # training aims at [4, 7] inside [3, 8]
    rewards = {"len": torch.tensor([1.0, 3.5, 5.0, 7.5, 12.0])}
    torch.testing.assert_close(violations(bounds, rewards), violations(plain_bounds, rewards))
    tight, _ = _bounds(kind, min=4, max=7, **options)
    torch.testing.assert_close(violations(bounds, rewards, target=True), violations(tight.bounds(), rewards))
    torch.testing.assert_close(surrogate_violations(bounds, rewards), surrogate_violations(tight.bounds(), rewards))
    assert satisfied_mask(bounds, rewards).tolist() == satisfied_mask(plain_bounds, rewards).tolist()
    assert [b.target() for b in bounds] == [4.0, 7.0]
    assert c.is_met_by(torch.tensor([3.5, 3.5])) and not tight.is_met_by(torch.tensor([3.5, 3.5]))


def test_the_confidence_term_is_z_standard_errors_of_the_steps_estimate():
    c, bounds = _bounds("expectation", confidence=0.9)
    assert c.z == pytest.approx(1.2815515655446004)
    rewards = {"len": torch.tensor([4.0, 5.0, 6.0, 8.0])}
    values = violations(bounds, rewards, target=True)
    estimate, terms = training_estimate(bounds, values)
    se = torch.tensor([4.0, 5.0, 6.0, 8.0]).std() / 2  # the same spread on both sides of a range
    torch.testing.assert_close(terms, torch.full((2,), 1.2815515655446004 * se.item()))
    torch.testing.assert_close(estimate, values.mean(dim=0) + terms)
    assert bounds[0].target(terms[0].item()) == pytest.approx(3 + terms[0].item())  # min side moves up
    assert bounds[1].target(terms[1].item()) == pytest.approx(8 - terms[1].item())  # max side moves down
    assert target_metrics(bounds[1], 0.5) == {"constraints/len/max/target": 7.5,
                                               "constraints/len/max/confidence_term": 0.5}
    plain, plain_bounds = _bounds("expectation")
    estimate, terms = training_estimate(plain_bounds, values)
    assert terms.tolist() == [0.0, 0.0] and target_metrics(plain_bounds[0], 0.0) == {}
    torch.testing.assert_close(estimate, values.mean(dim=0))
    _, single = training_estimate(bounds, values[:1])
    assert single.tolist() == [0.0, 0.0]  # one sample has no spread to estimate


def test_on_a_range_the_confidence_term_stops_where_the_two_targets_meet():
    # range [3, 8] with margin 1: room (8 - 3) / 2 - 1 = 1.5 tokens; this spread asks z * s.e. = 1.64 * 2.6 = 4.3
    c, bounds = _bounds("expectation", margin=1, confidence=0.95)
    rewards = {"len": torch.tensor([0.0, 0.0, 9.0, 9.0])}
    values = violations(bounds, rewards, target=True)
    estimate, terms = training_estimate(bounds, values)
    assert terms.tolist() == [1.5, 1.5]
    assert [b.target(t) for b, t in zip(bounds, terms.tolist())] == [5.5, 5.5]  # both aim at the middle
    torch.testing.assert_close(estimate, values.mean(dim=0) + 1.5)
    _, small = training_estimate(bounds, violations(bounds, {"len": torch.tensor([5.0, 5.2, 5.4, 5.6])}, target=True))
    assert 0 < small[0].item() < 1.5  # below the room the term is z * s.e. as before
    one_sided = Constraint("length_words", min=3, confidence=0.95, name="len").bounds()
    _, free = training_estimate(one_sided, violations(one_sided, rewards, target=True))
    assert free.item() == pytest.approx(c.z * torch.tensor([0.0, 0.0, 9.0, 9.0]).std().item() / 2)  # no cap


def test_a_chance_confidence_term_is_in_probability_units_and_the_target_keeps_the_threshold():
    c, bounds = _bounds("chance", epsilon=0.2, confidence=0.95)
    values = violations(bounds, {"len": torch.tensor([1.0, 5.0, 5.0, 5.0])}, target=True)
    _, terms = training_estimate(bounds, values)
    assert terms[0].item() == pytest.approx(c.z * values[:, 0].std().item() / 2)  # the indicator's spread
    assert bounds[0].target(terms[0].item()) == 3.0 and terms[1].item() == 0.0  # every sample meets max 8


@pytest.mark.parametrize("record, message", [
    ({"margin": -1}, r"^constraints\[len\]\.margin: must be >= 0"),
    ({"margin": "1"}, r"^constraints\[len\]\.margin: expected a finite number, got '1'"),
    ({"margin": 3}, r"^constraints\[len\]\.margin: 3 on each side leaves nothing of \[3, 8\]; use at most 2\.5"),
    ({"confidence": 1.0}, r"^constraints\[len\]\.confidence: must be in \[0\.5, 1\) \(e\.g\. 0\.9\), got 1"),
    ({"confidence": 0.3}, r"^constraints\[len\]\.confidence: must be in \[0\.5, 1\)"),
    ({"confidence": float("nan")}, r"^constraints\[len\]\.confidence: expected a finite number"),
])
def test_bad_targets_are_one_line_errors(record, message):
    with pytest.raises(L3MConfigError, match=message):
        _bounds("expectation", **record)


def test_expectation_surrogate_is_its_value_and_satisfaction_is_the_mean():
    c, bounds = _bounds("expectation")
    rewards = {"len": torch.tensor([1.0, 9.0])}
    torch.testing.assert_close(surrogate_violations(bounds, rewards), violations(bounds, rewards))
    assert c.is_met_by(rewards["len"])  # mean 5 in [3, 8] though neither sample is


@pytest.mark.parametrize("record, message", [
    ({"kind": "chance"}, r"^constraints\[len\]\.epsilon: required for kind: chance"),
    ({"kind": "chance", "epsilon": 0}, r"^constraints\[len\]\.epsilon: must be in \(0, 1\), got 0"),
    ({"kind": "chance", "epsilon": 1.0}, r"^constraints\[len\]\.epsilon: must be in \(0, 1\), got 1"),
    ({"kind": "chance", "epsilon": "a tenth"}, r"^constraints\[len\]\.epsilon: expected a finite number"),
    ({"kind": "chance", "epsilon": 0.1, "indicator_temperature": 0},
     r"^constraints\[len\]\.indicator_temperature: must be > 0"),
    ({"kind": "uniform", "delta": -1}, r"^constraints\[len\]\.delta: must be >= 0"),
    ({"epsilon": 0.1}, r"^constraints\[len\]\.epsilon: only applies to kind: chance \(this constraint is kind: "
                       r"expectation\)"),
    ({"kind": "chance", "epsilon": 0.1, "delta": 1}, r"^constraints\[len\]\.delta: only applies to kind: uniform"),
])
def test_kind_options_are_validated(record, message):
    with pytest.raises(L3MConfigError, match=message):
        parse_constraints([{"name": "len", "reward": "length_words", "min": 1, **record}])


def test_records_must_be_a_list_of_mappings_with_a_reward():
    assert parse_constraints(None) == []
    with pytest.raises(L3MConfigError, match=r"^constraints: expected a list"):
        parse_constraints({"reward": "length_words", "min": 1})
    with pytest.raises(L3MConfigError, match=r"^constraints\[0\]: expected a mapping"):
        parse_constraints(["length_words"])
    with pytest.raises(L3MConfigError, match=r"^constraints\[0\]: missing 'reward'"):
        parse_constraints([{"min": 1}])


def test_constraint_objects_pass_through():
    c = Constraint(reward="length_chars", max=3)
    assert parse_constraints([c]) == [c]
    assert parse_constraints([c])[0] is c


def test_errors_are_value_errors():
    # callers that catch ValueError (e.g. argument parsers) still see config errors
    with pytest.raises(ValueError):
        parse_constraints([{"reward": "length_words"}])


# ----------------------------------------------------------------------------------------------------------------
# reward references
# ----------------------------------------------------------------------------------------------------------------


def test_module_function_reference_resolves():
    assert resolve_reward("l3m.rewards:length_words") is length_words
    c = Constraint(reward="l3m.rewards:length_chars", max=3)
    assert c.reward_func is length_chars
    assert c.name == "l3m.rewards:length_chars"


def test_registry_names_and_callables_resolve():
    for name, func in REWARD_REGISTRY.items():
        assert resolve_reward(name) is func
    assert set(REWARD_REGISTRY) == {"length_tokens", "length_words", "length_chars", "relevance", "civility"}
    f = lambda prompts, completions, completion_ids, **kw: [1.0] * len(completions)  # noqa: E731
    assert resolve_reward(f) is f


def test_missing_module_gives_a_clear_error():
    with pytest.raises(L3MConfigError, match=r"^constraints\[x\]\.reward: cannot import module 'no_such_module_l3m'"):
        Constraint(reward="no_such_module_l3m:score", min=0, name="x")


def test_missing_function_gives_a_clear_error():
    with pytest.raises(L3MConfigError, match=r"^constraints\[x\]\.reward: 'l3m\.rewards' has no callable named 'nope'"):
        Constraint(reward="l3m.rewards:nope", min=0, name="x")
    # an attribute that exists but is not callable
    with pytest.raises(L3MConfigError, match=r"has no callable named 'REWARD_REGISTRY'"):
        resolve_reward("l3m.rewards:REWARD_REGISTRY", field="reward")


@pytest.mark.parametrize("bad", ["", 3, None])
def test_reward_reference_of_the_wrong_type(bad):
    with pytest.raises(L3MConfigError, match=r"^my_field: expected a reward name or 'module:function'"):
        resolve_reward(bad, field="my_field")


# ----------------------------------------------------------------------------------------------------------------
# compute_rewards
# ----------------------------------------------------------------------------------------------------------------

PROMPTS = ["q1", "q2"]
COMPLETIONS = ["one two three", "four"]
COMPLETION_IDS = [[7, 8, 9, 2], [10, 2]]


def _constraint(func, name="bad"):
    return Constraint(reward=func, min=0.0, name=name)


def test_compute_rewards_scores_each_constraint():
    seen = {}

    def custom(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids)
        return [len(p) * 10 for p in prompts]  # ints are accepted

    constraints = [Constraint(reward="length_words", min=1, name="words"),
                   Constraint(reward="length_tokens", max=9, name="tokens"), _constraint(custom, "custom")]
    got = compute_rewards(constraints, PROMPTS, COMPLETIONS, COMPLETION_IDS)
    assert list(got) == ["words", "tokens", "custom"]
    torch.testing.assert_close(got["words"], torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(got["tokens"], torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(got["custom"], torch.tensor([20.0, 20.0]))
    assert all(t.dtype == torch.float32 for t in got.values())
    assert seen == {"prompts": PROMPTS, "completions": COMPLETIONS, "completion_ids": COMPLETION_IDS}


def test_compute_rewards_rejects_wrong_length():
    def short(prompts, completions, completion_ids, **kwargs):
        return [1.0]

    with pytest.raises(L3MConfigError, match=r"^constraints\[bad\]\.reward: the reward function returned 1 values; "
                                             r"expected a list of 2 numbers"):
        compute_rewards([_constraint(short)], PROMPTS, COMPLETIONS, COMPLETION_IDS)


def test_compute_rewards_rejects_none():
    def nothing(prompts, completions, completion_ids, **kwargs):
        return None

    with pytest.raises(L3MConfigError, match=r"^constraints\[bad\]\.reward: the reward function returned None"):
        compute_rewards([_constraint(nothing)], PROMPTS, COMPLETIONS, COMPLETION_IDS)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_compute_rewards_rejects_nan_and_inf(value):
    def broken(prompts, completions, completion_ids, **kwargs):
        return [1.0, value]

    with pytest.raises(L3MConfigError, match=r"^constraints\[bad\]\.reward: the reward function returned NaN or inf"):
        compute_rewards([_constraint(broken)], PROMPTS, COMPLETIONS, COMPLETION_IDS)


@pytest.mark.parametrize("values", [["a", 1.0], [None, 1.0], [[1.0], [2.0]], [{"r": 1}, 2.0]])
def test_compute_rewards_rejects_non_numbers(values):
    def broken(prompts, completions, completion_ids, **kwargs):
        return values

    with pytest.raises(L3MConfigError, match=r"^constraints\[bad\]\.reward: the reward function returned a non-number"):
        compute_rewards([_constraint(broken)], PROMPTS, COMPLETIONS, COMPLETION_IDS)


def test_compute_rewards_accepts_a_tensor():
    def as_tensor(prompts, completions, completion_ids, **kwargs):
        return torch.tensor([0.5, -1.5], dtype=torch.float64)

    got = compute_rewards([_constraint(as_tensor, "t")], PROMPTS, COMPLETIONS, COMPLETION_IDS)
    torch.testing.assert_close(got["t"], torch.tensor([0.5, -1.5]))


# ----------------------------------------------------------------------------------------------------------------
# built-in rewards
# ----------------------------------------------------------------------------------------------------------------


def test_length_tokens():
    assert length_tokens(["p"] * 3, ["", "a", "b c"], [[], [4], [5, 6, 7]]) == [0.0, 1.0, 3.0]


def test_length_words():
    # whitespace-separated: tabs, newlines and repeated spaces all separate words
    got = length_words(["p"] * 4, ["", "   ", "one", "  a  b\n c\td  "], [[]] * 4)
    assert got == [0.0, 0.0, 1.0, 4.0]
    assert all(isinstance(v, float) for v in got)


def test_length_chars():
    got = length_chars(["p"] * 3, ["", "abc", "a b\n"], [[]] * 3)
    assert got == [0.0, 3.0, 4.0]
    assert all(isinstance(v, float) for v in got)


def test_builtin_rewards_accept_extra_keyword_arguments():
    assert length_words(prompts=["p"], completions=["x y"], completion_ids=[[1]], trainer_state=None) == [2.0]
