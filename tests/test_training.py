"""dinv.training: the shared training loop and metrics."""
import pytest
import torch

from dinv import models
from dinv.datasets import load_digits
from dinv.training import accuracy, train_classifier


@pytest.fixture(scope="module")
def digits_test():
    return load_digits("test")


def test_shipped_teacher_reaches_97_percent(digits_test):
    teacher = models.load_digits_teacher()
    assert not teacher.training
    assert accuracy(teacher, *digits_test) >= 0.97


def test_train_classifier_teaches_the_student(digits_test):
    train_images, train_labels = load_digits("train")
    torch.manual_seed(0)
    student = models.create("digits_student")
    train_classifier(student, train_images, train_labels, epochs=2, seed=0)
    assert not student.training
    assert accuracy(student, *digits_test) >= 0.6
