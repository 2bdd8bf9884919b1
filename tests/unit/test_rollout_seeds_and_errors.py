"""Sampling streams (stream_seed) and how an engine's error is reported (rayllm.rollout.errors.cause)."""
import logging

from rayllm.rollout.errors import cause
from rayllm.rollout.sample import stream_seed


def test_stream_seed_differs_across_iterations_and_is_a_pure_function():
    seeds = {stream_seed(0, (0, it), i) for it in range(1, 41) for i in range(32)}
    assert len(seeds) == 40 * 32  # no two (iteration, prompt) slots share a stream
    assert stream_seed(0, (0, 5), 3) == stream_seed(0, (0, 5), 3)
    assert stream_seed(0, (0, 5), 3) != stream_seed(1, (0, 5), 3) != stream_seed(0, (1, 5), 3)
    assert all(0 <= s < 2**63 for s in seeds)
    assert stream_seed(-1, (), 0) == stream_seed(2**64 - 1, (), 0)  # negative seeds are fine


class _EngineCoreError(RuntimeError):
    pass


def test_cause_keeps_the_type_and_first_meaningful_lines_and_logs_the_rest(caplog):
    text = ("ValueError: model config.json is not a valid JSON file\n"
            "Traceback (most recent call last):\n"
            '  File "vllm/engine.py", line 10, in start\n'
            "    raise ValueError(...)\n"
            "    ^^^^^^^^^^^^^^^^^^^^^\n"
            "while parsing /models/x/config.json: line 1 column 2\n"
            "\n"
            "See root cause above.")
    with caplog.at_level(logging.ERROR, logger="rayllm.rollout"):
        out = cause(_EngineCoreError(text))
    assert out.startswith("_EngineCoreError: ValueError: model config.json is not a valid JSON file")
    assert "while parsing /models/x/config.json" in out and out.endswith("See root cause above.")
    assert "Traceback" not in out and "raise ValueError" not in out and "^^^" not in out
    assert text in caplog.text  # the whole text is in the log


def test_cause_of_a_ray_error_is_its_cause():
    class Wrapped(Exception):
        cause = KeyError("lm_head.weight")

    assert cause(Wrapped("ray wrapper text")) == "KeyError: 'lm_head.weight'"


class ActorDiedError(RuntimeError):
    pass


def test_cause_of_an_actor_start_up_error_shows_each_exception_and_the_final_one():
    """The shape of a real one (a config.json that is not JSON), Ray's tags and frames inside."""
    tag = "\x1b[36mray::RolloutEngine.__init__()\x1b[39m (pid=14847, ip=192.0.2.2, repr=<RolloutEngine object at 0x7f>)"
    text = (f"The actor died because of an error raised in its creation task, {tag}\n"
            '  File "json/decoder.py", line 353, in raw_decode\n'
            "    obj, end = self.scan_once(s, idx)\n"
            "json.decoder.JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2\n"
            "\n"
            "During handling of the above exception, another exception occurred:\n"
            f"\n{tag}\n"
            '  File "transformers/configuration_utils.py", line 700, in _get_config_dict\n'
            '    raise OSError(f"It looks like the config file at {file} is not a valid JSON file.")\n'
            "OSError: It looks like the config file at '/m/config.json' is not a valid JSON file.")
    out = cause(ActorDiedError(text))
    assert out == ("ActorDiedError: The actor died because of an error raised in its creation task | "
                   "json.decoder.JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 | "
                   "OSError: It looks like the config file at '/m/config.json' is not a valid JSON file.")
