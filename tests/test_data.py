"""dinv.data: resumable, verified dataset export, and the replay pool."""
import json
import os

import pytest
import torch

import dinv
from dinv.data import ReplayPool, load_shards, synthesize_dataset

from .test_inverter import tiny_net


def test_dataset_export_resumes_without_loss_or_duplicates(tmp_path):
    net = tiny_net()
    inv = dinv.Inverter(net, image_shape=(3, 8, 8))
    common = dict(num_images=7, classes=[0, 1, 2], batch_size=3, iterations=3, seed=5)
    synthesize_dataset(inv, str(tmp_path / "full"), **common)

    def interrupt(batch, images, labels):
        if batch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize_dataset(inv, str(tmp_path / "resumed"), on_batch=interrupt, **common)
    with open(tmp_path / "resumed" / "manifest.json") as f:
        assert json.load(f)["completed"] == [0, 1]
    synthesize_dataset(inv, str(tmp_path / "resumed"), **common)
    full, resumed = load_shards(str(tmp_path / "full")), load_shards(str(tmp_path / "resumed"))
    assert torch.equal(full[0], resumed[0]) and torch.equal(full[1], resumed[1])
    assert full[1].tolist() == [0, 1, 2, 0, 1, 2, 0]
    pngs = sum(len(files) for _, _, files in os.walk(tmp_path / "resumed" / "images"))
    assert pngs == 7
    assert (tmp_path / "resumed" / "grid.png").exists()
    with pytest.raises(ValueError, match="another configuration"):
        synthesize_dataset(inv, str(tmp_path / "full"), **dict(common, seed=6))


def test_replay_pool_keeps_the_newest_and_round_trips():
    pool = ReplayPool(3)
    pool.add(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))
    pool.add(torch.ones(2, 1, 2, 2), torch.tensor([2, 3]))
    assert len(pool) == 3 and pool.synthesized == 4 and pool.labels.tolist() == [1, 2, 3]
    images, labels = pool.sample(2, torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 2, 2) and set(labels.tolist()) <= {1, 2, 3}
    again = ReplayPool(3, pool.state())
    assert torch.equal(again.images, pool.images) and again.synthesized == 4
    with pytest.raises(ValueError):
        ReplayPool(0)
