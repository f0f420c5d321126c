"""A deadline for each request's header, which uvicorn does not have.

uvicorn closes a kept-alive connection that stays idle after a response
(``timeout_keep_alive``), but neither a connection that never sends a request nor one that
sends its header a byte at a time (slowloris): each holds a connection, and with
``limit_concurrency`` a few hundred of them shut everyone else out. The protocols here are
uvicorn's own (httptools when installed, as uvicorn's ``auto`` picks, else h11) with one
addition: from a connection's opening, and from the first byte of each later request, the
request's header must be complete within ``config.header_timeout_s`` seconds, else the
connection is closed. (A late body is the application's: ``--request-timeout-s`` answers 408.)

uvicorn imports the class named in its config (``http=``), in each worker too.
"""

from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_ATTRIBUTE = "header_timeout_s"  # set on the uvicorn Config (it travels to the workers with it)


class _HeaderDeadline:
    """Mixin for a uvicorn HTTP protocol: a request whose header is not complete within
    the deadline closes its connection. A request's header is complete once the protocol
    has begun a new request-response cycle for it (``self.cycle`` replaced)."""

    _header_timer = None
    _header_cycle = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and (self._header_timer is None or self._header_cycle is not self.cycle):
            self._arm_header_deadline()  # the first bytes of a new request: its header is due within the deadline
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._header_cycle:
            self._disarm_header_deadline()  # the header is complete

    def connection_lost(self, exc) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        timeout = getattr(self.config, HEADER_TIMEOUT_ATTRIBUTE, None)
        if timeout:
            self._header_cycle = self.cycle
            self._header_timer = self.loop.call_later(timeout, self._header_overdue)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_overdue(self) -> None:
        self._header_timer = None
        if self.cycle is self._header_cycle and not self.transport.is_closing():  # no request began since the deadline was set
            self.transport.close()


class H11HeaderDeadlineProtocol(_HeaderDeadline, H11Protocol):
    pass


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is optional; uvicorn then uses h11 too
    HeaderDeadlineProtocol = H11HeaderDeadlineProtocol
else:
    class HeaderDeadlineProtocol(_HeaderDeadline, HttpToolsProtocol):  # type: ignore[no-redef]
        pass


PROTOCOL = f"{__name__}:HeaderDeadlineProtocol"
