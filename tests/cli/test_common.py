"""dinv.cli.common: presets, flags and overrides, the teacher options, one-line errors."""
import torch

from dinv import cli, models
from dinv.cli.common import inverter_from_args, teacher_from_args
from dinv.presets import CIFAR10

from ._run import dinv, one_line_error


def test_cifar_architectures_get_the_cifar_preset_and_overrides_win(tmp_path):
    weights = str(tmp_path / "rn18.pt")
    torch.save(models.create("resnet18_cifar").state_dict(), weights)
    args = cli.build_parser().parse_args(
        ["invert", "--teacher", weights, "--arch", "resnet18_cifar", "--lr", "0.05",
         "--num-images", "4", "--out", str(tmp_path / "out")])
    teacher = teacher_from_args(args)
    inverter, iterations = inverter_from_args(args, teacher, adi_scale=2.0)
    assert inverter.image_shape == (3, 32, 32) and iterations == CIFAR10["iterations"]
    assert inverter.setting_id == 2 and inverter.mean == CIFAR10["mean"]
    assert inverter.coefficients.r_feature == CIFAR10["r_feature"]
    assert inverter.coefficients.lr == 0.05 and inverter.coefficients.adi_scale == 2.0


def test_usage_errors_are_one_line_with_status_2(tmp_path):
    out = tmp_path / "out"
    one_line_error(dinv("invert", "--teacher", "digits", "--num-images", "0", "--out", out), 2,
                   "--num-images", ">= 1")
    one_line_error(dinv("invert", "--teacher", "digits", "--num-images", "4", "--out", out,
                        "--std", "0"), 2, "std")
    one_line_error(dinv("invert", "--teacher", "digits", "--num-images", "4", "--out", out,
                        "--lr", "inf"), 2, "--lr")
    one_line_error(dinv("invert", "--teacher", "digits", "--num-images", "4", "--out", out,
                        "--classes", "3,12"), 2, "--classes")
    one_line_error(dinv("frobnicate"), 2, "invalid choice")
    assert not out.exists()  # nothing was done
