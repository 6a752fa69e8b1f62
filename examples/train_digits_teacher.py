"""Recreates dinv/models/weights/digits_net.pt, the demo teacher that
dinv.models.load_digits_teacher() returns: DigitsNet trained on the digits training split with a
fixed seed (about 20 s on 2 otherwise idle CPU cores).

    python examples/train_digits_teacher.py [--out PATH]      # with dinv installed
    PYTHONPATH=. python examples/train_digits_teacher.py      # from a source checkout
"""
import argparse
import sys
import time

import torch

from dinv import models

SEED = 0
EPOCHS = 15
LR = 0.05
REQUIRED_TEST_ACCURACY = 0.97


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(models.DIGITS_TEACHER_WEIGHTS))
    args = parser.parse_args()

    train_images, train_labels = models.load_digits("train")
    test_images, test_labels = models.load_digits("test")
    torch.manual_seed(SEED)
    teacher = models.create("digits_net")
    start = time.perf_counter()
    models.train_classifier(teacher, train_images, train_labels, epochs=EPOCHS, lr=LR, seed=SEED)
    seconds = time.perf_counter() - start
    train_acc = models.accuracy(teacher, train_images, train_labels)
    test_acc = models.accuracy(teacher, test_images, test_labels)
    print(f"trained in {seconds:.1f} s: train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f}")
    # A teacher below the bar would silently weaken every demo and test built on it.
    if test_acc < REQUIRED_TEST_ACCURACY:
        sys.exit(f"test accuracy {test_acc:.4f} < {REQUIRED_TEST_ACCURACY}; not saving")
    torch.save(teacher.state_dict(), args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
