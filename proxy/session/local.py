"""Commands the proxy answers itself, in Redis's own format.

They would change a shared upstream connection's state (AUTH, HELLO, SELECT, CLIENT SETNAME, ASKING,
READONLY) or its number of replies (QUIT, RESET, UNSUBSCRIBE outside pub/sub, CLIENT REPLY), or they
are about the client's own connection to the proxy (CLIENT ID, LIST, INFO, KILL), which Redis does not
know. Each handler takes (session, frames, i) and returns the index of the next frame.
"""

from __future__ import annotations

from ..protocol import errors
from ..protocol.commands import arity_ok
from ..protocol.resp import OK, encode_reply

PONG = b"+PONG\r\n"


def run(session, frames: list, i: int, name: bytes) -> int:
    args = frames[i]
    if not arity_ok(name, args):
        session.reply(errors.wrong_arity(name))
        return i + 1
    monitors = session.host.monitors
    if monitors.sessions:       # MONITOR shows what the proxy answers too (monitor.py)
        monitors.feed(session, name, args, _address(session, "peername"))
    return _HANDLERS[name](session, frames, i)


def _ping(session, frames, i) -> int:
    args = frames[i]
    session.reply(PONG if len(args) == 1 else encode_reply(args[1]))
    return i + 1


def _echo(session, frames, i) -> int:
    session.reply(encode_reply(frames[i][1]))
    return i + 1


def _quit(session, frames, i) -> int:
    session.reply(OK)
    session.closing = True
    session._close_if_done()
    return len(frames)


def _ok(session, frames, i) -> int:
    """ASKING, READONLY, READWRITE: the proxy follows redirects and chooses replicas itself. A single
    node answers them (an error: cluster support is disabled) without changing the connection."""
    if session.pool.cluster:
        session.reply(OK)
    else:
        session.send_commands([frames[i]])
    return i + 1


def _reset(session, frames, i) -> int:
    session.reset_state()
    session.reply(b"+RESET\r\n")
    return i + 1


# -- authentication --------------------------------------------------------------------------------

def _auth(session, frames, i) -> int:
    creds = frames[i][1:]
    checker = session.host.upstream_auth
    if checker is None:
        session.reply(auth(session, creds))
        return i + 1
    slot = session.new_slot(1)

    async def check_upstream():
        reply = await checker.check(creds)
        upstream_auth_result(session, creds, reply)
        session.fill(slot, reply)
    return session.step(frames, i, check_upstream, slot)


def upstream_auth_result(session, creds: list[bytes], reply: bytes) -> bool:
    """listen.auth: upstream: the upstream's answer to the client's credentials, applied to the session."""
    if reply == OK:
        session.authed = True
        session.user = creds[0] if len(creds) == 2 else b"default"
        return True
    session.host.stats.clients.auth_failures += 1
    return False


def auth(session, creds: list[bytes]) -> bytes:
    host = session.host
    if not host.auth_required:
        if len(creds) == 1:
            return errors.AUTH_WITHOUT_PASSWORD
        # Like Redis's default user without a password: any password is accepted for "default".
        if creds[0] == b"default":
            return OK
        host.stats.clients.auth_failures += 1
        return errors.WRONGPASS
    if host.check_password(creds):
        session.authed = True
        session.user = creds[0] if len(creds) == 2 else b"default"
        return OK
    host.stats.clients.auth_failures += 1
    return errors.WRONGPASS


def _hello(session, frames, i) -> int:
    args = frames[i]
    proto = session.proto
    rest = args[1:]
    if rest:
        try:
            proto = int(rest[0])
        except ValueError:
            session.reply(errors.HELLO_PROTO_NOT_INTEGER)
            return i + 1
        if proto not in (2, 3):
            session.reply(errors.NOPROTO)
            return i + 1
        rest = rest[1:]
    creds = None
    name = None
    while rest:
        option = rest[0].upper()
        if option == b"AUTH" and len(rest) >= 3:
            creds = rest[1:3]
            rest = rest[3:]
        elif option == b"SETNAME" and len(rest) >= 2:
            name = rest[1]
            rest = rest[2:]
        else:
            session.reply(errors.hello_syntax(rest[0]))
            return i + 1
    checker = session.host.upstream_auth
    if creds is not None and checker is not None:
        slot = session.new_slot(1)

        async def check_upstream():
            reply = await checker.check(creds)
            if upstream_auth_result(session, creds, reply):
                reply = _hello_reply(session, proto, name)
            session.fill(slot, reply or b"")    # b"": the pinned connection answers in the next slot
        return session.step(frames, i, check_upstream, slot)
    if creds is not None:
        result = auth(session, creds)
        if result != OK:
            session.reply(result)
            return i + 1
        session.authed = True
    reply = _hello_reply(session, proto, name)
    if reply is not None:
        session.reply(reply)
    return i + 1


