"""How one upstream try ended: the vocabulary shared by balancer, client and features."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """The result of one try against one backend, as seen by its caller."""

    SUCCESS = "success"  # 2xx-4xx answer (4xx is the caller's fault, not the node's)
    ERROR = "error"  # 5xx answer
    TIMEOUT = "timeout"  # no answer within the per-try timeout
    CONNECT_ERROR = "connect_error"  # refused, reset or dropped connection


#: The members as module constants, for the request path: on Python 3.11 reading a member
#: off the class goes through `EnumType.__getattr__`, several times slower than a global,
#: and every proxied request compares outcomes several times.
SUCCESS, ERROR, TIMEOUT, CONNECT_ERROR = (
    Outcome.SUCCESS,
    Outcome.ERROR,
    Outcome.TIMEOUT,
    Outcome.CONNECT_ERROR,
)
