"""Methods rayllm adds to every vLLM worker (`worker_extension_cls`), reached through
`LLM.collective_rpc`: they run inside the worker that holds the model, in-process at tensor
parallelism 1 and in each worker process with tp > 1, so weights received from the collective
channel go straight into the model without passing through the engine's front end (where
multiprocess RPC would turn tensors into lists)."""
from __future__ import annotations

import time


class RayllmWorkerExtension:
    def rayllm_load(self, state: dict, lora: dict | None, tied: bool) -> float:
        """Reload in place from a state dict (the object-store path)."""
        from rayllm.rollout.weights import prepare_state

        t = time.perf_counter()
        self.reload_weights(weights_iterator=iter(prepare_state(state, lora, tied).items()),
                            is_checkpoint_format=True)
        return time.perf_counter() - t

    def rayllm_open_channel(self, spec: dict, first_rank: int) -> int:
        """Join the weight channel as rank first_rank + this worker's tensor-parallel rank."""
        from rayllm.rollout.transport import Channel, ChannelSpec

        self.rayllm_close_channel()
        self._rayllm_channel = Channel(ChannelSpec(**spec), first_rank + self.rank)
        return first_rank + self.rank

    def rayllm_close_channel(self) -> None:
        if getattr(self, "_rayllm_channel", None) is not None:
            self._rayllm_channel.close()
        self._rayllm_channel = None

    def rayllm_receive(self, meta: list, lora: dict | None, tied: bool) -> float:
        """Receive every bucket broadcast by the policy's rank 0, then reload in place."""
        t = time.perf_counter()
        state = self._rayllm_channel.recv_all(meta)
        self.rayllm_load(state, lora, tied)
        return time.perf_counter() - t
