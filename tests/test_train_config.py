"""The training job's configuration (recipes, dotted overrides, validation) and its checkpoint
fall-back: fast, no Ray cluster, no MLflow."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipelines.config import (
    ConfigError,
    JobConfig,
    apply_overrides,
    flatten,
    from_dict,
    to_dict,
    validate,
)
from pipelines.job.checkpoints import restore_latest
from pipelines.job.checks import check_model
from pipelines.recipes import RECIPES, build_recipe
from pipelines.train import build_parser, config_from_args
from resnet_core.checkpoint import CheckpointError, save_checkpoint, training_state
from resnet_core.models import create_model
from resnet_core.optim import build_optimizer


def _validate(config: JobConfig) -> None:
    validate(config)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_validates_and_round_trips(name):
    config = build_recipe(name)
    assert config.recipe == name
    _validate(config)
    check_model(config)
    assert from_dict(JobConfig, to_dict(config)) == config


@pytest.mark.parametrize(
    ("recipe", "model"),
    [("cifar-paper", "resnet110"), ("cifar-paper", "plain20"), ("imagenet-paper", "plain34")],
)
def test_recipes_adapt_to_other_models_of_the_family(recipe, model):
    config = build_recipe(recipe, model)
    _validate(config)
    check_model(config)
    assert config.model.name == model


def test_cifar_paper_resnet110_warms_up_at_0_01_until_80_percent_error():
    # §4.2: "we use 0.01 to warm up the training until the training error is below 80%".
    schedule = build_recipe("cifar-paper", "resnet110").schedule
    assert (schedule.hold_lr, schedule.hold_until_train_error) == (0.01, 0.8)
    assert build_recipe("cifar-paper", "resnet56").schedule.hold_lr is None


def test_unknown_recipe_names_the_choices():
    with pytest.raises(ValueError, match="'nope' is unknown; use one of"):
        build_recipe("nope")


def test_overrides_parse_with_the_field_types():
    config = apply_overrides(
        build_recipe("demo"),
        [
            "optim.lr=0.05",
            "train.epochs=3",
            "optim.nesterov=yes",
            "train.compile=False",
            "schedule.milestones=(100, 200)",
            "schedule.milestone_epochs=[3]",
            "train.max_steps=500",
            "model.shortcut=B",
            "data.decode_concurrency=none",
            "run.name=my-run.1",
            "train.profile_steps=20,5",
            "train.system_metrics=off",
            "train.system_metrics_interval_s=0.5",
        ],
    )
    assert config.optim.lr == 0.05
    assert isinstance(config.optim.lr, float)
    assert config.train.epochs == 3
    assert isinstance(config.train.epochs, int)
    assert config.optim.nesterov is True
    assert config.train.compile is False
    assert config.schedule.milestones == (100, 200)
    assert config.schedule.milestone_epochs == (3,)
    assert config.train.max_steps == 500
    assert config.model.shortcut == "B"
    assert config.data.decode_concurrency is None
    assert config.run_name == "my-run.1"
    assert config.train.profile_steps == (20, 5)
    assert config.train.system_metrics is False
    assert config.train.system_metrics_interval_s == 0.5
    _validate(config)


def test_optional_values_go_back_to_none_and_tuples_to_empty():
    config = apply_overrides(
        build_recipe("cifar-paper"),
        ["train.max_steps=None", "schedule.milestones=()", "train.profile_steps="],
    )
    assert config.train.max_steps is None
    assert config.schedule.milestones == ()
    assert config.train.profile_steps == ()


def test_later_overrides_win():
    config = apply_overrides(build_recipe("demo"), ["optim.lr=0.2", "optim.lr=0.3"])
    assert config.optim.lr == 0.3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr", "is not section.key=value"),
        ("lr=0.1", "is not section.key=value"),
        ("optimizer.lr=0.1", "unknown section 'optimizer'"),
        ("recipe.x=1", "unknown section 'recipe'"),
        ("optim.learning_rate=0.1", "optim has no key 'learning_rate'"),
        ("train.epochs=three", "'three' is not a valid int"),
        ("train.epochs=2.5", "'2.5' is not a valid int"),
        ("optim.lr=nan", "'nan' is not a valid float"),
        ("optim.lr=inf", "'inf' is not a valid float"),
        ("optim.nesterov=maybe", "'maybe' is not a valid bool"),
        ("schedule.milestones=(1,x)", "'x' is not a valid int"),
        ("train.epochs=", "'' is not a valid int"),
    ],
)
def test_bad_overrides_give_one_line_naming_the_value(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        apply_overrides(build_recipe("demo"), [override])
    assert "\n" not in str(error.value)
    assert override.partition("=")[0] in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=resnet19"], "model.name='resnet19' is not a ResNet v1 model"),
        (["optim.lr=0"], "optim.lr=0.0 must be positive"),
        (["optim.lr=-0.1"], "optim.lr=-0.1 must be positive"),
        (["train.global_batch=0"], "train.global_batch=0 must be positive"),
        (["train.global_batch=-8"], "train.global_batch=-8 must be positive"),
        (
            ["train.global_batch=127"],
            "train.global_batch=127 is not divisible by scale.num_workers=2",
        ),
        (["scale.num_workers=0"], "scale.num_workers=0 must be at least 1"),
        (["train.epochs=0"], "train.epochs=0 must be positive"),
        (["train.log_every_steps=0"], "train.log_every_steps=0 must be >= 1"),
        (["train.checkpoint_every_steps=0"], "train.checkpoint_every_steps=0 must be >= 1"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints=0 must be >= 1"),
        (["train.precision=bf16"], "train.precision=bf16 needs scale.use_gpu=true"),
        (["train.precision=fp8"], "train.precision='fp8'"),
        (["data.augment=autoaugment"], "data.augment='autoaugment'"),
        (["data.eval_resize=30"], "data.eval_resize=30 must be >= the evaluation crop (32"),
        (["schedule.kind=linear"], "schedule.kind='linear'"),
        (["schedule.hold_lr=0.01"], "schedule.hold_lr and schedule.hold_until_train_error"),
        (["model.shortcut=D"], "model.shortcut='D'"),
        (["run.name=../escape"], "run name '../escape' may only use"),
        (["run.name=a b"], "run name 'a b' may only use"),
        (
            ["run.registered_model=team/resnet"],
            "run.registered_model='team/resnet' is not a valid MLflow model name",
        ),
        (["run.registered_model=a:b"], "Names cannot contain '/' or ':'"),
        (["run.experiment="], "run.experiment='' is not a valid MLflow experiment name"),
        (
            ["train.system_metrics_interval_s=0"],
            "train.system_metrics_interval_s=0.0 must be positive",
        ),
        (["train.profile_steps=5"], "train.profile_steps=(5,) must be two positive numbers"),
        (["train.profile_steps=0,3"], "train.profile_steps=(0, 3) must be two positive numbers"),
        (
            ["train.max_steps=10", "train.profile_steps=8,5"],
            "train.profile_steps=(8, 5) ends at step 12, after train.max_steps=10",
        ),
    ],
)
def test_validation_names_the_bad_value(overrides, message):
    config = apply_overrides(build_recipe("demo"), overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        _validate(config)
    assert "\n" not in str(e.value)


def test_model_options_that_do_not_fit_the_net_are_config_errors():
    config = apply_overrides(build_recipe("demo", "plain20"), ["model.shortcut=A"])
    _validate(config)  # the name and the option are each valid …
    with pytest.raises(ConfigError, match="plain20 has no shortcuts"):
        check_model(config)  # … together they are not


def test_flatten_gives_dotted_mlflow_param_names():
    flat = flatten(build_recipe("demo"))
    assert flat["optim.lr"] == build_recipe("demo").optim.lr
    assert flat["recipe"] == "demo"
    assert "model.name" in flat
    assert "scale.num_workers" in flat
    assert all(not dataclasses.is_dataclass(v) for v in flat.values())


def test_from_dict_rejects_unknown_keys():
    data = to_dict(build_recipe("demo"))
    data["optim"]["lr_per_256"] = 0.1
    with pytest.raises(ConfigError, match=r"unknown config keys for OptimConfig: \['lr_per_256'\]"):
        from_dict(JobConfig, data)


def test_command_line_flags_then_overrides():
    args = build_parser().parse_args(
        ["--recipe", "cifar-paper", "--model", "resnet56", "--workers", "4", "--epochs", "3",
         "--gpu", "--name", "r56", "train.epochs=5", "optim.lr=0.05"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.recipe == "cifar-paper"
    assert config.model.name == "resnet56"
    assert config.scale.num_workers == 4
    assert config.scale.use_gpu is True
    assert config.train.epochs == 5  # the override comes after the flag
    assert config.optim.lr == 0.05
    assert config.run_name == "r56"


def test_default_run_name_is_deterministic():
    assert build_recipe("demo").run_name == "demo-resnet8"
    assert build_recipe("cifar-paper", "resnet56").run_name == "cifar-paper-resnet56"


# ---------------------------------------------------------------------------------------------
# Checkpoint fall-back (restore_latest reads the run folder Ray Train writes)
# ---------------------------------------------------------------------------------------------


def _model_and_optimizer(fill: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = create_model("resnet8")
    with torch.no_grad():
        model.fc.weight.fill_(fill)
    return model, build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)


def _write_run(folder, steps: list[int]) -> dict[int, str]:
    """Checkpoints named like the job's, each with fc weights equal to its step."""
    names = {}
    for step in steps:
        model, optimizer = _model_and_optimizer(step)
        names[step] = f"checkpoint-{step:09d}-{step:08x}"
        state = training_state(
            model, optimizer, epoch=1, step=step, batches_in_epoch=step % 10, extra={}
        )
        save_checkpoint(folder / names[step], state)
    return names


