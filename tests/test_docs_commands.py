"""Every ``bnlab ...`` command that README.md and docs/*.md show, in fenced code blocks and in
inline code, parses with the command line's own parser, so the docs cannot drift from the
flags. ``make train ARGS="..."`` counts as ``bnlab train ...``."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bnlab.cli import SUBCOMMANDS, build_parser
from bnlab.train import TrainConfig
from bnlab.train.config import config_overrides
from bnlab.train.loop import build_model

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"`([^`\n]+)`")
# a command inside a shell line: at its start, after ; && || | or `do`, or after a $ prompt,
# maybe behind environment assignments (BNLAB_THREADS=1 bnlab ...)
SHELL_COMMAND = re.compile(
    r"(?:^|[;&|]|\bdo\b|^\s*\$)\s*(?:\w+=\S*\s+)*((?:python -m )?bnlab\s[^;&|#]*)"
)
MAKE = re.compile(r"\bmake (train|bench|reproduce|report)\b(?: ARGS=\"([^\"]*)\")?")
# placeholders the docs use for values: a shell variable ($seed) and a count (N)
PLACEHOLDERS = {re.compile(r"^\$\{?\w+\}?$"): "1", re.compile(r"^N$"): "2"}


def shown_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``(where, argv after 'bnlab')`` for every command shown in ``path``."""
    found: list[tuple[int, str]] = []
    in_fence, pending = False, ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            in_fence, pending = not in_fence, ""
            continue
        if in_fence:
            line = pending + line
            if line.rstrip().endswith("\\"):  # a continued shell line
                pending = line.rstrip()[:-1] + " "
                continue
            pending = ""
            found += [(number, m.group(1)) for m in SHELL_COMMAND.finditer(line)]
            found += [
                (number, f"bnlab {m.group(1)} {m.group(2) or ''}") for m in MAKE.finditer(line)
            ]
        else:
            for m in INLINE.finditer(line):
                code = m.group(1)
                make = MAKE.fullmatch(code)
                if make:
                    found.append((number, f"bnlab {make.group(1)} {make.group(2) or ''}"))
                elif code.startswith(("bnlab ", "python -m bnlab ")):
                    found.append((number, code))
    commands = []
    for number, text in found:
        argv = shlex.split(text, comments=True)
        argv = argv[argv.index("bnlab") + 1 :]
        # prose such as `bnlab train: error: ...` or `bnlab → torch` is not a command
        if not argv or not re.fullmatch(r"[a-z][a-z-]*", argv[0]):
            continue
        for i, arg in enumerate(argv):
            for pattern, value in PLACEHOLDERS.items():
                if pattern.match(arg):
                    argv[i] = value
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        commands.append((f"{where}:{number}", argv))
    return commands


COMMANDS = [c for path in DOCS for c in shown_commands(path)]


def test_the_docs_show_commands_of_every_subcommand() -> None:
    shown = {argv[0] for _, argv in COMMANDS}
    assert {"train", "bench", "reproduce", "report"} <= shown, shown
    assert len(COMMANDS) > 30


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_command_in_the_docs_parses(
    where: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert argv[0] in SUBCOMMANDS, f"{where}: no subcommand {argv[0]!r}"
    try:
        args = build_parser([argv[0]]).parse_args(argv)
    except SystemExit as e:  # --help exits 0; a usage error exits 2 after printing why
        why = capsys.readouterr().err.strip().splitlines()[-1:]
        assert e.code == 0, f"{where}: bnlab {shlex.join(argv)}: {why}"
        return
    if argv[0] == "train" and args.resume is None:
        # the values too, not only the flags: the config and the model it describes
        build_model(TrainConfig(**config_overrides(args, TrainConfig)))


def test_the_extraction_finds_what_the_docs_show(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        'Run `bnlab train --epochs 2` or `make train ARGS="--lr 0.5"`; '
        "`bnlab train: error: ...` is output and `bnlab.train` a module.\n"
        "```bash\n"
        "for s in 0 1; do\n"
        "  bnlab train --seed $s \\\n"
        "    --out runs/s$s   # one run per seed\n"
        "done\n"
        "$ bnlab bench --quick && bnlab report --nproc N\n"
        "X=0 Y=a bnlab reproduce --quick\n"
        "```\n",
        encoding="utf-8",
    )
    argvs = [argv for _, argv in shown_commands(doc)]
    assert argvs == [
        ["train", "--epochs", "2"],
        ["train", "--lr", "0.5"],
        ["train", "--seed", "1", "--out", "runs/s$s"],
        ["bench", "--quick"],
        ["report", "--nproc", "2"],
        ["reproduce", "--quick"],
    ]
