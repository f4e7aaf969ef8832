"""Operations: check-config reports every problem in one run, unknown GATEWAY_* variables are refused, every CLI
flag has a help text, an empty upstream key variable is warned about at start-up and on /healthz."""

from __future__ import annotations

import argparse
import logging

import aiohttp
import pytest

from gateway.cli import build_parser, main
from gateway.config import FleetConfig, ModelConfig, UpstreamConfig
from gateway.tools.top import _parser as top_parser


def test_check_config_reports_every_problem_in_one_run(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """
upstreams:
  a: {base_url: "ftp://x"}
  b: {base_url: "http://b", provider: gemini}
models:
  m: {upstreams: [a, ghost], strategy: fastest}
  n: {upstreams: [a], aliases: [m, shared]}
  o: {upstreams: [ghost2], aliases: [shared]}
"""
    )
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "upstreams.a.base_url" in err
    assert "unknown provider 'gemini'; choose one of openai, azure, anthropic" in err
    assert "unknown strategy 'fastest'" in err
    # cross-references are reported beside the field errors, not hidden behind them
    assert "model 'm' names unknown upstream 'ghost'" in err
    assert "model 'o' names unknown upstream 'ghost2'" in err
    assert "model 'n': alias 'm' is the name of another model" in err
    assert "model 'o': alias 'shared' is also an alias of model 'n'" in err
    assert err.startswith(f"{bad}: 7 problem(s)")


def test_an_alias_equal_to_another_model_is_an_error(tmp_path, capsys):
    f = tmp_path / "alias.yaml"
    f.write_text("upstreams:\n  a: {base_url: 'http://x'}\nmodels:\n  m: {upstreams: [a]}\n  n: {upstreams: [a], aliases: [m]}\n")
    assert main(["check-config", str(f)]) == 1
    assert "alias 'm' is the name of another model" in capsys.readouterr().err


def test_unknown_gateway_variable_is_refused_with_a_did_you_mean(monkeypatch, capsys):
    monkeypatch.setenv("GATEWAY_REDIS_ULR", "redis://127.0.0.1:6379")
    with pytest.raises(SystemExit) as e:
        main(["check-config", "config/compose.yaml"])
    assert e.value.code == 2
    assert "unknown environment variable GATEWAY_REDIS_ULR; did you mean GATEWAY_REDIS_URL?" in capsys.readouterr().err


def _actions(parser: argparse.ArgumentParser, prefix: str = "gateway"):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _actions(sub, f"{prefix} {name}")
        elif not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS:
            yield prefix, a


def test_every_cli_flag_has_a_help_text():
    missing = []
    for prefix, a in [*_actions(build_parser()), *_actions(top_parser(), "gateway top")]:
        text = (a.help or "").strip()
        if not text or text.startswith("(default"):  # a bare default is not a help text
            missing.append(f"{prefix} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing
    walked = {(prefix, "/".join(a.option_strings)) for prefix, a in _actions(build_parser())}
    assert ("gateway sim", "--per-seq") in walked and ("gateway serve", "--port") in walked  # the walk saw the subcommands


async def test_empty_key_variable_is_warned_at_start_and_on_healthz(sim_fleet, start_gateway, monkeypatch, caplog):
    monkeypatch.setenv("OPS_TEST_KEY_SET", "sk-present")
    monkeypatch.setenv("OPS_TEST_KEY_EMPTY", "")
    url = sim_fleet.url("fast-gpu") + "/v1"
    fleet = FleetConfig(
        upstreams={
            "keyed": UpstreamConfig(base_url=url, api_key_env="OPS_TEST_KEY_SET"),
            "empty": UpstreamConfig(base_url=url, api_key_env="OPS_TEST_KEY_EMPTY"),
            "unset": UpstreamConfig(base_url=url, api_key_env="OPS_TEST_KEY_NEVER_SET"),
        },
        models={"m": ModelConfig(upstreams=["keyed", "empty", "unset"])},
    )
    with caplog.at_level(logging.WARNING, logger="gateway"):
        gw = await start_gateway(fleet)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'empty'" in m and "OPS_TEST_KEY_EMPTY" in m for m in logged)
    assert any("'unset'" in m and "OPS_TEST_KEY_NEVER_SET" in m for m in logged)
    assert not any("'keyed'" in m for m in logged)
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/healthz") as r:
        assert r.status == 200
        body = await r.json()
    assert body["status"] == "ok"
    assert len(body["warnings"]) == 2 and "OPS_TEST_KEY_EMPTY" in body["warnings"][0] + body["warnings"][1]
    assert "sk-present" not in str(body)


def test_make_test_runs_ruff_and_mypy_before_pytest_and_ci_runs_make_test():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    # -n: print the recipe only (nothing is installed or run); a private VENV path keeps it away from any real venv.
    out = subprocess.run(
        ["make", "-n", "test", "VENV=/nonexistent-venv"], cwd=root, capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    idx = {tool: next(i for i, line in enumerate(out) if line.startswith(f"/nonexistent-venv/bin/{tool} ")) for tool in ("ruff", "mypy", "pytest")}
    assert idx["ruff"] < idx["pytest"] and idx["mypy"] < idx["pytest"]
    assert out[idx["ruff"]].split()[1:] == ["check", "gateway", "tests"]
    assert out[idx["mypy"]].split()[1:] == ["gateway"]
    assert any("prometheus" in line and "apt-get install" in line for line in out)  # installed when missing
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line and not line.startswith("#") and not line.startswith(("set ", "cd "))] == ["make test"]
