from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests share two cores: one intra-op thread each keeps them predictable."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def read_tensorboard(log_dir) -> tuple[dict[str, list[float]], dict[str, list[str]]]:
    """Scalars and texts of every event file under ``log_dir``, as a user would see them in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    texts: dict[str, list[str]] = {}
    for root, _, files in os.walk(log_dir):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        acc = EventAccumulator(root, size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
        for tag in acc.Tags()["tensors"]:
            for event in acc.Tensors(tag):
                if event.tensor_proto.string_val:
                    texts.setdefault(tag, []).extend(v.decode() for v in event.tensor_proto.string_val)
    return scalars, texts
