"""Run one operation of a fail2ban action through fail2ban's own code, as fail2ban-server would.

Executed by tests/integration/test_fail2ban.py with the interpreter fail2ban is installed for (Debian's python3),
inside a throwaway network namespace: `python3 fail2ban_action.py CONFDIR ACTION`, then one operation per line on
stdin (`start`, `ban IP BANTIME`, `unban IP`), each answered by one line, `ok` or `error: ...`. One process for the
whole sequence, because fail2ban only unbans what the same action object banned. Imports nothing from the project.
"""

import sys

from fail2ban.client.actionreader import ActionReader
from fail2ban.server.action import CommandAction
from fail2ban.server.ipdns import IPAddr


def load(confdir: str, name: str) -> CommandAction:
    """The action as the server gets it: the client's reader resolves the file, the server's object runs it."""
    reader = ActionReader(name, "test", {}, basedir=confdir)
    if not reader.read():
        raise SystemExit(f"{confdir}/action.d/{name}.conf: not readable")
    reader.getOptions({})
    action = CommandAction(None, name)
    for command in reader.convert():
        if command[0] == "multi-set":
            for key, value in command[4]:
                setattr(action, key, value)
        elif command[0] == "set" and command[2] == "action":
            setattr(action, command[4], command[5])
    return action


def operate(action: CommandAction, words: list[str]) -> None:
    if words == ["start"]:
        action.start()
        return
    address = IPAddr(words[1])
    info = {"ip": address, "family": address.familyStr, "bantime": int(words[2]) if words[2:] else 600}
    if words[0] == "ban":
        action.ban(info)
    elif words[0] == "unban":
        action.unban(info)
    else:
        raise RuntimeError(f"unknown operation {words[0]!r}")


def main() -> int:
    confdir, name = sys.argv[1:]
    action = load(confdir, name)
    for line in sys.stdin:
        try:
            operate(action, line.split())
            print("ok", flush=True)
        except RuntimeError as exc:
            print(f"error: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