def _hello_reply(session, proto: int, name: bytes | None) -> bytes | None:
    """HELLO once the credentials (if any) are accepted: the reply, or None when the client's dedicated
    connection was sent a HELLO of its own and answers it."""
    if not session.authed:
        return errors.HELLO_NOAUTH
    if name is not None:
        problem = _bad_name(name)
        if problem:
            return problem
        session.name = name or None
    info = encode_reply({"server": "redis", "version": session.pool.server_version, "proto": proto,
                         "id": session.id, "mode": "cluster" if session.pool.cluster else "standalone",
                         "role": "master", "modules": []}, proto)
    if proto != session.proto and session.pin is not None and session.pin.up:
        # A dedicated connection follows the client's protocol; the client gets the proxy's answer.
        session.proto = proto
        session.send_pinned([b"HELLO", b"%d" % proto], lambda slot, data: info if data[:1] in b"%*" else data)
        return None
    session.proto = proto
    return info


# -- SELECT ------------------------------------------------------------------------------------------

def _select(session, frames, i) -> int:
    try:
        db = int(frames[i][1])
    except ValueError:
        session.reply(errors.NOT_INTEGER)
        return i + 1
    if db == session.db:
        session.reply(OK)
        return i + 1
    return session._start_pin(frames, i)     # another database: a dedicated connection selects it


# -- the unsubscribe family outside pub/sub ----------------------------------------------------------

def _unsubscribe(session, frames, i) -> int:
    """Not subscribed to anything (a subscribed client is a relay): Redis's reply per channel, or one
    with a null channel, each with a count of 0; RESP3 sends them as pushes."""
    args = frames[i]
    kind = args[0].lower()
    head = b">3\r\n" if session.proto == 3 else b"*3\r\n"
    null = b"_\r\n" if session.proto == 3 else b"$-1\r\n"
    name = b"$%d\r\n%s\r\n" % (len(kind), kind)
    channels = [b"$%d\r\n%s\r\n" % (len(c), c) for c in args[1:]] or [null]
    session.reply(b"".join(head + name + channel + b":0\r\n" for channel in channels))
    return i + 1


# -- CLIENT ------------------------------------------------------------------------------------------

def _client(session, frames, i) -> int:
    args = frames[i]
    sub = args[1].upper()
    handler = _CLIENT.get(sub)
    if handler is None:
        session.send_commands([args])     # PAUSE, UNPAUSE, HELP, CACHING ...: Redis answers once
        return i + 1
    return handler(session, frames, i)


def _client_reply(session, frames, i) -> int:
    args = frames[i]
    mode = args[2].upper() if len(args) == 3 else b""
    if mode == b"ON":
        session.reply(OK)
    elif mode in (b"OFF", b"SKIP"):
        return session._start_relay(frames, i)      # replies stop pairing with requests
    else:
        session.reply(errors.SYNTAX)
    return i + 1


def _client_tracking(session, frames, i) -> int:
    args = frames[i]
    mode = args[2].upper() if len(args) >= 3 else b""
    if mode == b"ON":
        problem = tracking_redirect(session, args)[1]
        if problem is not None:             # refused before the client becomes a relay
            session.reply(problem)
            return i + 1
        # Invalidations arrive as pushes on the connection; the relay sends REDIRECT with Redis's id.
        return session._start_relay(frames, i)
    if mode == b"OFF":
        session.reply(OK)
    else:
        session.reply(errors.SYNTAX)
    return i + 1


