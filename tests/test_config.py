"""The pretraining config file: variants, overrides, unknown keys and field comments."""

import importlib.util
import pathlib
import re

import ml_collections
import pytest

from vismae_jax import parallel
from vismae_jax.models import mae
from vismae_jax.train import optim

CONFIG_PATH = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pretrain.py"


def load_config_module():
    spec = importlib.util.spec_from_file_location("pretrain_config", CONFIG_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pretrain_config = load_config_module()


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(leaf_keys(value, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


@pytest.mark.parametrize("variant", pretrain_config.VARIANTS)
def test_variant_builds(variant):
    config = pretrain_config.get_config(variant)
    assert config.variant == variant

    model = mae.SwinMAE.from_config(config.model)
    mae.check_image_size(model.image_size, model.patch_size, len(model.depths))
    assert config.model.image_size % config.model.mask_unit == 0
    assert len(config.model.depths) == len(config.model.num_heads)

    parallel.validate_rules(config.mesh.param_rules)
    steps = optim.schedule_steps(config.train, corpus_size=2_486_425)
    assert steps.total_steps > 0
    assert steps.warmup_steps <= steps.total_steps


@pytest.mark.parametrize("variant", ["generic", "mr", "ct", "pet", "xray", "us"])
def test_paper_recipe(variant):
    config = pretrain_config.get_config(variant)
    assert config.train.global_batch_size == 5120
    assert config.train.num_epochs == 800
    assert config.train.warmup_epochs == 10
    assert (config.train.b1, config.train.b2) == (0.9, 0.95)
    assert config.train.weight_decay == 0.05
    assert config.train.learning_rate == 1e-4
    assert config.data.modality == ("all" if variant == "generic" else variant)


def test_override_parses_types():
    config = pretrain_config.get_config(
        "test,train.learning_rate=3e-4,model.depths=(2,2,6,2),mesh.fsdp=2"
    )
    assert config.train.learning_rate == 3e-4
    assert config.model.depths == (2, 2, 6, 2)
    assert config.mesh.fsdp == 2


def test_override_sharding_rules():
    config = pretrain_config.get_config("generic,mesh.param_rules=(('.*kernel','fsdp'),)")
    assert config.mesh.param_rules == ((".*kernel", "fsdp"),)


def test_unknown_key_rejected():
    with pytest.raises(KeyError, match="train.learning_rat"):
        pretrain_config.get_config("test,train.learning_rat=1e-3")


def test_unknown_variant_rejected():
    with pytest.raises(ValueError, match="Unknown config variant"):
        pretrain_config.get_config("imagenet")


def test_every_field_commented():
    source = CONFIG_PATH.read_text()
    config = pretrain_config.get_config("generic")
    for key in leaf_keys(config):
        section, _, name = key.rpartition(".")
        if section == "model":
            owner = "model"  # model_config() builds the model section under this name.
        elif section:
            owner = f"config.{section}"
        else:
            owner = "config"
        pattern = rf"^\s*{re.escape(owner)}\.{re.escape(name)} = .*#"
        assert re.search(pattern, source, flags=re.MULTILINE), f"{key} has no comment"


def test_variant_docstrings_give_command():
    for function in (pretrain_config.apply_demo, pretrain_config.apply_test):
        assert "python -m vismae_jax.pretrain" in function.__doc__, function.__name__
