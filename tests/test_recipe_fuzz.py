"""Whatever YAML or `--set` a user writes, the loader returns a config or one line of error."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmae_cli.config.recipe import Recipe, RecipeError, load_recipe, recipe_options

KEYS = [
    "name",
    "seed",
    "data",
    "model",
    "pretrain",
    "finetune",
    "certify",
    "epochs",
    "sigma",
    "mask_ratio",
    "options",
    "root",
    "batch_size",
    "alpha",
    "radii",
    "lr",
    "betas",
    "x",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KEYS) | st.integers(), inner, max_size=4),
    ),
    max_leaves=12,
)
paths = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(".".join)


def check(load) -> None:
    try:
        assert isinstance(load(), Recipe)
    except RecipeError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=documents)
def test_any_yaml_document(tmp_path: Path, document: object) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document))
    check(lambda: load_recipe(path))


@settings(max_examples=300, deadline=None)
@given(key=paths, value=st.text(max_size=20))
def test_any_override(key: str, value: str) -> None:
    check(lambda: load_recipe(None, [f"{key}={value}"]))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=60))
def test_any_text_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    check(lambda: load_recipe(path))


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from([o.key for o in recipe_options("certify", "finetune", "seed")]),
    value=documents,
)
def test_any_typed_value(key: str, value: object) -> None:
    check(lambda: load_recipe(None, [], {key: value}))
