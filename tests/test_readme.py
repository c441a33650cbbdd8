"""The README's commands are the ones CI runs."""

import re

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.DOTALL)


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_main_command_installs_pinned_torch():
    main = readme_commands()[0]
    assert "requirements.txt" in main and "train.py" in main
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text()


# -----------------------------------------------------------------------------
# README is the front door: short, current, no run diary

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import teacher  # noqa: E402
import train  # noqa: E402

PARSERS = {"train.py": train.parser, "evaluate.py": evaluate.parser, "teacher.py": teacher.parser}


def options(parser):
    """A parser's flags, its subcommands' included."""
    subs = [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    return {s for a in parser._actions for s in a.option_strings} | set().union(*map(options, subs)) | \
        {f"--no-{s[2:]}" for a in parser._actions if isinstance(a, argparse.BooleanOptionalAction) for s in a.option_strings}


def test_readme_is_short_and_holds_no_commit_hash():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", w) and re.search(r"\d", w)]
    assert hashes == []


def test_every_flag_readme_names_exists_in_that_commands_help():
    text = (ROOT / "README.md").read_text()
    for command, flags in re.findall(r"^\| `(\w+\.py)` \| (.*) \|$", text, re.MULTILINE):
        if command in PARSERS:
            named = set(re.findall(r"--[a-z][a-z-]*", flags))
            assert named and named <= options(PARSERS[command]()), (command, named - options(PARSERS[command]()))
    served = subprocess.run([sys.executable, "experiments/llama_server.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True).stdout
    known = set().union(*(options(p()) for p in PARSERS.values())) | options(data.parser()) | \
        set(re.findall(r"--[a-z][a-z-]*", served))
    ours = [line for line in text.splitlines() if not line.lstrip().startswith(("pip ", "vllm "))]
    named = {f for line in ours for f in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line)}
    assert named - known == set()


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_flag_states_its_default(command):
    """Each option's help says what it does and, unless it is an on/off switch, its default (or that it is required)."""
    missing = []
    for a in PARSERS[command]()._actions:
        if not a.option_strings or a.dest == "help":
            continue
        switch = isinstance(a, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
        text = (a.help or "").lower()
        if not text or not (switch or "default" in text or "required" in text or a.required):
            missing.append(a.option_strings[-1])
    assert missing == []
