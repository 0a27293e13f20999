"""`langadapt worker --gpus K [--devices ...]`: the queue of K-GPU jobs and the worker's slice of the GPUs."""

from __future__ import annotations

import argparse
import os

import pytest

from langadapt.cli import service


@pytest.fixture
def exec_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda _exe, argv: calls.append(argv))
    monkeypatch.setenv("LANGADAPT_QUEUE_PREFIX", "t1:")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "unchanged")  # restored after the test
    return calls


def _queues(argv: list[str]) -> str:
    return argv[argv.index("-Q") + 1]


@pytest.mark.parametrize(("gpus", "queue"), [(None, "t1:gpu"), (1, "t1:gpu"), (2, "t1:gpu.2"), (8, "t1:gpu.8")])
def test_a_worker_takes_the_jobs_of_its_gpu_count(exec_calls, gpus, queue) -> None:
    service.worker(argparse.Namespace(queues="gpu", gpus=gpus, devices=None, beat=False))
    assert _queues(exec_calls[0]) == queue


def test_devices_set_the_workers_slice_of_the_gpus(exec_calls) -> None:
    service.worker(argparse.Namespace(queues="gpu,maintenance", gpus=2, devices="2,3", beat=False))
    assert _queues(exec_calls[0]) == "t1:gpu.2,t1:maintenance"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(SystemExit, match="lists 3 GPU"):
        service.worker(argparse.Namespace(queues="gpu", gpus=2, devices="0,1,2", beat=False))
