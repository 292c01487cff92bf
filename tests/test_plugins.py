"""Import paths and model_args (fedmpi/plugins.py), pure functions."""
from __future__ import annotations

import pytest

from fedmpi import plugins
from fedmpi.errors import ConfigError


@pytest.mark.parametrize("text,ok", [("a:b", True), ("pkg.mod:Class.method", True), ("_m:f_2", True),
                                     ("a", False), (":b", False), ("a:", False), ("../a:b", False),
                                     ("a.b:c d", False), ("a:b:c", False), ("a/b:c", False),
                                     ("a:" + "b" * 300, False), (3, False)])
def test_import_path_form(text, ok):
    assert plugins.is_import_path(text) is ok


def test_model_args_read_text_as_numbers_booleans_or_text():
    assert plugins.keyword_args("model_args", {"a": "3", "b": "2.5", "c": "true", "d": "relu", "e": ["1", "x"],
                                               "f": None, "g": 7}) == \
        {"a": 3, "b": 2.5, "c": True, "d": "relu", "e": [1, "x"], "f": None, "g": 7}
    assert plugins.keyword_args("model_args", "{width: 8}") == {"width": 8}
    assert plugins.keyword_args("model_args", None) == {} == plugins.keyword_args("model_args", "")


@pytest.mark.parametrize("value,expect", [
    ({"input_shape": 1}, "'input_shape' is passed by fedmpi"),
    ({"not a name": 1}, "is not a keyword argument name"),
    ({f"k{i}": i for i in range(33)}, "33 entries, at most 32"),
    ({"a": float("inf")}, "must be finite"),
    ({"a": 10**30}, "too large"),
    ({"a": {"b": 1}}, "must be a number, true/false, a text or a list"),
    ({"a": [[1]]}, "must be a number, true/false, a text or a list"),
    ({"a": "x\x00"}, "without NUL bytes"),
    ("[1, 2]", "must be a mapping"),
    ("{a: *b}", "config key 'model_args'"),
])
def test_bad_model_args_name_the_entry(value, expect):
    with pytest.raises(ConfigError, match="config key 'model_args'") as err:
        plugins.keyword_args("model_args", value)
    assert expect in str(err.value)


def test_an_object_given_directly_is_found_under_its_name_until_forgotten():
    def local():
        pass

    with pytest.raises(ConfigError, match="no module-level name"):
        plugins.give("model", local)
    path = plugins.give("loss", test_import_path_form)
    assert path == f"{__name__}:test_import_path_form"
    assert plugins.load("loss", path) is test_import_path_form
    plugins.forget()
    assert plugins.load("loss", path) is test_import_path_form  # importable anyway: the same object


def test_load_names_the_key_and_the_path():
    assert plugins.load("model", "fedmpi.engine.models:cnn").__name__ == "cnn"
    with pytest.raises(ConfigError, match=r"config key 'loss' 'fedmpi:__version__': __version__ is a str"):
        plugins.load("loss", "fedmpi:__version__")
    with pytest.raises(ConfigError, match=r"config key 'model' 'fedmpi.nothing:f': no module named"):
        plugins.load("model", "fedmpi.nothing:f")
