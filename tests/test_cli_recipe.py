"""A run without --config starts from the recipe of the objective it names, not from another method's YAML."""

from pathlib import Path

from diffalign.cli import objective_recipe
from diffalign.config import OnlineConfig, TrainConfig, parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRDP, DPO = CONFIGS / "sandbox_prdp.yaml", CONFIGS / "sandbox_dpo.yaml"


def test_objective_with_a_sandbox_recipe_starts_from_it():
    assert (
        objective_recipe(["--objective", "pso_online", "--seed", "1"], PRDP)
        == CONFIGS / "sandbox_pso_online.yaml"
    )
    assert objective_recipe(["--objective=ddpo"], PRDP) == CONFIGS / "sandbox_ddpo.yaml"
    assert objective_recipe(["--objective", "inpo"], DPO) == CONFIGS / "sandbox_inpo.yaml"


def test_no_objective_or_no_recipe_keeps_the_default():
    assert objective_recipe([], PRDP) == PRDP
    assert objective_recipe(["--objective", "prdp"], PRDP) == PRDP
    assert objective_recipe(["--objective", "dpo_hinge_made_up"], DPO) == DPO


def test_pso_online_without_config_gets_its_own_beta_not_prdps():
    recipe = objective_recipe(["--objective", "pso_online"], PRDP)
    pso = parse_config(OnlineConfig, ["--config", str(recipe), "--objective", "pso_online"])
    prdp = parse_config(OnlineConfig, ["--config", str(PRDP)])
    assert pso.beta == 50.0 and prdp.beta == 10.0
    inpo = parse_config(TrainConfig, ["--config", str(objective_recipe(["--objective", "inpo"], DPO))])
    assert inpo.objective == "inpo" and inpo.inversion_steps == 10


def test_a_recipe_of_the_other_loop_is_not_taken():
    """``train_online.py --objective dpo`` keeps PRDP's recipe, so its config error stays one line."""
    assert objective_recipe(["--objective", "dpo"], PRDP, "online") == PRDP
    assert objective_recipe(["--objective", "prdp"], DPO, "offline_pairs") == DPO
    assert (
        objective_recipe(["--objective", "pso_online"], PRDP, "online") == CONFIGS / "sandbox_pso_online.yaml"
    )
    assert objective_recipe(["--objective", "pso"], DPO, "offline_pairs") == CONFIGS / "sandbox_pso.yaml"
