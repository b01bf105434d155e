"""Every command's --help at an 80-column terminal: full option names and every default, brackets kept."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from xytune.cli import app


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer carries its own copy of click's classes)
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


COMMANDS = list(_commands(get_command(app)))


def test_every_command_is_checked():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"profile", "compare", "serve", "bench engines", "bench serve"} <= names


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_keeps_full_option_names_and_defaults_at_80_columns(path, command):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    text = " ".join(re.sub(r"-\n\s+", "-", result.output).split())  # wrapped text reads as one line again
    for param in command.params:
        if param.param_type_name != "option" or param.hidden:
            continue
        for opt in param.opts:
            assert opt in result.output.split() or f"{opt}," in result.output or f"{opt}/" in result.output, opt
        shown = param.default not in (None, False, (), "") and param.show_default is not False
        if shown and not param.is_flag:
            default = param.default if not isinstance(param.default, (list, tuple)) else ",".join(param.default)
            assert f"[default: {default}]" in text, (opt, default)
        if param.help and "[" in param.help:  # brackets written in a help text are printed, not eaten as markup
            assert " ".join(param.help.split()) in text, param.help


def test_the_ci_workflow_calls_only_commands_and_options_that_exist():
    """The example workflow is not run here (it needs GitHub); its xytune calls are checked against the CLI."""
    workflow = Path(__file__).parents[1] / ".github" / "workflows" / "cost-table-regression.yml"
    steps = yaml.safe_load(workflow.read_text())["jobs"]["compare"]["steps"]
    env = yaml.safe_load(workflow.read_text())["jobs"]["compare"]["env"]
    script = "\n".join(step.get("run", "") for step in steps).replace("\\\n", " ")
    script = script.replace("$PROFILE_ARGS", env["PROFILE_ARGS"])
    commands = dict(COMMANDS)
    calls = [shlex.split(line.split("xytune ", 1)[1]) for line in script.splitlines() if "bin/xytune " in line]
    assert {c[0] for c in calls} == {"profile", "compare", "retime"}
    for args in calls:
        command = commands[(args[0],)]
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        used = {a.split("=")[0] for a in args[1:] if a.startswith("-")} - {"--help"}
        assert used <= known, (args[0], used - known)
