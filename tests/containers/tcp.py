"""A database URL a container can use: TCP on 127.0.0.1, whatever the test server is.

The embedded PostgreSQL of the tests listens on a Unix socket in its data folder, which a
container (another user, another mount namespace) cannot open. ``reachable`` then relays
a port of 127.0.0.1 to that socket, byte for byte, for as long as the test needs it.
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from sqlalchemy.engine import make_url


def _relay(client: socket.socket, server: socket.socket) -> None:
    """Both directions until either side closes; then both sockets are closed."""
    with client, server, selectors.DefaultSelector() as selector:
        selector.register(client, selectors.EVENT_READ, server)
        selector.register(server, selectors.EVENT_READ, client)
        with suppress(OSError):
            while True:
                for key, _ in selector.select():
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)


@contextmanager
def reachable(url: str) -> Iterator[str]:
    """``url`` itself when it names a TCP host; else the same database through a relay."""
    parsed = make_url(url)
    folder = parsed.query.get("host")
    if not (isinstance(folder, str) and folder.startswith("/")) and parsed.host:
        yield url
        return
    path = f"{folder or '/var/run/postgresql'}/.s.PGSQL.{parsed.port or 5432}"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = int(listener.getsockname()[1])

    def accept() -> None:
        with suppress(OSError):
            while True:
                client, _ = listener.accept()
                server = socket.socket(socket.AF_UNIX)
                try:
                    server.connect(path)
                except OSError:
                    client.close()
                    server.close()
                    continue
                threading.Thread(target=_relay, args=(client, server), daemon=True).start()

    threading.Thread(target=accept, name="postgres-relay", daemon=True).start()
    query = {k: v for k, v in parsed.query.items() if k != "host"}
    try:
        yield parsed.set(host="127.0.0.1", port=port, query=query)\
            .render_as_string(hide_password=False)  # fmt: skip
    finally:
        listener.close()
