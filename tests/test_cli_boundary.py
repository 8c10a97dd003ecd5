"""The CLI's boundary: what a user types (options, --param values, settings in the
environment, files) and what the data holds (text printed on a terminal, results of any size)
ends in one line on stderr, never a traceback, and no output is unbounded.

Numeric options are found by walking the click command tree, so an option added later is
fed the same bad values without anyone listing it here.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import click
import forkrun
import pytest

from pipeline.cli import cli, main
from pipeline.cli.bounds import BOUNDED_TYPES
from pipeline.settings import Settings

NUMERIC = (click.types.IntParamType, click.types.FloatParamType)
# Zero is a value these options mean: a fixed seed, greedy sampling, a cosine floor of 0.
ZERO_OK = {("generate", "--seed"), ("generate", "--temperature"), ("similar", "--min-score")}
# What a command needs before its options are read: a file that exists, a worker kind.
REQUIRED = {"run": ["FILE"], "submit": ["FILE"], "train": ["FILE"], "worker": ["gpu"]}


def _numeric_options() -> list[tuple[str, click.Parameter]]:
    found = []
    for name, command in sorted(cli.commands.items()):
        for param in command.params:
            if isinstance(param.type, NUMERIC):
                found.append((name, param))
    return found


OPTIONS = _numeric_options()


def _bad_values(param: click.Parameter) -> list[str]:
    values = ["-5", "0", str(10**30), "abc"]
    if isinstance(param.type, click.types.FloatParamType):
        values += ["nan", "inf", "-inf", "1e308"]
    return values


CASES = [pytest.param(name, param.opts[0], value, id=f"{name}{param.opts[0]}={value}")
         for name, param in OPTIONS for value in _bad_values(param)]


@pytest.fixture
def state(tmp_path, monkeypatch):
    """An empty state dir of the test's own, and no server in the environment."""
    for name in ("NEO4J_URI", "MOE_NEO4J_URI", "DATABASE_URL", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MOE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``main(argv)`` as the installed command runs it: (exit status, stdout, stderr). An
    exception that escapes main is a traceback a user would see, and fails the test."""
    with pytest.raises(SystemExit) as ended:
        main(argv)
    out, err = capsys.readouterr()
    return ended.value.code, out, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: "), err
    return lines[0]


def test_the_walk_finds_every_numeric_option():
    found = {(name, p.opts[0]) for name, p in OPTIONS}
    # A few that must be there; the walk itself is what keeps new ones from escaping.
    assert {("similar", "--k"), ("similar", "--timeout"), ("similar", "--min-score"),
            ("worker", "--concurrency"), ("train", "--num-constellations"),
            ("train", "--epochs"), ("run", "--batch-size"), ("query", "--limit")} <= found
    assert len(found) >= 20, found


@pytest.mark.parametrize("name, param", [pytest.param(n, p, id=f"{n}{p.opts[0]}")
                                         for n, p in OPTIONS])
def test_every_numeric_option_is_bounded_at_both_ends(name, param):
    assert isinstance(param.type, BOUNDED_TYPES), (name, param.opts, param.type)
    assert param.type.min is not None and param.type.max is not None, (name, param.opts)


@pytest.mark.parametrize("command, option, value", CASES)
def test_a_bad_number_is_one_line_naming_the_option(state, capsys, command, option, value):
    items = state / "items.jsonl"
    items.write_text('{"id": "a", "vector": [1, 2, 3]}\n')
    args = [str(items) if a == "FILE" else a for a in REQUIRED.get(command, [])]
    argv = [command, *args, f"{option}={value}"]
    if value == "0" and (command, option) in ZERO_OK:
        # Legitimate: the value parses (running the command is not this test's business).
        ctx = cli.commands[command].make_context(command, argv[1:])
        param = next(p for p in ctx.command.params if option in p.opts)
        assert ctx.params[param.name] == 0
        return
    code, out, err = _main(argv, capsys)
    assert code == 2, err
    line = _one_line(err)
    assert option in line and "Invalid value" in line, line
    assert out == ""


NUMERIC_SETTINGS = [
    name for name, field in Settings.model_fields.items()
    if {int, float} & {field.annotation, *typing.get_args(field.annotation)}]
# Zero is a value these settings mean: seed 0, no injected stall, a cosine floor of 0.
SETTINGS_ZERO_OK = {"seed", "fault_stall_s", "similar_floor"}


def test_the_numeric_settings_are_found():
    assert {"batch_size", "seed", "similar_floor", "lease_timeout_s", "max_attempts",
            "vector_dim", "graph_connect_timeout_s"} <= set(NUMERIC_SETTINGS)


@pytest.mark.parametrize("field", NUMERIC_SETTINGS)
@pytest.mark.parametrize("value", ["-5", "0", str(10**30), "abc", "nan", "inf"])
def test_a_bad_numeric_setting_is_one_line_naming_it(state, capsys, monkeypatch, field,
                                                      value):
    env = f"MOE_{field.upper()}"
    monkeypatch.setenv(env, value)
    if value == "0" and field in SETTINGS_ZERO_OK:
        assert getattr(Settings(), field) == 0
        return
    code, out, err = _main(["status"], capsys)
    assert code == 1, err
    line = _one_line(err)
    assert env in line, line
    assert out == ""


@pytest.mark.parametrize("raw, why", [
    ("[" * 10_000 + "]" * 10_000, "x: nested deeper than 32 lists or maps"),
    ('{"a": ' * 5_000 + "1" + "}" * 5_000, "x: nested deeper than 32 lists or maps"),
    ("9" * 5_000, "x: integer 99999999999999999999... is outside the 64-bit range"),
    ("[1, -" + "9" * 5_000 + "]", "x: integer -9999999999999999999... is outside"),
    (str(2**63), "x: integer 9223372036854775808 is outside the 64-bit range"),
])
def test_a_param_too_deep_or_too_big_is_one_line(state, capsys, raw, why):
    code, out, err = _main(["query", "RETURN $x AS x", "--param", f"x={raw}"], capsys)
    assert code == 2, err
    line = _one_line(err)
    assert "--param" in line and why in line, line
    assert len(line) < 300, line


def test_params_within_bounds_are_kept_exactly():
    from pipeline.cli.graph import _params

    nested = "[" * 32 + "]" * 32
    assert _params((f"a={2**63 - 1}", f"b={-(2**63)}", f"c={nested}", 'd="[[[["',
                    "e=[[[[", "f=1.5")) == {
        "a": 2**63 - 1, "b": -(2**63), "c": json.loads(nested), "d": "[[[[",
        "e": "[[[[", "f": 1.5}


@pytest.mark.parametrize("target, why", [
    ("missing-folder/chart.png", "no folder"),
    ("chart.bmpx", "unknown image format 'bmpx'"),
    ("chart", "unknown image format '(no extension)'"),
])
def test_stats_plot_to_a_file_it_cannot_write_is_one_line(state, capsys, target, why):
    code, _, err = _main(["stats", "--plot", str(state / target)], capsys)
    assert code == 2, err
    line = _one_line(err)
    assert "--plot" in line and why in line, line


@pytest.mark.parametrize("content, kind", [('"abc"', "a string"), ("5", "a number"),
                                           ("[1, 2]", "a list"), ("null", "a null")])
def test_train_config_that_is_json_but_no_object_is_one_line(state, capsys, content, kind):
    items = state / "items.jsonl"
    items.write_text('{"id": "a", "text": "one"}\n')
    config = state / "model.json"
    config.write_text(content)
    code, _, err = _main(["train", str(items), "--config", str(config)], capsys)
    assert code == 1, err
    line = _one_line(err)
    assert f"--config {config}" in line and f"got {kind} JSON value" in line, line


def test_train_config_with_a_wrong_field_type_is_one_line(state, capsys):
    items = state / "items.jsonl"
    items.write_text('{"id": "a", "text": "one"}\n')
    config = state / "model.json"
    config.write_text('{"num_experts": "eight"}')
    code, _, err = _main(["train", str(items), "--config", str(config)], capsys)
    assert code == 1, err
    assert f"--config {config}" in _one_line(err)


@contextlib.contextmanager
def _tiny_disk(path: Path, size: str = "1m"):
    """A real, small filesystem at ``path`` (tmpfs; root only)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(disk: Path) -> None:
    """Leave no byte free on ``disk``."""
    with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def test_a_full_disk_under_the_sql_database_is_one_line(state, capsys, monkeypatch):
    with _tiny_disk(state / "disk") as disk:
        _fill(disk)
        monkeypatch.setenv("DATABASE_URL", f"sqlite:///{disk / 'runs.sqlite3'}")
        code, _, err = _main(["status"], capsys)
    assert code == 1, err
    line = _one_line(err)
    assert line.startswith("error: disk full writing the SQL database"), line


def test_a_full_disk_under_an_output_file_is_one_line(capsys):
    """ENOSPC from any write a command makes: `main` names the file and the cause."""
    import pipeline.cli as entry

    with _tiny_disk(Path(f"/tmp/moe-full-{os.getpid()}")) as disk:
        _fill(disk)

        @click.command("fill-test")
        def write_one() -> None:
            (disk / "out.txt").write_text("x" * 100_000)

        entry.cli.add_command(write_one)
        try:
            code, _, err = _main(["fill-test"], capsys)
        finally:
            entry.cli.commands.pop("fill-test")
    assert code == 1, err
    line = _one_line(err)
    assert line.startswith("error: disk full writing ") and "no space left" in line, line


# -- through the installed command, on the real graph servers ---------------------------------

HUGE = "UNWIND range(1, 10000000) AS i RETURN i"
HOSTILE = "before\x1b[2J\x1b]0;title\x07\x08\r\u202eafter"
HOSTILE_SHOWN = "before\\x1b[2J\\x1b]0;title\\x07\\x08\\r\\u202eafter"


@pytest.fixture(scope="module", params=["embedded", "neo4j"])
def cli_env(request, tmp_path_factory):
    """The environment of a `moe-pipeline` process on one of the graph servers."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NEO4J_URI", "MOE_NEO4J_URI", "DATABASE_URL", "CELERY_BROKER_URL")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    if request.param == "embedded":
        env["MOE_STATE_DIR"] = str(request.getfixturevalue("embedded_server").root.parent)
    else:
        server = request.getfixturevalue("neo4j_server")
        env.update(MOE_STATE_DIR=str(tmp_path_factory.mktemp("neo4j-cli")),
                   NEO4J_URI=server["uri"], NEO4J_USERNAME=server["user"],
                   NEO4J_PASSWORD=server["password"])
    return env


def _moe(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The command line in a process of its own (forked, see `forkrun`)."""
    return forkrun.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True,
                       text=True, env=env, timeout=timeout)