def test_restore_takes_ray_s_latest_checkpoint(tmp_path):
    from ray.train import Checkpoint

    names = _write_run(tmp_path, [4, 8, 12, 16])
    model, optimizer = _model_and_optimizer(0)
    # Step 16 exists on disk but Ray never registered it (an upload cut short): not a candidate.
    restored = restore_latest(Checkpoint(str(tmp_path / names[12])), model, optimizer)
    assert restored["step"] == 12
    assert restored["batches_in_epoch"] == 2
    assert torch.all(model.fc.weight == 12)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from ray.train import Checkpoint

    names = _write_run(tmp_path, [4, 8, 12])
    (tmp_path / names[12] / "state.safetensors").write_bytes(b"cut short")
    model, optimizer = _model_and_optimizer(0)
    with pytest.warns(UserWarning, match=f"skipping checkpoint {names[12]}, trying the previous"):
        restored = restore_latest(Checkpoint(str(tmp_path / names[12])), model, optimizer)
    assert restored["step"] == 8
    assert torch.all(model.fc.weight == 8)


def test_no_usable_checkpoint_refuses_to_start_from_scratch(tmp_path):
    from ray.train import Checkpoint

    names = _write_run(tmp_path, [4, 8])
    for name in names.values():
        (tmp_path / name / "checkpoint.json").unlink()
    model, optimizer = _model_and_optimizer(0)
    with (
        pytest.warns(UserWarning, match="skipping checkpoint"),
        pytest.raises(CheckpointError, match="refusing to restart from scratch"),
    ):
        restore_latest(Checkpoint(str(tmp_path / names[8])), model, optimizer)
    assert torch.all(model.fc.weight == 0)  # untouched


