"""A raw HTTP peer for tests of the peer exchange's client: it answers what a test
scripts, however wrong."""
import socket
import threading
from typing import Callable

import testtools


class ScriptedPeer:
    """Accepts connections, reads each request's head, then runs ``answer(sock)`` in a
    thread of its own; connections stay open until the test ends."""

    def __init__(self, test: testtools.TestCase, answer: Callable[[socket.socket], None]):
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.url = f'http://127.0.0.1:{self.listener.getsockname()[1]}'
        self.answer = answer
        self.connections: list[socket.socket] = []
        test.addCleanup(self.close)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.connections.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        head = b''
        try:
            while b'\r\n\r\n' not in head:
                data = sock.recv(4096)
                if not data:
                    return
                head += data
            self.answer(sock)
        except OSError:
            pass  # the client gave up

    def close(self) -> None:
        self.listener.close()
        for sock in self.connections:
            sock.close()


def answer(data: bytes) -> Callable[[socket.socket], None]:
    """A ScriptedPeer's answer: send ``data``, whatever was asked."""
    return lambda sock: sock.sendall(data)
