from rayllm.redact import MASK, is_secret_name, redact, redact_text


def test_secret_looking_names_and_ordinary_ones():
    for name in ("token", "hf_token", "HF_TOKEN", "RAY_AUTH_TOKEN", "WANDB_API_KEY", "api_key", "apikey", "ApiKey",
                 "AWS_SECRET_ACCESS_KEY", "client_secret", "clientSecret", "db-password", "Authorization",
                 "credentials", "aws_credential", "private_key", "privateKey"):
        assert is_secret_name(name), name
    for name in ("tokenizer", "max_tokens", "tokens_per_s", "TOKENIZERS_PARALLELISM", "RAY_AUTH_MODE", "key",
                 "monkey", "keyboard", "model", "path", "SSH_AUTH_SOCK"):
        assert not is_secret_name(name), name


def test_values_under_secret_keys_are_hidden_at_any_depth_and_numbers_kept():
    cfg = {"logging": {"wandb": {"api_key": "abc", "project": "rayllm"}},
           "stages": [{"model": {"path": "/m", "tokenizer": "/m/tok", "hf_token": "hf_x"}, "eos_token_id": 2,
                       "sampling": {"max_tokens": 8}, "credentials": {"user": "u", "pass": "p"}, "secret": None}]}
    out = redact(cfg, environ={})
    assert out["logging"]["wandb"] == {"api_key": MASK, "project": "rayllm"}
    st = out["stages"][0]
    assert st["model"] == {"path": "/m", "tokenizer": "/m/tok", "hf_token": MASK}
    assert st["eos_token_id"] == 2 and st["sampling"] == {"max_tokens": 8}  # numbers are not secrets
    assert st["credentials"] == MASK and st["secret"] is None
    assert cfg["logging"]["wandb"]["api_key"] == "abc"  # a copy: the input is unchanged


def test_values_of_secret_environment_variables_are_hidden_wherever_they_appear():
    env = {"WANDB_API_KEY": "plainword-1234", "HF_TOKEN": "notsolongpw12", "RAY_AUTH_MODE": "disabled",
           "AWS_SECRET_ACCESS_KEY": "shortish", "PATH": "/usr/bin"}
    obj = {"error": "login with plainword-1234 failed", "dir": "/x/notsolongpw12/y", "mode": "disabled",
           "nested": ["see shortish", "/usr/bin/python"]}
    assert redact(obj, environ=env) == {"error": f"login with {MASK} failed", "dir": f"/x/{MASK}/y",
                                        "mode": "disabled", "nested": [f"see {MASK}", "/usr/bin/python"]}
    assert redact("abcde", environ={"HF_TOKEN": "abcde"}) == "abcde"  # too short to be told from text


def test_tokens_inside_text():
    cases = {
        "GET failed: Authorization: Bearer abcdef123456.xyz": "Bearer ***",
        "curl -u x:y https://bob:hunter2@mlflow.example.com/api": "https://bob:***@mlflow.example.com/api",
        "token=abc123&x=1": "token=***&x=1",
        'password: "s3cr3t"': 'password: "***"',
        "set api_key=qq to log": "api_key=*** to log",
        "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345 leaked": "*** leaked",
        "ghp_0123456789abcdefghijABCDEFGHIJ0123 leaked": "*** leaked",
        "key sk-proj-0123456789abcdefghijklmn": "key ***",
        "AKIAIOSFODNN7EXAMPLE": "***",
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U": "jwt ***",
        "wandb 0123456789abcdef0123456789abcdef01234567": "wandb ***",  # a W&B key: 40 hex digits
        "random Xq7RbT2mLp9KvW4zN8cJ3hY6fD1sG5aE0uQ": "random ***",
    }
    for text, want in cases.items():
        got = redact_text(text, [])
        assert want in got and MASK in got, (text, got)
    for ordinary in ("/tmp/pytest-of-root/pytest-12/test_html_report0/run/sft/model",
                     "/work/main/.cache/torch_extensions/py311_cpu/cpu_adam/cpu_adam.so",
                     "ZeRO-2 policy rank_shares_0 tokens_per_s ground_truth_sampled_final max_tokens=8",
                     "RAYLLM_ELASTIC_ROLLOUT_CALL_TIMEOUT_S_FOR_TESTS_ONLY",
                     "actor_id: 2f8b5c1e7a3d4f6b9c0e1a2b3c4d5e6f",  # Ray's 32-digit ids stay
                     "config_hash 3f2a9c0d1e4b5a67"):
        assert redact_text(ordinary, []) == ordinary
