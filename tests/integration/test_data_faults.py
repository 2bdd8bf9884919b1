"""`rayllm data prepare` with a Ray Data worker process SIGKILLed mid-job (from outside it): Ray Data
retries the lost task, and the output is the one a fault-free run writes (docs/elasticity.md)."""
import json
import random
import signal
import threading
import time

import psutil
import pytest

from rayllm.config import DataPrepConfig
from rayllm.data.prepare import prepare

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _corpus(path, n=400, seed=0):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(80, 200)))})
                            + "\n" for _ in range(n)))


def _rows(out):
    import pyarrow.parquet as pq

    t = pq.read_table(out / "packed").to_pydict()
    return sorted(map(tuple, t["input_ids"]))


# Process titles of workers running a Ray Data operator's task (ray::<operator>), as seen during
# prepare; Ray's own actors (_StatsActor, the autoscaling coordinator, agents) are not among them.
_OPERATORS = ("ray::MapBatches", "ray::FlatMap", "ray::Filter", "ray::HashShuffle", "ray::SortShuffle",
              "ray::ReadBinary", "ray::Project")


def _data_workers():
    """Ray worker processes running a Ray Data operator's task right now."""
    return [p for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []).startswith(_OPERATORS)]


@pytest.mark.slow  # two prepare runs: ~100 s on 2 cores
def test_a_ray_data_worker_killed_mid_prepare_is_retried_and_the_output_equals_the_fault_free_run(tmp_path):
    _corpus(tmp_path / "corpus.jsonl")
    cfg = lambda out: DataPrepConfig(sources=[str(tmp_path / "corpus.jsonl")], seq_len=256,  # noqa: E731
                                     output=str(tmp_path / out), shuffle_partitions=4)
    clean = prepare(cfg("clean"), progress=False)
    killed, stop = [], threading.Event()

    def killer():  # SIGKILL the first Ray Data worker seen busy, once
        while not stop.is_set() and not killed:
            for p in _data_workers():
                try:
                    title = " ".join(p.cmdline())
                    p.send_signal(signal.SIGKILL)
                    killed.append(title)
                except psutil.Error:
                    continue
                break
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        faulty = prepare(cfg("faulty"), progress=False)
    finally:
        stop.set()
        t.join(5)
    assert killed, "no Ray Data worker was seen running"
    keys = ("records_in", "kept", "exact_duplicate", "near_duplicate", "rows")
    assert {k: faulty[k] for k in keys} == {k: clean[k] for k in keys}
    assert _rows(tmp_path / "faulty") == _rows(tmp_path / "clean")