def _measured(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The command line in a fresh interpreter under /usr/bin/time, whose peak memory
    `_rss_mb` reads (a forked child would count its parent's imports)."""
    return subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", sys.executable, "-m",
                           "pipeline.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _rss_mb(proc: subprocess.CompletedProcess) -> float:
    return int(proc.stderr.rsplit("maxrss_kb=", 1)[1].split()[0]) / 1024


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("flags, shown", [([], 1000), (["--json"], 1000),
                                          (["--limit", "7", "--json"], 7)])
def test_a_huge_result_stops_at_the_limit_in_bounded_memory(cli_env, flags, shown):
    start = time.monotonic()
    proc = _measured(cli_env, "query", HUGE, *flags)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    if "--json" in flags:
        assert [json.loads(line)["i"] for line in lines] == list(range(1, shown + 1))
    else:
        assert lines[0].strip() == "i" and [int(v) for v in lines[1:]] == list(
            range(1, shown + 1))
    assert f"stopped at {shown:,} rows (--limit); --all for everything" in proc.stderr
    # Every row of the result as Python objects would be over 1 GB; the CLI alone (Python,
    # click, the driver) is about 100 MB.
    assert _rss_mb(proc) < 250, proc.stderr
    assert took < 60, took


@pytest.mark.integration
@pytest.mark.slow
def test_wide_rows_stop_at_the_byte_limit(cli_env):
    proc = _moe(cli_env, "query", "UNWIND range(1, 100000) AS i RETURN i, $pad AS pad",
                "--param", f"pad={'x' * 10_000}", "--limit", "100000", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "stopped at 4 MiB of output" in proc.stderr and "--all for everything" in proc.stderr
    assert 400 <= len(proc.stdout.splitlines()) <= 430  # 4 MiB of 10 kB rows


@pytest.mark.integration
@pytest.mark.slow
def test_all_prints_every_row_of_a_large_result(cli_env):
    proc = _moe(cli_env, "query", "UNWIND range(1, 20000) AS i RETURN i", "--all", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["i"] for line in proc.stdout.splitlines()] == list(
        range(1, 20001))
    assert "stopped at" not in proc.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_control_characters_from_the_data_are_shown_escaped(cli_env, tmp_path):
    item = f"hostile-{os.getpid()}-{time.time_ns()}"
    items = tmp_path / "hostile.jsonl"
    items.write_text(json.dumps({"id": item, "text": HOSTILE}) + "\n")
    ran = _moe(cli_env, "run", str(items), timeout=300)
    assert ran.returncode == 0, ran.stderr
    ask = ("MATCH (i:Insight)-[:SUPPORTED_BY]->(s:Source {id: $item}) "
           "RETURN i.text AS text, i.id AS id")
    table = _moe(cli_env, "query", ask, "--param", f"item={item}")
    assert table.returncode == 0, table.stderr
    assert HOSTILE_SHOWN in table.stdout, table.stdout
    assert not {"\x1b", "\x07", "\x08", "\r", "\u202e"} & set(table.stdout), table.stdout
    exact = _moe(cli_env, "query", ask, "--param", f"item={item}", "--json")
    assert json.loads(exact.stdout)["text"] == HOSTILE, exact.stdout
    insight = json.loads(exact.stdout)["id"]
    near = _moe(cli_env, "similar", "--text", HOSTILE, "--local", "--k", "3", timeout=300)
    assert near.returncode == 0, near.stderr
    assert insight in near.stdout and HOSTILE_SHOWN[:40] in near.stdout, near.stdout
    assert not {"\x1b", "\x07", "\x08", "\r", "\u202e"} & set(near.stdout), near.stdout
    job = ran.stdout.split()[1]  # "job JOB_ID completed: ..."
    items = _moe(cli_env, "status", job, "--items")
    assert items.returncode == 0, items.stderr
    assert f"item {item} became {insight}" in items.stdout and HOSTILE_SHOWN in items.stdout
    assert not {"\x1b", "\x07", "\x08", "\r", "\u202e"} & set(items.stdout), items.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_a_full_state_dir_during_run_is_one_line(tmp_path):
    """`run` with its state dir (graph server and SQLite) on a real 2 MB filesystem."""
    pytest.importorskip("arcadedb_embedded", reason="the graph extra is not installed")
    items = tmp_path / "items.jsonl"
    items.write_text("".join(f'{{"id": "v{i}", "vector": [{i}, 1, 2, 3]}}\n'
                             for i in range(50)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("NEO4J_URI", "MOE_NEO4J_URI", "DATABASE_URL")}
    with _tiny_disk(tmp_path / "disk", "2m") as disk:
        env["MOE_STATE_DIR"] = str(disk / "state")
        try:
            proc = forkrun.run([sys.executable, "-m", "pipeline.cli", "run", str(items)],
                               capture_output=True, text=True, env=env, timeout=300)
        finally:
            forkrun.run([sys.executable, "-m", "pipeline.cli", "down"], env=env,
                        capture_output=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines()
             if line and not line.startswith("starting the embedded graph server")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: disk full writing"), lines[0]


@pytest.mark.parametrize("raw, shown", [
    ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
    ("over\rwrite\x08\x08", "over\\rwrite\\x08\\x08"),
    ("two\nlines\ttab", "two\\nlines\\ttab"),
    ("\x9b31m C1 CSI, \x7f DEL", "\\x9b31m C1 CSI, \\x7f DEL"),
    ("abc\u202edcba\u2066x\u2069\u200f", "abc\\u202edcba\\u2066x\\u2069\\u200f"),
    ("plain é 名前 C:\\path", "plain é 名前 C:\\path"),
])
def test_printable_escapes_controls_and_bidi_and_keeps_the_rest(raw, shown):
    from pipeline.cli.text import printable

    assert printable(raw) == shown


def test_an_unexpected_error_is_one_line_with_the_way_to_its_traceback():
    from pipeline.cli import _unexpected_line

    line = _unexpected_line(RuntimeError("boom\n  File 'x.py', line 1"))
    assert line == ("RuntimeError: boom (unexpected; run the command again with --debug for "
                    "the traceback)")
    assert "\x1b" not in _unexpected_line(ValueError("\x1b[2Jcleared"))
