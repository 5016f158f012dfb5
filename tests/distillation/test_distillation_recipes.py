"""The distillation recipes chained as a user runs them: teacher -> distilled student -> student checkpoint."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
import torch

from lightning_opt.cli import main
from lightning_opt.module import ImageClassifier

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "distillation"


def _test_overrides(recipe: Path) -> list[str]:
    for line in recipe.read_text().splitlines():
        if line.startswith("# Test:"):
            words = shlex.split(line[len("# Test:") :])
            # keep the shrinking overrides, drop the generic test's untrained-teacher stand-in
            return [w for w in words if ".teacher" not in w]
    raise AssertionError(f"{recipe} has no '# Test:' line")


_TEACHER_CKPT = Path("runs") / "distillation" / "teacher_digits" / "teacher.ckpt"


@pytest.fixture(scope="module")
def trained_teacher_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """teacher_digits.yaml run once through the CLI (shrunk); returns the teacher checkpoint it wrote."""
    workdir = tmp_path_factory.mktemp("teacher")
    recipe = RECIPES / "teacher_digits.yaml"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        main(["fit", "--config", str(recipe), *_test_overrides(recipe), "--trainer.enable_progress_bar=false"])
    return workdir / _TEACHER_CKPT


def _place_teacher(teacher_ckpt: Path, workdir: Path) -> Path:
    """Put the trained teacher where the distill recipes look for it, relative to ``workdir``."""
    target = workdir / _TEACHER_CKPT
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(teacher_ckpt, target)
    return target


def test_teacher_then_distill_recipe_writes_a_student_that_loads_alone(
    trained_teacher_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    teacher_ckpt = _place_teacher(trained_teacher_recipe, tmp_path)
    assert teacher_ckpt.is_file()

    distill_recipe = RECIPES / "distill_digits.yaml"
    main(
        [
            "fit",
            "--config",
            str(distill_recipe),
            *_test_overrides(distill_recipe),
            "--trainer.enable_progress_bar=false",
        ]
    )
    run_dir = tmp_path / "runs" / "distill_digits" / "version_0"
    # the student alone, loadable by its own class, with its own (CLI-recorded) hyperparameters
    student = ImageClassifier.load_from_checkpoint(run_dir / "student.ckpt")
    assert type(student.backbone).__name__ == "MLP"
    assert isinstance(student.configure_optimizers(), torch.optim.Adam)
    # the regular checkpoints hold no teacher weights and rebuild the teacher from its checkpoint
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(k.startswith("student.") for k in last["state_dict"])
    assert last["hyper_parameters"]["teacher_checkpoint"] == "runs/distillation/teacher_digits/teacher.ckpt"
    from lightning_opt.distillation import DistillationModule

    model = DistillationModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    teacher = ImageClassifier.load_from_checkpoint(teacher_ckpt)
    torch.testing.assert_close(model.teacher.state_dict(), teacher.state_dict())
    x = torch.randn(4, 1, 8, 8)
    student.eval()
    model.eval()
    torch.testing.assert_close(student(x), model(x))
    # student.yaml: the run's config with the student as the model, buildable without any teacher
    from lightning_opt.recipe import build_from_config

    cli = build_from_config(["--config", str(run_dir / "student.yaml")])
    assert type(cli.model) is ImageClassifier
    assert type(cli.datamodule).__name__ == "DigitsDataModule"
    assert not any(type(c).__name__ == "StudentCheckpoint" for c in cli.trainer.callbacks)
    cli.model.load_state_dict(torch.load(run_dir / "student.ckpt", weights_only=True)["state_dict"])


@pytest.mark.slow
def test_distill_prune_qat_recipe_acts_on_the_student_only(
    trained_teacher_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    teacher_ckpt = _place_teacher(trained_teacher_recipe, tmp_path)
    teacher_before = torch.load(teacher_ckpt, weights_only=False)["state_dict"]

    recipe = RECIPES / "distill_prune_qat_digits.yaml"
    main(["fit", "--config", str(recipe), *_test_overrides(recipe), "--trainer.enable_progress_bar=false"])
    run_dir = tmp_path / "runs" / "distill_prune_qat_digits" / "version_0"
    assert (run_dir / "int8.pt2").is_file(), "QAT converted the student to an int8 artifact"
    student_ckpt = torch.load(run_dir / "student.ckpt", weights_only=False)
    # the QAT record is re-rooted at the student, the pruned student is sparse
    assert [s["module"] for s in student_ckpt["lightning_opt_quantization"]["specs"]] == ["backbone"]
    weights = [v for k, v in student_ckpt["state_dict"].items() if k.endswith("weight") and v.ndim > 1]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros > 0.3, f"pruning should have zeroed the student's weights, sparsity {zeros:.2f}"
    # the teacher's checkpoint (and so the teacher) was left alone
    teacher_after = torch.load(teacher_ckpt, weights_only=False)["state_dict"]
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    # the student alone goes through `lightning-opt export` with its own config
    from lightning_opt.quantization.export import export_checkpoint

    figures = export_checkpoint(
        ["--config", str(run_dir / "student.yaml")],
        ckpt_path=str(run_dir / "student.ckpt"),
        format="pt2",
        quantize="int8",
        output=str(tmp_path / "student_int8.pt2"),
        latency=False,
        compile=False,
    )
    assert (tmp_path / "student_int8.pt2").is_file()
    assert "test/acc" in figures


def test_schedules_and_feature_layers_from_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_opt.recipe import build_from_config
    from lightning_opt.schedules import LinearSchedule

    schedule = '{"class_path": "lightning_opt.schedules.LinearSchedule", "init_args": {"initial": 8.0, "final": 2.0}}'
    cli = build_from_config(
        [
            "--config",
            str(RECIPES / "distill_digits.yaml"),
            "--model.init_args.teacher_checkpoint=null",
            "--model.init_args.teacher=lightning_opt.module.ImageClassifier",
            f"--model.init_args.temperature={schedule}",
            '--model.init_args.feature_layers={"backbone.net.1": "backbone.features.2"}',
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    model = cli.model
    assert isinstance(model.temperature, LinearSchedule)
    assert model.feature_loss is not None
    assert model.feature_loss.adapters["pair0"].mode == "linear"
    with pytest.raises(SystemExit):  # the CLI reports the model's ValueError and exits
        build_from_config(
            [
                "--config",
                str(RECIPES / "distill_digits.yaml"),
                "--model.init_args.teacher_checkpoint=null",
                "--model.init_args.teacher=lightning_opt.module.ImageClassifier",
                '--model.init_args.feature_layers={"backbone.nope": "backbone.features.2"}',
            ]
        )
    assert "student layer 'backbone.nope', which does not exist in ImageClassifier. Valid names: backbone" in (
        capsys.readouterr().err
    )


def test_transfer_recipes_teacher_sees_only_the_labelled_images_and_the_student_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_opt.recipe import build_from_config

    monkeypatch.chdir(tmp_path)
    teacher_recipe = RECIPES / "teacher_transfer_digits.yaml"
    distill_recipe = RECIPES / "distill_transfer_digits.yaml"
    teacher_data = build_from_config(["--config", str(teacher_recipe)]).datamodule
    untrained = [
        "--model.init_args.teacher_checkpoint=null",
        "--model.init_args.teacher=lightning_opt.module.ImageClassifier",
    ]
    distill_data = build_from_config(["--config", str(distill_recipe), *untrained]).datamodule
    for dm in (teacher_data, distill_data):
        dm.setup()
    y_teacher, y_student = teacher_data._splits["train"].tensors[1], distill_data._splits["train"].tensors[1]
    assert int((y_teacher != -1).sum()) == 200
    assert torch.equal(y_teacher, y_student), "the teacher must see exactly the student's labels"

    quiet = "--trainer.enable_progress_bar=false"
    main(["fit", "--config", str(teacher_recipe), *_test_overrides(teacher_recipe), quiet])
    assert (tmp_path / "runs" / "distillation" / "teacher_transfer_digits" / "teacher.ckpt").is_file()
    main(["fit", "--config", str(distill_recipe), *_test_overrides(distill_recipe), quiet])
    run_dir = tmp_path / "runs" / "distill_transfer_digits" / "version_0"
    student = ImageClassifier.load_from_checkpoint(run_dir / "student.ckpt")
    assert type(student.backbone).__name__ == "MLP"
