from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dmae_cli.config.recipe import Recipe, RecipeError, load_recipe, recipe_to_yaml

RECIPES = sorted(Path("recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_defaults_then_file_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "pretrain: {epochs: 7, sigma: 0.5}\n")
    recipe = load_recipe(path, ["pretrain.epochs=3", "finetune.sigma=[0.25, 0.5]"])
    assert recipe.pretrain.epochs == 3  # --set wins over the file
    assert recipe.pretrain.sigma == 0.5  # the file wins over the default
    assert recipe.pretrain.mask_ratio == 0.75  # the default
    assert recipe.finetune.sigma == (0.25, 0.5)
    assert recipe.name == "r"  # named after the file unless it says otherwise


def test_scalar_sigma_becomes_a_tuple(tmp_path: Path) -> None:
    assert load_recipe(write(tmp_path, "finetune: {sigma: 1.0}")).finetune.sigma == (1.0,)


def test_unknown_key_names_file_path_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "pretrain:\n  epoch: 3\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: unknown key 'pretrain.epoch'; did you mean 'epochs'?"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pretrain: {epochs: ten}", "pretrain.epochs: expected an integer, got 'ten'"),
        ("pretrain: {sigma: 0}", "pretrain.sigma: expected a number > 0 and <= 10, got 0.0"),
        ("pretrain: {sigma: -1}", "pretrain.sigma: expected a number > 0 and <= 10, got -1.0"),
        (
            "pretrain: {mask_ratio: 1.0}",
            "pretrain.mask_ratio: expected a number in [0.0, 1.0), got 1.0",
        ),
        ("pretrain: {norm_pix_loss: 1}", "pretrain.norm_pix_loss: expected true or false, got 1"),
        ("certify: {alpha: 1.5}", "certify.alpha: expected a number in (0.0, 1.0), got 1.5"),
        ("finetune: {sigma: [0.5, -1]}", "finetune.sigma: expected one or more numbers >= 0"),
        ("certify: {sigma: [0.5, 0]}", "certify.sigma: expected one or more numbers > 0"),
        ("precision: fp16", "precision: expected one of auto, bf16, fp32, got 'fp16'"),
        ("data: 3", "data: expected a mapping, got 3"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "pretrain:\n  epochs: [1, 2\nmodel: {}\n")
    with pytest.raises(RecipeError, match=r"r\.yaml \(line \d+\): malformed YAML"):
        load_recipe(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("item", ["pretrain.epochs", "=3", "pretrain..epochs=3"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        load_recipe(None, [item])


def test_override_of_a_scalar_as_section_fails() -> None:
    with pytest.raises(RecipeError, match="'seed' is not a section"):
        load_recipe(None, ["seed=1", "seed.x=2"])


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe("recipes/digits.yaml", ["finetune.sigma=[0.25, 0.5]"])
    path = write(tmp_path, recipe_to_yaml(recipe))
    assert load_recipe(path) == recipe
    assert yaml.safe_load(recipe_to_yaml(recipe))["finetune"]["sigma"] == [0.25, 0.5]


def test_stage_dir() -> None:
    assert load_recipe(None, ["name=x", "runs_dir=out"]).stage_dir("pretrain") == Path(
        "out/x/pretrain"
    )
    assert Recipe().stage_dir("certify") == Path("runs/run/certify")


def test_yaml_exponent_without_a_point_gets_a_hint() -> None:
    with pytest.raises(
        RecipeError, match=r"finetune.blr: expected a number \(in YAML write exponents"
    ):
        load_recipe(None, ["finetune.blr=4e-3"])
    assert load_recipe(None, ["finetune.blr=4.0e-3"]).finetune.blr == 4e-3


def test_non_finite_numbers_are_refused() -> None:
    for text in (".nan", ".inf", "-.inf"):
        with pytest.raises(RecipeError, match="pretrain.lr: expected a finite number"):
            load_recipe(None, [f"pretrain.lr={text}"])


def test_typed_values_come_last_and_are_checked_as_yaml_values(tmp_path: Path) -> None:
    path = write(tmp_path, "certify: {n: 5, n0: 4}\n")
    typed = {"certify.n": 7, "certify.alpha": 1e-05, "certify.sigma": [0.5, 0.25], "seed": 3}
    recipe = load_recipe(path, ["certify.n=6", "certify.n0=3"], typed)
    assert (recipe.certify.n, recipe.certify.n0) == (7, 3)  # typed > --set > file
    assert recipe.certify.alpha == 1e-05 and recipe.certify.sigma == (0.5, 0.25)
    assert recipe.seed == 3 and recipe.name == "r"
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [], {"certify.alpha": 1.5})
    assert str(err.value) == f"{path}: certify.alpha: expected a number in (0.0, 1.0), got 1.5"
    with pytest.raises(RecipeError, match=r"certify.n: expected an integer, got 2.5"):
        load_recipe(None, [], {"certify.n": 2.5})


def test_recipe_options_are_the_flagged_fields_in_declaration_order() -> None:
    from dmae_cli.config.recipe import recipe_options

    keys = [option.key for option in recipe_options("certify", "seed")]
    assert keys[:2] == ["certify.sigma", "certify.certifier"] and keys[-1] == "seed"
    assert "certify.radii" not in keys  # a field without a flag is set in the recipe only
    assert [o.flag.names for o in recipe_options("certify.n")] == [("--n", "-n")]
