"""``options.construct`` checks each option's value against the constructor's annotations."""

import inspect
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Optional

import pytest
from helpers import load_shipped_recipe

from densessl.build import build_pair_builder, build_source_dataset
from densessl.data.labeled.build import EVAL_DATASETS
from densessl.data.registry import SOURCES
from densessl.errors import RecipeError
from densessl.options import check_option_types, construct, matches
from densessl.pairs import get_pair_builder
from densessl.recipe import load_recipe, recipes_dir


def factory(count: int = 1, rate: float = 0.5, flag: bool = False, name: str = "x",
            mode: Literal["a", "b"] = "a", level: Literal[1, 2] = 1,
            limit: Optional[int] = None, sizes: Sequence[float] = (1.0,),  # noqa: UP045
            pair: tuple[int, int] = (0, 1), ids: list[int] | None = None,
            table: dict[str, float] | None = None, root: str | Path | None = None, anything=None):
    return locals()


@pytest.mark.parametrize("key,value", [
    ("count", 3), ("rate", 2), ("rate", 0.25), ("flag", True), ("name", "y"), ("mode", "b"),
    ("level", 2), ("limit", None), ("limit", 4), ("sizes", [0.5, 2]), ("sizes", (1.0,)),
    ("pair", [3, 4]), ("ids", [1, 2]), ("table", {"a": 1, "b": 0.5}), ("root", "/data"),
    ("root", Path("/data")), ("anything", object()),
])
def test_values_of_the_annotated_type_pass(key, value):
    assert construct(factory, {key: value}, "pairs.options")[key] == value


@pytest.mark.parametrize("key,value,expected", [
    ("count", "three", "int"),
    ("count", True, "int"),          # bool is an int subclass, but not a count
    ("count", 2.5, "int"),
    ("rate", "fast", "float"),
    ("rate", False, "float"),
    ("flag", 1, "bool"),
    ("name", 3, "str"),
    ("mode", "c", "'a' | 'b'"),
    ("level", True, "1 | 2"),        # True == 1, yet not the literal 1
    ("limit", "4", "int | null"),
    ("sizes", 0.5, "list[float]"),
    ("sizes", ["big"], "list[float]"),
    ("pair", [1, 2, 3], "list[int, int]"),
    ("ids", "1,2", "list[int] | null"),
    ("table", {"a": "x"}, "dict[str, float] | null"),
])
def test_wrong_types_name_key_value_and_expected_type(key, value, expected):
    message = f"pairs.options.{key}: expected {expected} for factory, got {value!r}"
    with pytest.raises(RecipeError, match="^" + re.escape(message)):
        construct(factory, {key: value}, "pairs.options")


def test_a_builder_option_of_the_wrong_type_is_a_recipe_error_before_building():
    recipe = load_recipe({"pairs": {"builder": "cut_paste", "options": {"k": "three"}}})
    with pytest.raises(RecipeError, match=r"^pairs\.options\.k: expected int for CutPastePairs, "
                       r"got 'three' \(str\)"):
        build_pair_builder(recipe)
    recipe = load_recipe({"data": {"options": {"num_images": 2.5}}})
    with pytest.raises(RecipeError, match=r"^data\.options\.num_images: expected int .*got 2\.5"):
        build_source_dataset(recipe)


def test_every_shipped_recipe_and_default_passes_the_check():
    # the check must not refuse what the project's own recipes write (lists for tuples, ints
    # for floats), nor the defaults the constructors declare
    names = [p.name for p in recipes_dir().iterdir() if p.name.endswith(".yaml")]
    assert len(names) >= 5
    for name in names:
        path = recipes_dir() / name
        recipe = load_shipped_recipe(path)
        check_option_types(get_pair_builder(recipe.pairs.builder), recipe.pairs.options,
                           f"{name}: pairs.options", recipe.pairs.builder)
        check_option_types(SOURCES[recipe.data.source], recipe.data.options,
                           f"{name}: data.options", recipe.data.source)
        check_option_types(EVAL_DATASETS[recipe.finetune.dataset], recipe.finetune.options,
                           f"{name}: finetune.options", recipe.finetune.dataset)
    for registry in (SOURCES, EVAL_DATASETS):
        for fn in registry.values():
            target = fn.__init__ if inspect.isclass(fn) else fn
            hints = typing.get_type_hints(target)
            for key, p in inspect.signature(fn).parameters.items():
                if key in hints and p.default is not p.empty:
                    assert matches(p.default, hints[key]), (fn, key, p.default)
