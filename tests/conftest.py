"""Test tiers by folder: tests/unit (no Ray), tests/integration (Ray + DeepSpeed ranks),
tests/e2e (whole pipelines). Select with -m unit / -m integration / -m e2e."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from rayllm.env import apply_worker_env  # noqa: E402

apply_worker_env()

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        for tier in ("unit", "integration", "e2e"):
            if f"{os.sep}{tier}{os.sep}" in path:
                item.add_marker(getattr(pytest.mark, tier))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def init_local_ray(**kw) -> None:
    """The session's local Ray: 4 logical CPUs on 2 cores (see FACTS.md), capped object store;
    with `address`, a connection to a test cluster instead (ray.cluster_utils.Cluster)."""
    import ray

    from rayllm.env import remote_env

    if not kw:
        kw = dict(num_cpus=4, object_store_memory=384 * 1024**2, include_dashboard=False,
                  _metrics_export_port=METRICS_PORT)
    ray.init(runtime_env={"env_vars": remote_env()}, log_to_driver=False, **kw)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The session cluster's Prometheus endpoint (Ray's metrics agent), scraped by the Ray metrics test.
METRICS_PORT = _free_port()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session (init_local_ray). A module that needs a multi-node
    cluster of its own shuts this one down and starts it again when it is done."""
    import ray

    if not ray.is_initialized():
        init_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_path():
    from rayllm.models import tiny_model_path

    return tiny_model_path("tiny-1m")


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from rayllm.models import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture
def random_rows():
    """A deterministic global batch of 16 rows of 10-40 tokens, loss on all but the first 5."""
    import random

    def make(n=16, seed=0):
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            ids = [rng.randrange(10, 1000) for _ in range(rng.randint(10, 40))]
            rows.append({"input_ids": ids, "loss_mask": [0] * 5 + [1] * (len(ids) - 5)})
        return rows

    return make


def tensorboard_series(logdir) -> dict[str, list[tuple[int, float]]]:
    """The scalar series of a TensorBoard event directory, read back with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
