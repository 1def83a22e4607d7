"""Data sources draw with a generator on any device and index data on their own device (the
Dataset contract): a CUDA generator with data on the CPU, as in a GPU run of CPU-held arrays."""

from __future__ import annotations

import pytest
import torch
from _train_worker import CondOTObjective, TinyVelocity

from flowmatch.data import TOY_DATASETS, ArrayDataset
from flowmatch.training import TrainConfig, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_array_rows_drawn_on_a_cuda_generator_index_cpu_data():
    data = torch.arange(40.0).reshape(20, 2)  # on the CPU
    generator = torch.Generator("cuda").manual_seed(5)
    rows = ArrayDataset(data).sample(64, generator)
    assert rows.device.type == "cpu"
    expected = torch.randint(
        20, (64,), generator=torch.Generator("cuda").manual_seed(5), device="cuda"
    )
    torch.testing.assert_close(rows, data[expected.cpu()], rtol=0, atol=0)


@cuda
@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_sources_draw_on_the_generator_device(name):
    generator = torch.Generator("cuda").manual_seed(0)
    points = TOY_DATASETS[name]().sample(32, generator)
    assert points.device.type == "cuda" and points.shape == (32, 2)
    again = TOY_DATASETS[name]().sample(32, torch.Generator("cuda").manual_seed(0))
    torch.testing.assert_close(points, again, rtol=0, atol=0)


@cuda
def test_training_on_cuda_from_cpu_arrays(tmp_path):
    source = ArrayDataset(torch.randn(100, 2) + torch.tensor([2.0, -1.0]))
    config = TrainConfig(steps=3, batch_size=8, log_every=3, checkpoint_every=3, device="cuda")
    result = train(TinyVelocity(), CondOTObjective(), source, config, tmp_path)
    assert result.step == 3 and result.loss is not None
