"""Settings declared once: flags, environment variables and the spec come from the model."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from conftest import twlb_params
from twlb.backend.cli import command as backend_command
from twlb.backend.settings import BackendSettings
from twlb.balancer.cli import command as balancer_command
from twlb.balancer.settings import BalancerSettings

from twlb.options import FiniteFloat, field_values, flag_name, to_args, to_env
from twlb.spec import (
    NOT_BALANCER_FLAGS,
    BalancerSpec,
    BalancerTunables,
    FaultSpec,
    FaultType,
    PolicyName,
    balancer_args,
)


def _parse(command: click.Command, args: list[str], env: dict[str, str] | None = None):
    """The command's parameters as click parses them (nothing runs)."""
    mp = pytest.MonkeyPatch()
    for k, v in (env or {}).items():
        mp.setenv(k, v)
    try:
        ctx = command.make_context("cmd", list(args), auto_envvar_prefix=_prefix(command))
    finally:
        mp.undo()
    return ctx.params


def _prefix(command: click.Command) -> str:
    return "TWLB_BACKEND" if command is backend_command else "TWLB_BALANCER"


@pytest.mark.parametrize(
    ("command", "model", "nested"),
    [
        (balancer_command, BalancerSettings, set()),
        (backend_command, BackendSettings, {"fault", "gossip"}),
        (backend_command, FaultSpec, set()),
    ],
)
def test_every_setting_is_a_flag_with_the_models_default_and_help(command, model, nested):
    for name, field in model.model_fields.items():
        if name in nested:
            continue
        option = next(p for p in command.params if flag_name(name, field) in p.opts)
        assert option.help == field.description, name
    parsed = _parse(command, [])
    values = field_values(model, parsed, exclude=nested)
    assert model.model_validate(values) == model(**{n: getattr(model(), n) for n in nested})


def test_the_flags_settings_give_parse_back_to_the_same_settings(tmp_path: Path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    settings = BalancerSettings(
        backends=("http://127.0.0.1:1", "http://127.0.0.1:2"),
        policy=PolicyName.TRUST,
        latency_weighting=False,
        audit_ignore_fields=("node", "host"),
        slow_start_s=0.0,
        window_s=2.5,
        model=model,
    )
    parsed = _parse(balancer_command, to_args(settings))
    assert BalancerSettings.model_validate(field_values(BalancerSettings, parsed)) == settings


def test_existing_flag_and_environment_names_keep_working():
    env = {
        "TWLB_BALANCER_BACKEND": "http://127.0.0.1:1 http://127.0.0.1:2",
        "TWLB_BALANCER_SLOW_START_S": "1.5",
        "TWLB_BALANCER_AUDIT_IGNORE_FIELDS": "node host",
    }
    parsed = _parse(balancer_command, ["--window", "3", "--health-interval", "0.2"], env)
    settings = BalancerSettings.model_validate(field_values(BalancerSettings, parsed))
    assert settings.backends == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert (settings.slow_start_s, settings.window_s, settings.health_interval_s) == (1.5, 3, 0.2)
    assert settings.audit_ignore_fields == ("node", "host")


def test_a_flag_out_of_the_models_bounds_is_refused_by_click():
    with pytest.raises(click.BadParameter, match="0.0<x<=300.0"):
        _parse(balancer_command, ["--window", "0"])


def test_the_specs_balancer_section_is_the_settings_fields_under_camel_case_names():
    spec_fields = BalancerSpec.model_fields
    assert set(spec_fields) == {*BalancerTunables.model_fields, *NOT_BALANCER_FLAGS}
    for name in BalancerTunables.model_fields:
        mine, theirs = spec_fields[name], BalancerSettings.model_fields[name]
        assert (mine.default, mine.description, mine.metadata) == (
            theirs.default,
            theirs.description,
            theirs.metadata,
        )
    spec = BalancerSpec.model_validate({"windowS": 2.0, "retryBudget": 0.5})
    assert spec.model_dump(by_alias=True)["healthIntervalS"] == 1.0
    assert balancer_args(spec) == [
        "--audit-fraction", "0.05", "--suspect-audit-fraction", "1.0", "--liar-backoff", "60.0",
        "--window", "2.0", "--health-interval", "1.0", "--gossip-poll", "0.5",
        "--retry-budget", "0.5", "--drain-s", "10.0", "--hash-algorithm", "sha256", "--vnodes", "160",
        "--balance-factor", "1.25", "--maglev-table-size", "65537",
    ]  # fmt: skip


def test_a_fault_goes_through_backend_flags_and_environment_unchanged():
    fault = FaultSpec(type=FaultType.FLAPPING, probability=0.25, period_s=3.0)
    by_flags = _parse(backend_command, fault.to_args())
    by_env = _parse(backend_command, [], fault.to_env())
    for parsed in (by_flags, by_env):
        assert FaultSpec.model_validate(field_values(FaultSpec, parsed)) == fault
    assert to_env(fault, "TWLB_BACKEND_")["TWLB_BACKEND_FAULT_TYPE"] == "flapping"


def test_every_float_flag_of_every_command_refuses_nan_and_infinities() -> None:
    params = [
        (path, p) for path, p in twlb_params() if isinstance(p.type, click.types.FloatParamType)
    ]
    assert len(params) > 20  # the walk reached the subcommands
    for path, param in params:
        for bad in ("nan", "NaN", "inf", "-inf", "1e999"):
            with pytest.raises(click.BadParameter, match="not a finite number"):
                param.type.convert(bad, param, None)
        assert isinstance(param.type, FiniteFloat), f"{path} {param.name}"


def test_twlb_load_with_a_nan_rate_exits_2_naming_the_flag() -> None:
    from click.testing import CliRunner

    from twlb.cli import main

    result = CliRunner().invoke(main, ["load", "--rate", "nan", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "--rate" in result.output and "not a finite number" in result.output
