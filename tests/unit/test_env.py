"""What the driver sends to Ray workers, and what each worker decides for itself."""
from rayllm.env import remote_env, worker_env


def test_the_driver_never_sends_its_accelerator_choice_or_cache_path_to_workers(monkeypatch):
    # A driver on a GPU-less head decides DS_ACCELERATOR=cpu for itself; a GPU rank must decide its own.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    sent = remote_env()
    assert "DS_ACCELERATOR" not in sent and "TORCH_EXTENSIONS_DIR" not in sent
    assert sent["HF_HUB_OFFLINE"] == "1" and sent["OMP_NUM_THREADS"] == worker_env()["OMP_NUM_THREADS"]
