"""The ``bnlab`` command itself: one vocabulary of flags, lazy imports, clean errors for a bad
configuration (one line, exit 2, nothing written); none of these runs needs the dataset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import bnlab
from bnlab import cli
from bnlab.cli import SUBCOMMANDS, build_parser, load_subcommand, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"bnlab {bnlab.__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_help_and_version_import_no_torch(argv: list[str]) -> None:
    code = (
        "import sys\nfrom bnlab.cli import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "False"
    if argv == ["--help"]:
        for name, (_, summary) in SUBCOMMANDS.items():
            assert name in proc.stdout and summary.split()[0] in proc.stdout


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_each_summary_is_the_first_line_of_its_modules_docstring(name: str) -> None:
    doc = (load_subcommand(name).__doc__ or "").strip()
    first = doc.split("\n\n")[0].replace("\n", " ")
    assert first == SUBCOMMANDS[name][1]


def test_a_subcommand_that_fails_to_import_is_reported_not_dropped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli.SUBCOMMANDS, "bench", ("bnlab.cli.no_such_module", "broken"))
    assert main(["bench"]) == 1
    err = capsys.readouterr().err
    assert "the 'bench' command cannot be loaded" in err and "no_such_module" in err
    with pytest.raises(cli.SubcommandImportError, match="bench"):
        build_parser()  # the full parser (docs checks, --help of everything) fails too
    assert main(["train", "--batch-size", "1"]) == 2  # the other commands still work


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("train", ["--data-dir", "--threads", "--device", "--out"]),
        ("reproduce", ["--data-dir", "--threads", "--device", "--out"]),
        ("bench", ["--threads", "--device", "--out"]),
        ("report", ["--out"]),
    ],
)
def test_one_vocabulary_of_flags(command: str, flags: list[str]) -> None:
    sub = build_parser([command])._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    options = {s for action in sub._actions for s in action.option_strings}
    assert set(flags) <= options
    out = next(a for a in sub._actions if "--out" in a.option_strings)
    assert out.metavar == "DIR"  # a directory everywhere, never a file prefix


def test_reproduce_passes_data_dir_threads_and_device_to_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bnlab.lab as lab

    seen: list[object] = []

    def fake_reproduce(*args: object, **kwargs: object) -> dict[str, object]:
        import os

        seen.extend([os.environ.get("BNLAB_DATA_DIR"), kwargs["threads"], kwargs["device"]])
        raise ValueError("stop here")

    monkeypatch.setattr(lab, "reproduce", fake_reproduce)
    monkeypatch.setenv("BNLAB_DATA_DIR", "/elsewhere")
    args = ["reproduce", "--quick", "--data-dir", str(tmp_path), "--results", str(tmp_path)]
    assert main([*args, "--threads", "1", "--device", "cpu"]) == 2
    assert seen == [str(tmp_path), 1, "cpu"]
    assert main([*args, "--threads", "0"]) == 2 and len(seen) == 3  # refused before running


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("bnlab train: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--norm-option", "impl=typo"], ["impl", "'typo'", "'eager'", "'reference'"]),
        (["--norm", "btach"], ["'bnlab'", "'torch'", "'none'", "'group'", "Did you mean"]),
        (["--norm-option", "momentu=0.9"], ["['momentu']", "accepts:", "momentum", "eps"]),
        (["--norm", "torch", "--norm-option", "convention=d2l"], ["accepts:", "momentum"]),
    ],
)
def test_a_bad_configuration_is_one_line_exit_2_and_writes_nothing(
    args: list[str], expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *args, "--out", str(out), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert all(e in err for e in expected), err
    assert not out.exists()


def test_a_mistyped_data_dir_is_an_error_not_an_empty_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "fashoin-mnist"
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(typo), "--out", str(out), "--no-progress"]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert f"{typo} does not exist" in err and "mkdir -p" in err
    assert not typo.exists() and not out.exists()
