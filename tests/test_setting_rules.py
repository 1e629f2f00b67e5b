"""The allowed values of the settings (:mod:`recbole_llm.setting_rules`) are checked by ``load_config``.

Every declared rule is walked with wrong values (a wrong name, a number outside the range, a
value of the wrong type), each through ``load_config`` of a model whose property files set the
setting: one line naming the setting, before any model is built. Every rule names a setting of
some property file, and every property-file default satisfies its rule.

Breakage checked by hand: ``check_settings`` made to return at once (the walk fails on every
wrong name and out-of-range number; only wrong types are still caught, by the kind check).
"""
from pathlib import Path

import pytest

from recbole_llm import setting_rules
from recbole_llm.config import load_config, properties_dir
from recbole_llm.errors import InputError
from recbole_llm.setting_rules import RULES, Choice, Range
from recbole_llm.yaml_io import read_yaml

PROPERTY_FILES = [properties_dir() / "overall.yaml", *sorted((properties_dir() / "model").glob("*.yaml"))]


def _defaults(path: Path) -> dict:
    return read_yaml(path) or {}


def _owner(key: str) -> str:
    """A model whose property files set ``key`` (LRURec, the cheapest, for overall.yaml's settings)."""
    path = next(path for path in PROPERTY_FILES if key in _defaults(path))
    return "LRURec" if path.name == "overall.yaml" else path.stem


def _wrong_values(rule) -> list:
    """Values outside ``rule``: a wrong name or a number past each bound, a wrong type, and ~ where it is not allowed."""
    wrong = [] if rule.none else [None]
    if isinstance(rule, Choice):
        return wrong + ([[], ["nosuch"], 3] if rule.many else ["nosuch", 3])
    step = 1 if rule.kind is int else 0.5
    wrong.append(rule.low if rule.low_open else rule.low - step)
    if rule.high is not None:
        wrong.append(rule.high if rule.high_open else rule.high + step)
    return wrong + ["many"] + ([1.5] if rule.kind is int else [])


@pytest.mark.parametrize("key", sorted(RULES))
def test_a_wrong_value_of_every_rule_stops_load_config_with_one_line(tiny_data, key):
    name, overrides = tiny_data
    for value in _wrong_values(RULES[key]):
        with pytest.raises(InputError) as error:
            load_config(_owner(key), name, config_dict={**overrides, key: value})
        message = str(error.value)
        assert key in message and "\n" not in message, message


def test_the_line_names_the_value_the_allowed_values_and_the_fix(tiny_data):
    name, overrides = tiny_data
    with pytest.raises(InputError) as error:
        load_config("SeRALM", name, config_dict={**overrides, "kl_estimator": "ful"})
    assert str(error.value).startswith("kl_estimator='ful' is not one of full, sample: did you mean full? "
                                       "Set --kl_estimator=full (or kl_estimator: full in your YAML file;")
    with pytest.raises(InputError) as error:
        load_config("Laser", name, config_dict={**overrides, "llm_layers": 0})
    assert str(error.value).startswith("llm_layers=0 is out of range: the number of the frozen LLM's first decoder "
                                       "layers kept, a whole number >= 1, or ~ (all). Set --llm_layers=...")
    with pytest.raises(InputError, match=r"^resample_items=\['target', 'lst'\] is not a non-empty list of target, "
                                         r"last, history: did you mean last\? Set resample_items: \[target, last\] in your"):
        load_config("SeRALM", name, config_dict={**overrides, "resample_items": ["target", "lst"]})


def test_every_rule_names_a_setting_of_a_property_file():
    declared = set().union(*(_defaults(path) for path in PROPERTY_FILES))
    assert set(RULES) <= declared, sorted(set(RULES) - declared)


def test_every_property_file_default_satisfies_its_rule():
    for path in [*PROPERTY_FILES, *sorted((properties_dir() / "dataset").glob("*.yaml"))]:
        defaults = _defaults(path)
        nested = [value for value in defaults.values() if isinstance(value, dict)]  # stage-1 overrides
        for settings in [defaults, *nested]:
            for key, value in settings.items():
                assert setting_rules.problem(key, value) is None, f"{path}: {setting_rules.problem(key, value)}"


@pytest.mark.parametrize("rule, inside, outside", [
    (Range(int, 1, "n", 26), [1, 26], [0, 27, 2.0, True]),
    (Range(float, 0, "p", 1, low_open=True), [1, 0.5, 1e-9], [0, 1.5, "0.5"]),
    (Range(float, 0, "d", 1, high_open=True, none="off"), [0, 0.99, None], [1, -0.1]),
    (Choice(("a", "b"), "c", many=True), ["a", ["a", "b"]], [[], ["a", "c"], None]),
])
def test_a_rule_takes_its_bounds_and_refuses_what_is_past_them(rule, inside, outside):
    assert [rule.problem("x", value) for value in inside] == [None] * len(inside)
    assert all(rule.problem("x", value) for value in outside)
