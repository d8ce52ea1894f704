"""The README's Python blocks run as written, in order, in one namespace (issue 11: docs that run)."""

import re

from tests.conftest import REPO


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)           # the blocks write small.nsz, deep.nsz, int8.nsz
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md block {i + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "bytes, test accuracy" in out and "'fc1':" in out
    for f in ("small.nsz", "deep.nsz", "int8.nsz"):
        assert (tmp_path / f).stat().st_size > 0
    assert namespace["ns"].evaluate(namespace["fast"], namespace["data"].test)[1] > 0.9


def test_readme_command_lines_parse_and_their_pipelines_validate():
    import shlex

    from netsurgeon.cli import cli
    from netsurgeon.pipeline import Pipeline

    text = (REPO / "README.md").read_text()
    shell = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ")
    lines = [line.split(" #")[0].strip().removeprefix(".venv/bin/") for line in shell.splitlines()]
    lines = ["netsurgeon " + line.split("-m netsurgeon ", 1)[1] if line.startswith("torchrun ") else line
             for line in lines]  # torchrun ... -m netsurgeon CMD: the same command line
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("netsurgeon ")]
    assert len(commands) >= 10
    for args in commands:
        cmd = cli.commands[args[0]]
        ctx = cmd.make_context(args[0], args[1:])    # every option exists and has a valid value
        if args[0] == "compress":
            p = ctx.params
            if p["recipe"] is not None:
                pipe = Pipeline.from_yaml(REPO / p["recipe"], p["overrides"])
            else:
                pipe = Pipeline.from_spec(p["method_names"].split(","), p["overrides"])
            pipe.check(has_data=True)
