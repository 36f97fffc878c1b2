"""One error hierarchy: every package error is a FlowRLError (and still the built-in error that
callers caught before), each name means one class wherever it is imported from, and the CLI
prints any of them as one line with exit code 2."""

import pytest

from flowrl_jax import cli, errors


def test_each_error_is_one_class_under_flowrl_error():
    from flowrl_jax.checkpoint import manager, safetensors_io
    from flowrl_jax.config import ConfigError
    from flowrl_jax.data import DataError
    from flowrl_jax.eval.judge import JudgeError
    from flowrl_jax.eval.records import EvalError
    from flowrl_jax.rewards import SandboxError
    from flowrl_jax.sampling.engine import SamplingError

    assert manager.CheckpointError is safetensors_io.CheckpointError is errors.CheckpointError
    pairs = [(ConfigError, ValueError), (DataError, ValueError), (SamplingError, ValueError),
             (errors.CheckpointError, ValueError), (errors.CheckpointError, RuntimeError),
             (EvalError, RuntimeError), (SandboxError, RuntimeError), (JudgeError, EvalError)]
    for cls, builtin in pairs:
        assert issubclass(cls, errors.FlowRLError) and issubclass(cls, builtin), cls
    assert ConfigError is errors.ConfigError and DataError is errors.DataError
    assert EvalError is errors.EvalError and SandboxError is errors.SandboxError


@pytest.mark.parametrize("cls", [errors.CheckpointError, errors.DataError, errors.SamplingError,
                                 errors.SandboxError, errors.EvalError])
def test_cli_prints_one_line_with_exit_code_2(cls, monkeypatch, capsys):
    def fail(args):
        raise cls("checkpoints/7/policy: tensor 'lm_head.weight' has shape (3, 4), expected (5, 4)")

    _, help_text = cli.COMMANDS["report"]
    monkeypatch.setitem(cli.COMMANDS, "report", (type("M", (), {
        "add_arguments": staticmethod(lambda p: None), "run": staticmethod(fail)}), help_text))
    assert cli.main(["report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flowrl-jax report: checkpoints/7/policy: tensor 'lm_head.weight' has shape "
                   "(3, 4), expected (5, 4)"]


def test_other_exceptions_are_not_swallowed(monkeypatch):
    def fail(args):
        raise KeyError("a bug, not bad input")

    _, help_text = cli.COMMANDS["report"]
    monkeypatch.setitem(cli.COMMANDS, "report", (type("M", (), {
        "add_arguments": staticmethod(lambda p: None), "run": staticmethod(fail)}), help_text))
    with pytest.raises(KeyError):
        cli.main(["report"])
