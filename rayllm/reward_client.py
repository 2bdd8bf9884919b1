"""The PPO stage's reward from a served reward model (`rayllm serve --reward`, rayllm/serve.py):
`reward_url` in place of a reward group, so scoring scales on its own replicas.

Rows go as token ids, so the server scores exactly the tokens the policy sampled (no decode and
re-encode). Each request has a deadline and is retried on a connection error or a 5xx; a 4xx
(a bad request) is not retried. An error names the URL and what the server said.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor


class RewardServerError(RuntimeError):
    pass


class RemoteReward:
    def __init__(self, url: str, timeout_s: float = 120.0, retries: int = 3, batch_rows: int = 1024):
        self.url, self.timeout_s, self.retries, self.batch_rows = url.rstrip("/"), timeout_s, retries, batch_rows
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayllm-reward")

    def _post(self, payload: dict) -> list[float]:
        data = json.dumps(payload).encode()
        last = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    return [float(x) for x in json.loads(r.read())["scores"]]
            except urllib.error.HTTPError as e:
                reason = e.read().decode(errors="replace")[:500]
                if e.code < 500:
                    raise RewardServerError(f"reward server {self.url} refused the request (HTTP {e.code}): {reason}") from None
                last = f"HTTP {e.code}: {reason}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            time.sleep(min(2.0 ** attempt, 10.0))
        raise RewardServerError(f"reward server {self.url} did not answer after {self.retries + 1} tries "
                                f"(deadline {self.timeout_s:.0f} s each): {last}")

    def scores(self, rows: list[dict]) -> list[float]:
        out = []
        for i in range(0, len(rows), self.batch_rows):
            chunk = [list(map(int, r["input_ids"])) for r in rows[i:i + self.batch_rows]]
            got = self._post({"input_ids": chunk})
            if len(got) != len(chunk):
                raise RewardServerError(f"reward server {self.url} sent {len(got)} scores for {len(chunk)} rows")
            out += got
        return out

    def scores_async(self, rows: list[dict]) -> Future:
        """Like a reward group's: `.result()` gives the scores (the request runs beside the other forwards)."""
        return self._pool.submit(self.scores, rows)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
