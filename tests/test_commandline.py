"""Issue 24: one error base class and one runner for every command line (ett_ds.commandline)."""
import pytest

from data_tools.errors import UsageError
from ett_ds.checkpoint import CheckpointError, ResumeError
from ett_ds.checkpoint.reshard import ReshardError
from ett_ds.commandline import UserError, run_cli
from ett_ds.config import ConfigError
from ett_ds.data.decode import DataErrorRateExceeded
from ett_ds.eval.ocr import OCRUnavailable
from ett_ds.evaluate import EvalError
from ett_ds.infer import CLIError


def test_every_user_facing_error_is_a_user_error_and_keeps_its_old_base():
    for cls in (ConfigError, CheckpointError, ResumeError, ReshardError, DataErrorRateExceeded, OCRUnavailable,
                EvalError, CLIError, UsageError):
        assert issubclass(cls, UserError), cls
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, RuntimeError)


def _raise(e):
    def main(argv):
        raise e
    return main


def test_a_user_error_is_one_line_exit_2_and_etts_debug_reraises(capsys, monkeypatch):
    monkeypatch.delenv("ETT_DEBUG", raising=False)
    assert run_cli(_raise(ConfigError("train.max_step: unknown key\nsecond line")), []) == 2
    assert capsys.readouterr().err == "error: train.max_step: unknown key\n"
    assert run_cli(_raise(FileNotFoundError("no such file: x")), [], hint=" (hint)") == 2
    assert capsys.readouterr().err == "error: no such file: x (hint)\n"
    closed = []
    assert run_cli(_raise(OSError("disk full")), [], also=(OSError,), on_error=closed.append) == 2
    assert len(closed) == 1 and capsys.readouterr().err == "error: disk full\n"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_cli(_raise(KeyError("x")), [])
    monkeypatch.setenv("ETT_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_cli(_raise(ConfigError("bad")), [])


def test_the_exit_code_of_main_is_returned_and_a_worker_error_is_its_last_line(capsys):
    assert run_cli(lambda argv: None, []) == 0 and run_cli(lambda argv: 1, []) == 1
    wrapped = DataErrorRateExceeded("Caught DataErrorRateExceeded in DataLoader worker process 0.\nTraceback ...\n"
                                    "ett_ds.data.decode.DataErrorRateExceeded: data error rate 0.9 > 0.1")
    assert run_cli(_raise(wrapped), []) == 2
    assert capsys.readouterr().err == "error: data error rate 0.9 > 0.1\n"
