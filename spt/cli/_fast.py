"""Plain commands without click: what agents and scripts run most, kept cheap.

Importing click costs more than everything `spt send` or `spt node show` does (DESIGN.md §4;
bench/cli_startup.py and bench/messaging.py measure them against `python3 -c pass`), and agents
run `spt send`, `spt ring` and `spt ready --once` once per message or poll (and `spt subnet
create` has a budget of its own, issue 14). So `main()` first asks `plain_command`: when the
arguments have the plain shape of a command in `PLAIN` (its words, its positional arguments, its
own options, and `--json` before or after the words), it returns the function the click command also calls, with the same arguments. Any other shape
(`--help`, another global option, an unknown option, a missing value, too many arguments) gives
None, and click parses and explains it. Only the argument parsing exists twice; a test runs each
case both ways and compares the output.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping


class Plain:
    """One command's plain shape: `target` ("module:function") is called as
    `function(*positional, **options)`, plus `as_json=` for a read command (`reads_json`);
    action commands ignore `--json`, as their click commands do (SPEC.md §3.1).

    `positional` is how many arguments it takes (least, most), `choices` what the argument at an
    index may be; `values`, `repeated` and `flags` map each option to its keyword, `numbers`
    names the values that are floats, `defaults` the values an absent option has (else None; an
    absent flag is False, an absent repeatable option an empty tuple).
    """

    __slots__ = ("choices", "defaults", "flags", "numbers", "positional", "reads_json", "repeated", "target", "values")

    def __init__(
        self, target: str, *, positional: tuple[int, int] = (0, 0), choices: Mapping[int, Collection[str]] | None = None,
        values: Mapping[str, str] | None = None, repeated: Mapping[str, str] | None = None,
        flags: Mapping[str, str] | None = None, numbers: Collection[str] = (),
        defaults: Mapping[str, object] | None = None, reads_json: bool = False,
    ) -> None:
        self.target = target
        self.positional = positional
        self.choices = dict(choices or {})
        self.values = dict(values or {})
        self.repeated = dict(repeated or {})
        self.flags = dict(flags or {})
        self.numbers = frozenset(numbers)
        self.defaults = dict(defaults or {})
        self.reads_json = reads_json


_MESSAGE_VALUES = {"--from": "from_id", "--json-payload": "json_payload"}
_MESSAGE_FLAGS = {"--active-only": "active_only", "--deferred": "deferred", "--idle-only": "idle_only"}

PLAIN: dict[tuple[str, ...], Plain] = {
    ("send",): Plain("spt.cli._send:send_message", positional=(1, 1), values=_MESSAGE_VALUES, flags=_MESSAGE_FLAGS),
    ("ring",): Plain(
        "spt.cli._stream:ring_message", positional=(1, 1), values={**_MESSAGE_VALUES, "--timeout": "timeout"},
        flags=_MESSAGE_FLAGS, numbers={"timeout"}, defaults={"timeout": 120.0},
    ),
    ("ready",): Plain(
        "spt.cli._stream:listen", positional=(0, 1), values={"--subnet": "subnet", "--timeout": "timeout"},
        flags={"--once": "once"}, numbers={"timeout"},
    ),
    ("node", "show"): Plain("spt.cli._views:show_node", reads_json=True),
    ("whoami",): Plain("spt.cli._views:show_whoami", reads_json=True),
    ("endpoint", "list"): Plain(
        "spt.cli._views:list_endpoints", values={"--subnet": "subnet"}, flags={"--detail": "detail"}, reads_json=True,
    ),
    ("endpoint", "state"): Plain("spt.cli._views:set_activity", positional=(2, 2), choices={1: ("busy", "idle")}),
    ("subnet", "status"): Plain(
        "spt.cli._subnet:subnet_status", positional=(0, 1), flags={"--nodes": "nodes", "--all": "show_all"},
        reads_json=True,
    ),
    ("subnet", "create"): Plain(
        "spt.cli._subnet:create_subnet", positional=(1, 1), flags={"--allow-duplicate-name": "allow_duplicate_name"},
    ),
    ("subnet", "show-code"): Plain("spt.cli._subnet:show_subnet_code", positional=(0, 1), flags={"--no-qr": "no_qr"}),
    ("subnet", "join"): Plain(
        "spt.cli._subnet:join_subnet", positional=(1, 1), values={"--code": "code", "--id": "subnet_id", "--timeout": "timeout"},
        repeated={"--peer": "peers"}, numbers={"timeout"}, defaults={"timeout": 30.0},
    ),
}


def plain_command(args: list[str]) -> Callable[[], None] | None:
    """The command `args` name, ready to run, if they have its plain shape; else None."""
    as_json = False
    start = 0
    while start < len(args) and args[start] == "--json":
        as_json = True
        start += 1
    words = next((w for w in PLAIN if tuple(args[start:start + len(w)]) == w), None)
    if words is None:
        return None
    spec = PLAIN[words]
    options: dict[str, object] = {keyword: spec.defaults.get(keyword) for keyword in spec.values.values()}
    options.update({keyword: False for keyword in spec.flags.values()})
    repeated: dict[str, list[str]] = {keyword: [] for keyword in spec.repeated.values()}
    positional: list[str] = []
    rest = args[start + len(words):]
    i = 0
    while i < len(rest):
        arg = rest[i]
        name, eq, value = arg.partition("=")
        if name in spec.values or name in spec.repeated:
            if not eq:
                if i + 1 >= len(rest):
                    return None
                i += 1
                value = rest[i]
            if name in spec.repeated:
                repeated[spec.repeated[name]].append(value)
            elif spec.values[name] in spec.numbers:
                try:
                    options[spec.values[name]] = float(value)
                except ValueError:
                    return None  # click says what is wrong with it
            else:
                options[spec.values[name]] = value
        elif arg in spec.flags:
            options[spec.flags[arg]] = True
        elif arg == "--json":
            as_json = True
        elif arg.startswith("-") and arg != "-":
            return None  # --help, --, unknown options: click explains them
        else:
            positional.append(arg)
        i += 1
    if not spec.positional[0] <= len(positional) <= spec.positional[1]:
        return None
    if any(i < len(positional) and positional[i] not in allowed for i, allowed in spec.choices.items()):
        return None  # click lists the choices
    options.update({keyword: tuple(given) for keyword, given in repeated.items()})
    if spec.reads_json:
        options["as_json"] = as_json
    import sys

    module, _, attr = spec.target.partition(":")
    __import__(module)  # the builtin: the importlib package costs as much as a command module
    function = getattr(sys.modules[module], attr)
    return lambda: function(*positional, **options)
