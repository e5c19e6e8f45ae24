"""The command line: helpful one-line errors (exit code 2), --help everywhere, info."""
from __future__ import annotations

import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "polymae.pipelines.cli"]


def run(*args, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_misspelled_config_key_is_one_line_naming_the_key(tmp_path):
    result = run("pretrain", "trainer.max_stpes=3", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "trainer.max_stpes" in lines[0] and "did you mean 'trainer.max_steps'" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_steps=abc", "trainer.max_steps: expected an integer"),
    ("trainer.precision=fp8", "trainer.precision must be one of auto, bf16, fp32"),
    ("model.size=colossal", "model.size must be one of"),
    ("mask.name=checkers", "unknown masker 'checkers'"),
    ("modality_options.patch_size=3", "must be a multiple of patch_size 3"),
])
def test_bad_values_are_one_line_errors(tmp_path, override, expected):
    result = run("pretrain", override, "data.source=null", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_config_file_names_it(tmp_path):
    result = run("pretrain", "no/such/recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "no/such/recipe.yaml does not exist" in result.stderr


@pytest.mark.parametrize("command", ["pretrain", "shard", "probe", "reconstruct", "export", "info"])
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "usage: polymae" in result.stdout


def test_info_lists_what_is_registered():
    result = run("info")
    assert result.returncode == 0, result.stderr
    for expected in ("image", "random", "block", "red", "blue", "green", "purple", "pixel",
                     "image/mae_vit_digits.yaml", "digits"):
        assert expected in result.stdout


def test_exponent_without_a_dot_is_a_number():
    """YAML 1.1 reads `3e-4` as a string; a learning rate written that way must still work."""
    from polymae.shared.config import load_config

    assert load_config(None, ["trainer.lr=3e-4"]).trainer.lr == 3e-4
