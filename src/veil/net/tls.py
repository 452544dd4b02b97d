"""TCP channels with mutual TLS, on asyncio streams (Python's ``ssl`` module over OpenSSL, TLS 1.3).

Why asyncio/ssl streams: the standard library's TLS is OpenSSL, well maintained and audited; asyncio
lets one background event loop own every socket (an OpenSSL connection must not be read and written
from two threads at once), while parties keep a simple blocking ``send``/``recv`` API. ZeroMQ/CURVE
or gRPC would add a dependency without adding a property we need (mutual authentication by a
deployment CA, confidentiality, framing).

Authentication: every party holds a certificate from the deployment CA whose name is the party's
name. The connecting side checks the server's name (TLS hostname check against the party name);
the accepting side requires a client certificate from the same CA and checks its common name is
the peer it expects. A certificate from another CA, or for another name, is refused.

Who connects: for every pair, the party whose name sorts later connects to the other, which
listens on its deployment address. Connections are retried until ``connect_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import ssl
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any

from veil.errors import (
    ChannelError,
    DeploymentError,
    PeerAbortedError,
    PeerAuthError,
    PeerDisconnectedError,
    PeerTimeoutError,
)
from veil.net.channel import Channel, abort_reason
from veil.net.deployment import Deployment
from veil.net.keys import key_paths
from veil.net.wire import decode_abort, encode_abort, is_abort

__all__ = ["TLSChannel", "connect_tls"]

log = logging.getLogger("veil.net.tls")
_HEADER = struct.Struct("<Q")
_MAX_FRAME = 16 << 30
_EOF = object()
_BUFFER = 16 << 20  # stream buffer: large frames are read without pausing the socket every 64 KiB
_DRAIN_ABOVE = 64 << 20  # a sender waits for the socket only when this much is still unsent
_LINGER_S = 2.0  # after a failed setup, how long a party waits for late peers to tell them why


def _contexts(deployment: Deployment, me: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca, cert, key = key_paths(deployment.keys_dir, me)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for ctx in (server, client):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_cert_chain(cert, key)
            ctx.load_verify_locations(ca)
        except (ssl.SSLError, OSError) as e:
            raise DeploymentError(f"party {me!r}: cannot load its key files from {deployment.keys_dir}: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    client.check_hostname = True
    return server, client


def _common_name(peercert: Any) -> str | None:
    for rdn in (peercert or {}).get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return str(v)
    return None


class TLSChannel(Channel):
    """A party's mutual-TLS connections to its peers (see the module docstring)."""

    def __init__(self, deployment: Deployment, me: str, peers: Iterable[str] | None = None,
                 timeout: float | None = None, connect_timeout: float | None = None):
        peers = [p for p in (peers if peers is not None else deployment.parties) if p != me]
        for p in [me, *peers]:
            deployment.party(p)
        super().__init__(me, peers, deployment.timeout if timeout is None else timeout)
        self._dep = deployment
        self._connect_timeout = self.timeout if connect_timeout is None else connect_timeout
        self._server_ctx, self._client_ctx = _contexts(deployment, me)
        self._inbox: dict[str, queue.Queue[object]] = {p: queue.Queue() for p in self.peers}
        self._writers: dict[str, asyncio.StreamWriter] = {}
        self._errors: dict[str, BaseException] = {}
        self._refused: list[str] = []
        self._established = False
        self._setup_failed: asyncio.Future[BaseException] | None = None
        self._abort_frame: bytes | None = None  # set when the setup failed: sent to every peer that connects
        self._deadline = time.monotonic() + self._connect_timeout
        self._linger_s = min(_LINGER_S, self._connect_timeout)
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(lambda loop, ctx: log.debug("asyncio: %s", ctx.get("message")))
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"veil-tls-{me}", daemon=True)
        self._thread.start()
        self._server: asyncio.base_events.Server | None = None
        try:
            asyncio.run_coroutine_threadsafe(self._establish(), self._loop).result(self._connect_timeout + 5)
        except BaseException as e:
            self._give_up(e)
            self.close()
            raise

    # --- setup ----------------------------------------------------------------------------------
    def _give_up(self, error: BaseException) -> None:
        """The setup failed: tell every peer why, waiting a few seconds for peers that are still
        starting (they connect, learn the reason and stop) instead of leaving them to their timeout."""
        self._abort_frame = encode_abort(*abort_reason(error))
        self.abort(error)  # the peers connected so far
        if not self._loop.is_running() or isinstance(error, KeyboardInterrupt):
            return

        async def linger() -> None:
            end = min(time.monotonic() + self._linger_s, self._deadline)
            while time.monotonic() < end and set(self.peers) - set(self._writers):
                await asyncio.sleep(0.05)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(linger(), self._loop).result(self._linger_s + 1)

    def _fail_setup(self, error: BaseException) -> None:
        """Stop the setup now (a refused handshake, or a peer's abort notice during setup)."""
        if not self._established and self._setup_failed is not None and not self._setup_failed.done():
            self._setup_failed.set_result(error)

    async def _establish(self) -> None:
        """Connect to and accept from every peer; stop early when a handshake is refused or a
        connected peer sends an abort notice (so honest parties do not wait for the timeout)."""
        accept_from = {p for p in self.peers if p > self.me}
        connect_to = [p for p in self.peers if p < self.me]
        all_in = asyncio.Event()
        if not accept_from:
            all_in.set()
        self._setup_failed = self._loop.create_future()
        handshake_timeout = min(10.0, self._connect_timeout)

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # TLS is started here rather than by the server, so a refused handshake is seen (asyncio
            # drops server-side handshake errors silently) and stops the setup at once.
            addr = writer.get_extra_info("peername")
            where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else "an unknown address"
            try:
                await writer.start_tls(self._server_ctx, ssl_handshake_timeout=handshake_timeout)
            except (ssl.SSLError, OSError, TimeoutError) as e:
                reason = getattr(e, "reason", None) or type(e).__name__
                msg = (f"party {self.me!r}: a connection from {where} failed the mutual-TLS handshake ({reason}): "
                       "a party with a certificate not issued by this deployment's CA (or none), or a peer that "
                       "refused this party's certificate")
                log.log(logging.WARNING if self._established else logging.DEBUG, "%s", msg)  # else it is the error
                self._refused.append(f"a connection from {where} ({reason})")
                writer.close()
                if not isinstance(e, TimeoutError):  # a slow handshake is not a refusal; a broken one is
                    self._fail_setup(PeerAuthError(msg))
                return
            cn = _common_name(writer.get_extra_info("peercert"))
            if cn not in accept_from or cn in self._writers:
                self._refused.append(f"a connection from {cn!r}")
                log.warning("party %s refused a connection from %r (expected one of %s)", self.me, cn, sorted(accept_from))
                writer.close()
                return
            self._attach(cn, reader, writer)
            if accept_from <= set(self._writers):
                all_in.set()

        if accept_from:
            me = self._dep.party(self.me)
            try:
                self._server = await asyncio.start_server(on_client, me.host, me.port, limit=_BUFFER)
            except OSError as e:
                raise ChannelError(f"party {self.me!r} cannot listen on {me.address}: {e.strerror or e}") from None
        deadline = self._deadline = time.monotonic() + self._connect_timeout
        # connection attempts outlive a failed setup (shielded), so that the abort reaches late peers
        connects = [asyncio.ensure_future(self._connect(p, deadline)) for p in connect_to]

        async def connect_and_accept() -> None:
            await asyncio.gather(*(asyncio.shield(c) for c in connects))
            try:
                await asyncio.wait_for(all_in.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                missing = sorted(accept_from - set(self._writers))
                extra = f"; refused {', '.join(self._refused)}" if self._refused else ""
                raise PeerTimeoutError(f"party {self.me!r}: {missing} did not connect within "
                                       f"{self._connect_timeout:g} s{extra}", peer=missing[0] if missing else None) from None

        work = asyncio.ensure_future(connect_and_accept())
        try:
            waiters: set[asyncio.Future[Any]] = {work, self._setup_failed}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if self._setup_failed.done():
            raise self._setup_failed.result()
        work.result()
        self._established = True

    async def _connect(self, peer: str, deadline: float) -> None:
        addr = self._dep.party(peer)
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(addr.host, addr.port, ssl=self._client_ctx, server_hostname=peer,
                                            limit=_BUFFER),
                    max(0.1, deadline - time.monotonic()))
                self._attach(peer, reader, writer)
                return
            except ssl.SSLCertVerificationError as e:
                raise PeerAuthError(f"party {self.me!r}: the server at {addr.address} is not {peer!r} of this "
                                    f"deployment ({e.verify_message})", peer=peer) from None
            except ssl.SSLError as e:
                raise PeerAuthError(f"party {self.me!r}: TLS with {peer!r} at {addr.address} failed ({e.reason})",
                                    peer=peer) from None
            except (OSError, TimeoutError) as e:
                last = e
                await asyncio.sleep(0.05)
        raise PeerTimeoutError(f"party {self.me!r}: could not reach {peer!r} at {addr.address} within "
                               f"{self._connect_timeout:g} s ({type(last).__name__ if last else 'timeout'})", peer=peer)

    def _attach(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers[peer] = writer
        if self._abort_frame is not None:  # connected after this party's setup failed: tell it why
            self._write_frame(writer, self._abort_frame)
        self._loop.create_task(self._read_loop(peer, reader))

    async def _read_loop(self, peer: str, reader: asyncio.StreamReader) -> None:
        box = self._inbox[peer]
        try:
            while True:
                (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                if n > _MAX_FRAME:
                    raise ChannelError(f"frame of {n} bytes from {peer!r} exceeds the limit")
                frame = await reader.readexactly(n)
                if not self._established and is_abort(frame):  # a peer gave up during setup: so do we
                    self._fail_setup(PeerAbortedError(self.me, peer, *decode_abort(frame)))
                box.put(frame)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ChannelError) as e:
            if isinstance(e, ssl.SSLError):
                self._errors[peer] = PeerAuthError(f"party {self.me!r}: {peer!r} rejected this party's certificate "
                                                   f"or TLS failed ({e.reason})", peer=self.me)
            # a peer that leaves during the setup has given up: stop waiting for the others too
            self._fail_setup(self._errors.get(peer) or PeerDisconnectedError(
                f"party {self.me!r}: {peer!r} closed the connection during the setup", peer=peer))
            box.put(_EOF)
        except asyncio.CancelledError:
            box.put(_EOF)

    # --- Channel backend ------------------------------------------------------------------------
    def _send_bytes(self, peer: str, data: bytes) -> None:
        if self._closed:
            raise ChannelError(f"party {self.me!r}: channel is closed")
        w = self._writers.get(peer)
        if w is None or w.is_closing():
            raise PeerDisconnectedError(f"party {self.me!r}: {peer!r} closed the connection or died (send failed)",
                                        peer=peer)

        # Fast path: hand the frame to the event loop and return (one thread hand-off, no wait).
        # A dead peer then shows up at the next receive; a slow peer makes senders wait below.
        transport = w.transport
        if transport.get_write_buffer_size() < _DRAIN_ABOVE:
            self._loop.call_soon_threadsafe(self._write_frame, w, data)
            return

        async def write_and_drain() -> None:
            self._write_frame(w, data)
            await w.drain()

        fut = asyncio.run_coroutine_threadsafe(write_and_drain(), self._loop)
        try:
            fut.result(self.timeout)
        except TimeoutError:
            fut.cancel()
            raise PeerTimeoutError(f"party {self.me!r}: {peer!r} did not take a message within {self.timeout:g} s",
                                   peer=peer) from None
        except (ConnectionError, OSError) as e:
            raise PeerDisconnectedError(f"party {self.me!r}: sending to {peer!r} failed ({type(e).__name__})",
                                        peer=peer) from None

    def _send_abort_bytes(self, peer: str, data: bytes) -> None:
        w = self._writers.get(peer)
        if w is not None and not w.is_closing() and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._write_frame, w, data)  # never waits for a slow peer

    @staticmethod
    def _write_frame(w: asyncio.StreamWriter, data: bytes) -> None:
        if not w.is_closing():
            w.write(_HEADER.pack(len(data)) + data if len(data) < 65536 else _HEADER.pack(len(data)))
            if len(data) >= 65536:
                w.write(data)

    def _recv_bytes(self, peer: str, timeout: float) -> bytes:
        try:
            item = self._inbox[peer].get(timeout=timeout)
        except queue.Empty:
            raise PeerTimeoutError(f"party {self.me!r}: no message from {peer!r} within {timeout:g} s", peer=peer) from None
        if item is _EOF:
            self._inbox[peer].put(_EOF)
            err = self._errors.get(peer)
            if err is not None:
                raise err
            raise PeerDisconnectedError(f"party {self.me!r}: {peer!r} closed the connection or died", peer=peer)
        assert isinstance(item, bytes)
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            for w in self._writers.values():  # deliver what was sent before closing
                try:
                    await asyncio.wait_for(w.drain(), 5)
                except (TimeoutError, ConnectionError, OSError):
                    pass
                w.close()
            if self._server is not None:
                self._server.close()
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


def connect_tls(deployment: Deployment, me: str, peers: Iterable[str] | None = None, timeout: float | None = None,
                connect_timeout: float | None = None) -> TLSChannel:
    """Open ``me``'s mutual-TLS connections to ``peers`` (default: every other party)."""
    return TLSChannel(deployment, me, peers, timeout, connect_timeout)