# ---------------------------------------------------------------------------------------------
# The schedule a config builds (epochs become steps with the run's step plan)
# ---------------------------------------------------------------------------------------------


def test_schedule_from_the_config_converts_epochs_to_steps_and_scales_the_rate():
    from pipelines.job.parts import StepPlan, make_schedule

    config = apply_overrides(
        build_recipe("imagenet-fast"),
        [
            "schedule.kind=multistep",
            "schedule.milestones=(500,)",
            "schedule.milestone_epochs=(2,)",
            "schedule.warmup_epochs=0.5",
            "schedule.warmup_start_factor=0.01",
            "train.global_batch=512",
        ],
    )
    schedule = make_schedule(config, StepPlan(steps_per_epoch=100, total_steps=1000, epochs=10))
    assert schedule.base_lr == pytest.approx(0.2)  # 0.1 per 256 images, batch 512
    assert schedule.milestones == (200, 500)  # epoch 2 at 100 steps per epoch, sorted
    assert schedule.warmup_steps == 50
    assert schedule.lr(0) == pytest.approx(0.2 * 0.01)  # the warm-up's start
    assert schedule.total_steps == 1000


def test_one_trainer_builder_keeps_the_best_checkpoints_by_validation_top1():
    """Training and every Tune trial get their TorchTrainer from the same function: the best
    ``train.keep_checkpoints`` by validation top-1 (``checkpoint/score``) plus the latest."""
    from pipelines import tune
    from pipelines.job import trainer
    from pipelines.job.checkpoints import CHECKPOINT_SCORE

    config = apply_overrides(
        build_recipe("demo"), ["train.keep_checkpoints=2", "scale.max_failures=5"]
    )
    built = trainer.build_trainer(config)
    kept = built.run_config.checkpoint_config
    assert kept.num_to_keep == 2
    assert (kept.checkpoint_score_attribute, kept.checkpoint_score_order) == (
        CHECKPOINT_SCORE,
        "max",
    )
    assert built.run_config.failure_config.max_failures == 5
    assert built.run_config.name == config.run_name
    assert tune.build_trainer is trainer.build_trainer


def test_a_resumed_run_may_change_its_worker_count_but_nothing_it_computes(tmp_path, monkeypatch):
    """check_resumable against a real MLflow store holding the run's params: scale.* sizes may
    change (pipelines.config.RESUME_MAY_CHANGE), anything else is refused with the fix."""
    from mlflow.tracking import MlflowClient

    from pipelines import tracking
    from pipelines.config import ConfigError, flatten
    from pipelines.job.checks import check_resumable

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    config = build_recipe("demo")
    client = MlflowClient(tracking_uri=uri)
    experiment = tracking.ensure_experiment(client, config.run.experiment, uri)
    run_id, _ = tracking.find_or_create_run(client, experiment, config.run_name)
    tracking.log_params_once(client, run_id, flatten(config))
    wider = dataclasses.replace(
        config, scale=dataclasses.replace(config.scale, num_workers=4, cpus_per_worker=2.0)
    )
    check_resumable(wider)  # no error
    faster = dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=0.2))
    with pytest.raises(ConfigError, match=r"started with optim.lr=0.1 \(now 0.2\).*new --name"):
        check_resumable(faster)
