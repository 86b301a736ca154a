"""The command line: lazy dispatch, one-line errors, --debug tracebacks."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from hcformer import cli
from hcformer.errors import DataError


@pytest.fixture
def fake_command(monkeypatch):
    module = types.ModuleType("hcformer_fake_command")

    def main(argv):
        if argv == ["fail"]:
            raise DataError("datasets/x.json: missing key 'annotations'")
        print("ran", *argv)
        return 0

    module.main = main
    monkeypatch.setitem(sys.modules, "hcformer_fake_command", module)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("hcformer_fake_command", "a test command"))
    return module


def test_dispatches_to_the_commands_main(fake_command, capsys):
    assert cli.main(["fake", "a", "b"]) == 0
    assert capsys.readouterr().out.strip() == "ran a b"


def test_user_error_is_one_line_and_exit_2(fake_command, capsys):
    assert cli.main(["fake", "fail"]) == 2
    err = capsys.readouterr().err
    assert err == "hcformer fake: error: datasets/x.json: missing key 'annotations'\n"


def test_debug_shows_the_traceback(fake_command):
    with pytest.raises(DataError):
        cli.main(["fake", "fail", "--debug"])


def test_unknown_command_suggests(capsys):
    assert cli.main(["experimnts"]) == 2
    assert "did you mean 'experiments'" in capsys.readouterr().err


def test_every_command_module_exists_and_has_main():
    import importlib.util

    for name, (module, _) in cli.COMMANDS.items():
        assert importlib.util.find_spec(module) is not None, f"{name}: module {module} is missing"


def test_help_lists_commands_without_importing_torch():
    code = (
        "import sys; from hcformer import cli; cli.main(['--help']); "
        "assert 'torch' not in sys.modules, 'cli imported torch'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "synth-data" in out.stdout and "profile" in out.stdout


def test_commands_that_need_no_model_import_no_torch():
    """The data, evaluation, budget, drawing, listing and status commands start without torch
    (or matplotlib, which visualize imports only when it draws)."""
    light = [
        "experiments",
        "status",
        "synth_data",
        "prepare_data",
        "check_data",
        "fetch_weights",
        "evaluate_panoptic",
        "evaluate_instance",
        "evaluate_semantic",
        "visualize",
        "budget",
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {light!r}:\n"
        "    assert callable(importlib.import_module('hcformer.commands.' + name).main), name\n"
        "heavy = sorted(m for m in ('torch', 'matplotlib', 'mlflow', 'timm') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_write_output_makes_the_folder_and_leaves_no_temporary_file(tmp_path):
    from hcformer.commands._args import write_output

    out = write_output(tmp_path / "a" / "b" / "x.json", '{"pq": 1}')
    assert out == tmp_path / "a" / "b" / "x.json" and out.read_text() == '{"pq": 1}'
    write_output(out, "second")
    assert out.read_text() == "second"
    assert [p.name for p in out.parent.iterdir()] == ["x.json"]
