"""The one exception tree of spt.

Every error a user can see carries its status token (SPEC.md §3.3) and its exit code (§3.2),
so that the CLI dispatcher is the only place that turns exceptions into output. Errors cross the
control socket as plain dicts (`to_wire` / `from_wire`), so the daemon raises and the CLI prints.

Nothing here imports anything from spt: every layer may raise these.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every CLI start loads this
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, ClassVar

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_DAEMON_DOWN = 3
EXIT_ELEVATION = 4
EXIT_INTERNAL = 5

# What a refusal means when the place that raised it had nothing to add (SPEC.md §3.1: every
# refusal line explains itself). Each says what to do next.
EXPLANATIONS: dict[str, str] = {
    "NO_PERCH": "no endpoint of that name is visible from this node (spt endpoint list shows who is)",
    "NO_SUCH_NODE": "no node in your subnets has that label or key prefix (spt subnet status --nodes lists them)",
    "AMBIGUOUS_NODE": "several nodes match; qualify with one of their key prefixes instead",
    "NO_SUCH_SUBNET": "this node holds no attached subnet of that name (spt subnet status lists them)",
    "UNREACHABLE": "the hosting node cannot be reached now; try again when it is online",
    "SPOOL_FULL": "the receiver holds too much for this endpoint already; wait until it drains",
}


class SptError(Exception):
    """Base of every spt error; `token` and `exit_code` say how the CLI reports it.

    `subject` follows the token after a colon (`NO_PERCH:bob`); `message` is the one-line
    explanation after it; `lines` are printed below, each on its own line (candidate lists).
    """

    token: ClassVar[str] = "ERROR"
    exit_code: ClassVar[int] = EXIT_REFUSED

    def __init__(self, subject: str = "", message: str = "", *, lines: Sequence[str] = ()) -> None:
        super().__init__(message or subject)
        self.subject = subject
        self.message = message
        self.lines = tuple(lines)

    def status_line(self) -> str:
        """The token line as printed: `TOKEN:subject message`, or `TOKEN: message` without subject."""
        token = self.instance_token
        message = self.message or EXPLANATIONS.get(token, "")
        if self.subject:
            head = f"{token}:{self.subject}"
            return f"{head} {message}" if message else head
        return f"{token}: {message}" if message else token

    @property
    def instance_token(self) -> str:
        return self.token

    @property
    def instance_exit_code(self) -> int:
        return self.exit_code

    def to_wire(self) -> dict[str, Any]:
        return {
            "token": self.instance_token,
            "exit": self.instance_exit_code,
            "subject": self.subject,
            "message": self.message,
            "lines": list(self.lines),
        }

    @staticmethod
    def from_wire(data: dict[str, Any]) -> SptError:
        return TokenError(
            str(data.get("token", "ERROR")),
            str(data.get("subject", "")),
            str(data.get("message", "")),
            exit_code=int(data.get("exit", EXIT_REFUSED)),
            lines=[str(x) for x in data.get("lines", [])],
        )


class TokenError(SptError):
    """An error whose token is chosen where it is raised (`TokenError("NAME_TAKEN", name, why)`).

    Most refusals are one-off tokens of the spec; a class for each would add nothing.
    """

    def __init__(
        self,
        token: str,
        subject: str = "",
        message: str = "",
        *,
        exit_code: int = EXIT_REFUSED,
        lines: Sequence[str] = (),
    ) -> None:
        super().__init__(subject, message, lines=lines)
        self._token = token
        self._exit_code = exit_code

    @property
    def instance_token(self) -> str:
        return self._token

    @property
    def instance_exit_code(self) -> int:
        return self._exit_code


class ConfigError(SptError):
    """Bad configuration or bad command-line input: the user must change what they typed."""

    token = "BAD_CONFIG"
    exit_code = EXIT_USAGE


class UsageError(TokenError):
    """A usage error with its own token (`BAD_ADDRESS`, `BAD_NAME`, `BAD_JSON`…); exit 2."""

    def __init__(self, token: str, subject: str = "", message: str = "", *, lines: Sequence[str] = ()) -> None:
        super().__init__(token, subject, message, exit_code=EXIT_USAGE, lines=lines)


class Refusal(TokenError):
    """A documented refusal with its own token (`NAME_TAKEN`, `NO_PERCH`…); exit 1."""

    def __init__(self, token: str, subject: str = "", message: str = "", *, lines: Sequence[str] = ()) -> None:
        super().__init__(token, subject, message, exit_code=EXIT_REFUSED, lines=lines)


class IdentityError(SptError):
    """A missing or invalid key, or a pinned key that changed."""

    token = "IDENTITY"


class PluginError(SptError):
    """A plugin failed to load or register, or broke the registry's rules."""

    token = "PLUGIN_ERROR"


class DuplicateNameError(PluginError):
    """Two plugins registered the same name in one registry; names are wire contract."""

    token = "DUPLICATE_NAME"


class FrozenRegistryError(PluginError):
    """Something tried to register after start-up froze the registries."""

    token = "REGISTRY_FROZEN"


class PeerError(SptError):
    """The other side: unreachable, refused, timed out, or no such perch."""

    token = "PEER_ERROR"


class UnreachableError(PeerError):
    token = "UNREACHABLE"


class ProtocolError(SptError):
    """A protocol rule was broken."""

    token = "PROTOCOL_ERROR"


class LocalProtocolError(ProtocolError):
    """Our own code asked for something illegal: a bug here, raised loudly."""

    exit_code = EXIT_INTERNAL


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid: close that stream or connection, log, keep running."""


class DaemonDown(SptError):
    """The daemon is not running and could not (or may not) be started."""

    token = "DAEMON_DOWN"
    exit_code = EXIT_DAEMON_DOWN


class ElevationRequired(SptError):
    """A gated operation (SPEC.md §5.7) was asked for by a caller that is not root. The CLI
    prints the exact command to run after the explanation, which is always MESSAGE."""

    token = "ELEVATION_REQUIRED"
    exit_code = EXIT_ELEVATION
    MESSAGE = "run this in an elevated terminal:"