def tracking_redirect(session, args: list[bytes]) -> tuple[list[bytes], bytes | None]:
    """CLIENT TRACKING ON ... REDIRECT <id>: <id> is a client of the proxy (its CLIENT ID); Redis must
    get the id of that client's own upstream connection, which exists only while it is a relay
    (subscribed). Returns (the arguments to send, None) or (args, the error to answer)."""
    upper = [a.upper() for a in args]
    if b"REDIRECT" not in upper[3:]:
        return args, None
    at = upper.index(b"REDIRECT", 3) + 1
    if at >= len(args):
        return args, errors.SYNTAX
    if session.pool.cluster:
        return args, errors.TRACKING_REDIRECT_CLUSTER
    try:
        wanted = int(args[at])
    except ValueError:
        return args, errors.NOT_INTEGER
    target = next((s for s in session.host.sessions if s.id == wanted), None)
    if target is None:
        # A relayed client's CLIENT ID is answered by Redis: that id names a relay's own connection.
        if any(s.relay is not None and s.relay.redis_id == wanted for s in session.host.sessions):
            return args, None
        return args, errors.TRACKING_REDIRECT_UNKNOWN
    conn = target.relay
    if conn is None or conn.redis_id is None:
        return args, errors.TRACKING_REDIRECT_NOT_SUBSCRIBED
    return [*args[:at], b"%d" % conn.redis_id, *args[at + 1:]], None


def _client_setname(session, frames, i) -> int:
    args = frames[i]
    if len(args) != 3:
        session.reply(errors.wrong_arity(b"client|setname"))
        return i + 1
    problem = _bad_name(args[2])
    if problem:
        session.reply(problem)
        return i + 1
    session.name = args[2] or None
    session.reply(OK)
    return i + 1


def _bad_name(name: bytes) -> bytes | None:
    if any(c < 33 or c > 126 for c in name):
        return errors.BAD_CLIENT_NAME
    return None


def _client_getname(session, frames, i) -> int:
    session.reply(encode_reply(session.name, session.proto))
    return i + 1


def _client_id(session, frames, i) -> int:
    session.reply(b":%d\r\n" % session.id)
    return i + 1


def _client_setinfo(session, frames, i) -> int:
    args = frames[i]
    if len(args) != 4:
        session.reply(errors.wrong_arity(b"client|setinfo"))
    elif args[2].upper() not in (b"LIB-NAME", b"LIB-VER"):
        session.reply(errors.unrecognized_option(args[2]))
    else:
        session.reply(OK)      # library names are per proxy client; the upstream sees the proxy
    return i + 1


def _client_no_flag(session, frames, i) -> int:
    """NO-EVICT / NO-TOUCH on|off: accepted; they would apply to a shared connection, so they are not
    sent (documented)."""
    args = frames[i]
    if len(args) != 3 or args[2].upper() not in (b"ON", b"OFF"):
        session.reply(errors.SYNTAX)
    else:
        session.reply(OK)
    return i + 1


def _client_getredir(session, frames, i) -> int:
    session.reply(b":-1\r\n")
    return i + 1


def _client_list(session, frames, i) -> int:
    args = frames[i]
    sessions = sorted(session.host.sessions, key=lambda s: s.id)
    rest = args[2:]
    if rest and rest[0].upper() == b"ID":
        try:
            wanted = {int(a) for a in rest[1:]}
        except ValueError:
            session.reply(errors.INVALID_CLIENT_ID)
            return i + 1
        sessions = [s for s in sessions if s.id in wanted]
    elif rest and rest[0].upper() == b"TYPE" and len(rest) == 2:
        kind = rest[1].lower()
        if kind not in (b"normal", b"pubsub", b"master", b"replica", b"slave"):
            session.reply(errors.unknown_client_type(rest[1]))
            return i + 1
        sessions = [s for s in sessions if _client_type(s) == kind]
    elif rest:
        session.reply(errors.SYNTAX)
        return i + 1
    text = "".join(client_line(s) + "\n" for s in sessions)
    session.reply(encode_reply(text, session.proto) if session.proto == 2 else _verbatim(text))
    return i + 1


def _client_info(session, frames, i) -> int:
    text = client_line(session) + "\n"
    session.reply(encode_reply(text, 2) if session.proto == 2 else _verbatim(text))
    return i + 1


def _verbatim(text: str) -> bytes:
    body = b"txt:" + text.encode()
    return b"=%d\r\n%s\r\n" % (len(body), body)


def _client_type(session) -> bytes:
    return b"pubsub" if session.relay is not None else b"normal"


def _address(session, which: str) -> str:
    transport = session.transport
    info = transport.get_extra_info(which) if transport is not None else None
    if isinstance(info, tuple) and len(info) >= 2:
        return f"{info[0]}:{info[1]}"
    return "?:0"


