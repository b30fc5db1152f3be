"""A loopback peer that stops answering: a remote store whose network drops packets."""
import socket
import threading


class SilentPeer:
    """A loopback TCP peer that stops answering, as a warehouse whose host or network
    drops packets does: nothing is refused, nothing comes back.

    ``dropping``: its accept queue is kept full, so the kernel drops every new SYN
    and a connect hangs. Otherwise connections are accepted by the kernel and never
    read; with ``prefix``, each accepted one is sent those bytes and then nothing.
    """

    def __init__(self, dropping: bool = False, prefix: bytes = b''):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(0 if dropping else 16)
        self.url = 'http://127.0.0.1:%d' % self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._prefix = prefix
        self._stop = threading.Event()
        self._thread = None
        if dropping:
            self._fill_queue()
        elif prefix:
            self._thread = threading.Thread(target=self._answer_start, daemon=True)
            self._thread.start()

    def _fill_queue(self) -> None:
        for _ in range(8):
            client = socket.socket()
            client.settimeout(0.3)
            self.held.append(client)
            try:
                client.connect(self.sock.getsockname())
            except TimeoutError:
                return  # the queue is full: SYNs are dropped from now on
        raise AssertionError('the accept queue never filled')

    def _answer_start(self) -> None:
        self.sock.settimeout(0.1)
        for _ in range(600):  # a minute at most
            if self._stop.is_set():
                return
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.held.append(conn)
            conn.recv(65536)
            conn.sendall(self._prefix)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for conn in self.held:
            conn.close()
        self.sock.close()
