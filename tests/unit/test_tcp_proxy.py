"""``tests.support.tcp_proxy.TcpProxy``: closed, it ends its pipes, whatever they wait on."""

from __future__ import annotations

import socket

from tests.support.polling import wait_until
from tests.support.redis_server import free_port
from tests.support.tcp_proxy import TcpProxy


def test_a_proxy_closed_while_both_ends_are_silent_ends_its_pipes() -> None:
    """Both pipes of a connection blocked reading (the server and the client sending
    nothing, neither gone): closing the proxy closed their sockets, which wakes no
    thread blocked on one, and each thread was left blocked for good after a 5 s join
    (25-50 s of a test whose proxy was closed before the pipes saw its broker go)."""
    server = socket.create_server(("127.0.0.1", free_port()))
    proxy = TcpProxy(server.getsockname()[1]).start()
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    held, _ = server.accept()  # (the proxy's upstream connection: both pipes run)
    try:
        wait_until(lambda: len(proxy._threads) == 3, timeout=5, what="the two pipes")
        proxy.close()
        alive = [thread.name for thread in proxy._threads if thread.is_alive()]
        assert alive == [], alive
    finally:
        for sock in (client, held, server):
            sock.close()
