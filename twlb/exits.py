"""Exit statuses and one-line errors, the same for every `twlb` command (docs/manual.md).

- 0: done;
- 1: the command ran and what it checks failed (`twlb chaos check`: a steady state not
  met), or a piece of it failed at run time (a worker process, the system refusing a
  file);
- 2: the command was given something it cannot use: a bad flag or environment value, a
  file it cannot read or parse, a port it cannot listen on, no cluster to talk to;
- 130: stopped by SIGINT or SIGTERM before it was done (`twlb load`; the partial report
  is still written).

Every error is one line on stderr, `<command>: error: <what is wrong>`, never a
traceback; a value that came from an environment variable is named by that variable.
`OneLineErrors.main` does this for a click command run standalone (the `twlb` group and
`python -m twlb.chaos`); called with `standalone_mode=False` the errors propagate as
click raised them.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import click
from click.core import ParameterSource

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: OS errors of an address one cannot listen on: a usage error (another port, or stop
#: what holds it), whichever call met it.
BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})


class UsageFailure(click.ClickException):
    """Input the command cannot use, found after its flags parsed (a file's contents, a
    port, a missing cluster): exit status 2, one line."""

    exit_code = EXIT_USAGE


def listen_error(what: str, host: str, port: int, err: OSError) -> UsageFailure:
    """The one-line error of a server that cannot listen on `host:port`."""
    reason = err.strerror or str(err)
    hint = "; pick another port or stop what uses it" if err.errno == errno.EADDRINUSE else ""
    return UsageFailure(f"{what} cannot listen on {host}:{port}: {reason}{hint}")


def bound_socket(what: str, host: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket bound to `host:port` (TCP, or UDP with `kind`), ready to hand to a server;
    UsageFailure names the address when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise listen_error(what, host, port, err) from None
    except (OverflowError, UnicodeError) as err:  # a port out of range, a bad host name
        sock.close()
        raise UsageFailure(f"{what} cannot listen on {host}:{port}: {err}") from None
    return sock


def envvar_of(ctx: click.Context, param: click.Parameter) -> str | None:
    """The environment variable `param`'s value came from, or None when it did not."""
    if (
        param.name is None
        or ctx.get_parameter_source(param.name) is not ParameterSource.ENVIRONMENT
    ):
        return None
    if isinstance(param.envvar, str):
        return param.envvar
    if param.envvar:
        return next((v for v in param.envvar if v in os.environ), param.envvar[0])
    if ctx.auto_envvar_prefix:
        return f"{ctx.auto_envvar_prefix}_{param.name.upper()}"
    return None


def _hint(err: click.BadParameter, ctx: click.Context) -> str | None:
    hint = err.param_hint
    if isinstance(hint, str):
        return hint
    if hint is not None:
        return " / ".join(repr(h) for h in hint)
    return err.param.get_error_hint(ctx) if err.param is not None else None


def one_line(err: click.ClickException, fallback_path: str) -> str:
    """`err` as one line: the command (its context's, else `fallback_path`), what is
    wrong, and the environment variable when the bad value came from one."""
    ctx = getattr(err, "ctx", None)
    if isinstance(err, click.BadParameter) and ctx is not None and err.param is not None:
        envvar = envvar_of(ctx, err.param)
        hint = _hint(err, ctx)
        if envvar and hint and envvar not in hint:
            err.param_hint = f"{hint} (from {envvar})"
    message = err.format_message()
    path = ctx.command_path if ctx is not None else fallback_path
    if isinstance(err, click.UsageError) and not isinstance(err, click.BadParameter):
        message = f"{message.rstrip()} (see '{path} --help')"
    return f"{path}: error: {' '.join(message.split())}"


def command_path(group: click.Command, prog_name: str, args: Sequence[str]) -> str:
    """The subcommand `args` name under `group` ("twlb chaos check"), as far as they go."""
    path, cmd = [prog_name], group
    ctx = click.Context(group, info_name=prog_name)
    for arg in args:
        if not isinstance(cmd, click.Group) or arg.startswith("-"):
            break
        try:
            sub = cmd.get_command(ctx, arg)
        except Exception:  # a subcommand that cannot even be imported: name what we have
            sub = None
        if sub is None:
            break
        path.append(arg)
        cmd = sub
    return " ".join(path)


def fail(message: str, code: int) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


class OneLineErrors(click.Command):
    """A click command (or, mixed in first, a group) whose standalone run reports every
    error in one line with the exit statuses above."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        name = prog_name or self.name or "twlb"
        try:
            result = super().main(argv, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:
            err.show()  # the help itself, as click shows it
            sys.exit(err.exit_code)
        except click.ClickException as err:
            fail(one_line(err, command_path(self, name, argv)), err.exit_code)
        except click.Abort:
            fail("Aborted!", EXIT_FAILED)
        except OSError as err:
            if err.errno == errno.EPIPE:  # the reader went away: nothing more to say
                sys.stderr = sys.stdout = open(  # noqa: SIM115 (kept open until exit)
                    "/dev/null", "w"
                )
                sys.exit(EXIT_FAILED)
            code = EXIT_USAGE if err.errno in BIND_ERRNOS else EXIT_FAILED
            fail(f"{command_path(self, name, argv)}: error: {err}", code)
        # Standalone, click exits 0 after a command returns; an explicit ctx.exit(n)
        # (and --help, --version) come back here as n.
        sys.exit(result if isinstance(result, int) else EXIT_OK)


class OneLineGroup(OneLineErrors, click.Group):
    """A click group whose standalone run reports every error in one line."""
