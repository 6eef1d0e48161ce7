"""Every config in conf/ and recipes/ composes into the schema; bad keys and impossible placements fail
with messages that name them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from colocate.config import ROOT, Config, ConfigError, check, check_keys, check_values, register

register()
GROUPS = {p.name: sorted(x.stem for x in p.glob("*.yaml")) for p in (ROOT / "conf").iterdir() if p.is_dir()}
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def _compose(overrides: list[str]) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(recipe):
    cfg = _compose([f"+recipe={recipe}"])
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    assert isinstance(_compose([f"{group}={option}"]), Config)


def test_every_yaml_opens_with_its_command():
    for path in [*(ROOT / "conf").rglob("*.yaml"), *(ROOT / "recipes").glob("*.yaml")]:
        first = Path(path).read_text().splitlines()[0]
        assert first.startswith("# python -m colocate.run"), path


def test_misspelt_key_is_an_error_naming_it():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        _compose(["+recipe=grpo", "policy.learning_rate=1e-4"])
    assert "learning_rate" in str(info.value) or "learning_rate" in str(info.value.__cause__)


@pytest.mark.parametrize("override, key", [
    ("+policy.learning_rate=1e-4", "policy.learning_rate"),
    ("+generation.chat=true", "generation.chat"),  # chat lives in data (data.chat)
    ("+data.task=arithmetic", "data.task"),  # removed: never read
    ("+algorithm.name=grpo", "algorithm.name"),
    ("+data.jsonl=x.jsonl", "data.jsonl"),  # superseded by data.path
    ("+nonsense=1", "nonsense"),
])
def test_added_unknown_key_is_an_error_naming_it(override, key):
    """Hydra's `+` adds a key even to a struct config; the schema check refuses it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        dcfg = compose(config_name="config", overrides=["+recipe=grpo", override])
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'") as info:
        check_keys(dcfg)
    assert info.value.subject == key


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_has_only_known_keys(recipe):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        check_keys(compose(config_name="config", overrides=[f"+recipe={recipe}"], return_hydra_config=True))


@pytest.mark.parametrize("override, key", [
    ("placement.mode=bogus", "placement.mode"),
    ("refit.buffer_size_mb=-5", "refit.buffer_size_mb"),
    ("refit.timeout_s=0", "refit.timeout_s"),
    ("algorithm.prompts_per_step=0", "algorithm.prompts_per_step"),
    ("algorithm.max_new_tokens=64", "algorithm.max_new_tokens"),  # no room for a prompt in max_model_len=64
    ("policy.param_dtype=fp8", "policy.param_dtype"),
    ("policy.loss_agg=sum", "policy.loss_agg"),
    ("generation.engine=fast", "generation.engine"),
    ("data.chat=maybe", "data.chat"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("reward.timeout_s=-1", "reward.timeout_s"),
    ("logging.output_dir=relative/dir", "logging.output_dir"),
])
def test_bad_value_is_an_error_naming_its_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: ") as info:
        check_values(_compose(["+recipe=grpo", override]))
    assert info.value.subject == key


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        _compose(["+recipe=grpo", "algorithm.steps=many"])
    text = str(info.value) + str(info.value.__cause__)
    assert "steps" in text


@pytest.mark.parametrize("overrides, gpus, match", [
    (["placement.device=cuda", "placement.policy_workers=4"], 2, "needs 4 GPUs"),
    (["placement=split", "placement.device=cuda"], 1, "needs 2 GPUs"),
    (["placement.mode=sideways"], 0, "placement.mode"),
    (["placement=split", "refit.transport=zmq"], 0, "needs placement 'colocated'"),
    (["generation.sleep_level=3"], 0, "generation.sleep_level"),
])
def test_impossible_placement_fails_before_any_actor(overrides, gpus, match):
    cfg = _compose(["+recipe=grpo", *overrides])
    with pytest.raises(ConfigError, match=match):
        check(cfg, cluster_devices=gpus)


@pytest.mark.parametrize("mode, transport", [("colocated", "zmq"), ("split", "broadcast")])
def test_transport_follows_placement(mode, transport):
    assert check(_compose([f"placement={mode}"]), cluster_devices=0) == transport