def client_line(s) -> str:
    """One line of CLIENT LIST in Redis's format, about a client of the proxy."""
    now = s.host.clock
    age = int(max(0.0, now - s.connected_at))
    idle = int(max(0.0, now - s.last_active))
    flags = "P" if s.relay is not None else ("x" if s.tx is not None else "N")
    name = (s.name or b"").decode(errors="replace")
    return (f"id={s.id} addr={_address(s, 'peername')} laddr={_address(s, 'sockname')} fd=-1 name={name} "
            f"age={age} idle={idle} flags={flags} db={s.db} sub=0 psub=0 ssub=0 "
            f"multi={len(s.tx.commands) if s.tx is not None else -1} qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 "
            f"rbs=0 rbp=0 obl=0 oll={len(s.order.slots)} omem=0 tot-mem=0 events=r cmd={_command_name(s)} "
            f"user={s.user.decode(errors='replace')} redir=-1 resp={s.proto}")


# Commands whose CLIENT LIST name includes the subcommand (Redis 7: "client|list", "config|get" ...).
_CONTAINERS = frozenset((b"client", b"config", b"command", b"object", b"memory", b"script", b"function",
                         b"acl", b"cluster", b"xinfo", b"xgroup", b"pubsub", b"latency", b"slowlog", b"module"))


def _command_name(s) -> str:
    """The last command the client sent, named as Redis's CLIENT LIST names it."""
    args = s.last_command
    if not args or not isinstance(args[0], bytes):
        return "NULL"
    name = args[0].lower()
    if name in _CONTAINERS and len(args) > 1:
        name += b"|" + args[1].lower()
    return name.decode(errors="replace")


def _client_kill(session, frames, i) -> int:
    """CLIENT KILL about the proxy's own clients (never the upstream's connections, which other
    clients share): the old form `CLIENT KILL addr:port`, or filters ID, ADDR, LADDR, USER, TYPE, SKIPME."""
    args = frames[i]
    sessions = list(session.host.sessions)
    if len(args) == 3:
        wanted = args[2].decode(errors="replace")
        victims = [s for s in sessions if _address(s, "peername") == wanted]
        if not victims:
            session.reply(errors.NO_SUCH_CLIENT)
            return i + 1
        _kill(victims)
        session.reply(OK)
        return i + 1
    filters, skipme = list(zip(args[2::2], args[3::2], strict=False)), True
    if len(args) % 2:
        session.reply(errors.SYNTAX)
        return i + 1
    victims = sessions
    for key, value in filters:
        key = key.upper()
        text = value.decode(errors="replace")
        if key == b"ID":
            if not text.isdigit():
                session.reply(errors.CLIENT_ID_NOT_POSITIVE)
                return i + 1
            victims = [s for s in victims if s.id == int(text)]
        elif key == b"ADDR":
            victims = [s for s in victims if _address(s, "peername") == text]
        elif key == b"LADDR":
            victims = [s for s in victims if _address(s, "sockname") == text]
        elif key == b"USER":
            victims = [s for s in victims if s.user == value]
        elif key == b"TYPE":
            victims = [s for s in victims if _client_type(s) == value.lower()]
        elif key == b"SKIPME":
            if value.lower() not in (b"yes", b"no"):
                session.reply(errors.SYNTAX)
                return i + 1
            skipme = value.lower() == b"yes"
        else:
            session.reply(errors.SYNTAX)
            return i + 1
    if skipme:
        victims = [s for s in victims if s is not session]
    killed = _kill(victims)
    session.reply(b":%d\r\n" % killed)
    return i + 1


def _kill(victims) -> int:
    killed = 0
    for victim in victims:
        if victim.transport is not None:
            victim.closing = True
            victim.transport.close()
            killed += 1
    return killed


_CLIENT = {
    b"ID": _client_id, b"GETNAME": _client_getname, b"SETNAME": _client_setname,
    b"SETINFO": _client_setinfo, b"REPLY": _client_reply, b"TRACKING": _client_tracking,
    b"NO-EVICT": _client_no_flag, b"NO-TOUCH": _client_no_flag, b"GETREDIR": _client_getredir,
    b"LIST": _client_list, b"INFO": _client_info, b"KILL": _client_kill,
}

_HANDLERS = {
    b"PING": _ping, b"ECHO": _echo, b"QUIT": _quit, b"AUTH": _auth, b"HELLO": _hello, b"RESET": _reset,
    b"SELECT": _select, b"CLIENT": _client, b"UNSUBSCRIBE": _unsubscribe, b"PUNSUBSCRIBE": _unsubscribe,
    b"SUNSUBSCRIBE": _unsubscribe, b"ASKING": _ok, b"READONLY": _ok, b"READWRITE": _ok,
}
