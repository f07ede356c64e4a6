"""Peer authentication on links that can cross hosts (kind tcp): a mutual
HMAC-SHA256 challenge-response in the link's first frames, keyed by a secret
the cluster makes for itself and hands each node in its spec (a file only
its owner can read). A peer that does not know the secret is refused and the
link closed; nothing else crosses the link before both sides are sure.

    client -> server  HELLO "AUTH1" nonce_c
    server -> client  nonce_s  HMAC(k, "S" nonce_c nonce_s)
    client -> server  HELLO "AUTH2" HMAC(k, "C" nonce_s nonce_c)
    server -> client  (empty: accepted)
"""

from __future__ import annotations

import hashlib
import hmac
import os

from harness._native.transport import Header, Link, Op
from harness.errors import HarnessError, RemoteError

NONCE = 16


class AuthError(HarnessError):
    """A peer failed the cluster's challenge: it does not know the secret."""


def _mac(secret: bytes, who: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, who + first + second, hashlib.sha256).digest()


def authenticate(link: Link, secret: bytes, peer: str, timeout: float = 10.0) -> None:
    """The client's side; raises AuthError unless the server proves it knows
    the secret and accepts our proof."""
    nc = os.urandom(NONCE)
    try:
        r = link.call(Op.HELLO, b"AUTH1" + nc, timeout=timeout)
    except RemoteError as exc:
        raise AuthError(f"{peer} refused to authenticate: {exc}") from None
    ns, mac = r[:NONCE], r[NONCE:]
    if len(ns) != NONCE or not hmac.compare_digest(mac, _mac(secret, b"S", nc, ns)):
        link.close()
        raise AuthError(f"{peer} does not know this cluster's secret; link closed")
    try:
        link.call(Op.HELLO, b"AUTH2" + _mac(secret, b"C", ns, nc), timeout=timeout)
    except RemoteError as exc:
        raise AuthError(f"{peer} rejected this node's proof: {exc}") from None


class Challenge:
    """The server's side, fed the link's frames until the peer is proven."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.nc = self.ns = b""
        self.done = False

    def answer(self, hdr: Header, payload: bytes) -> bytes:
        """The reply to one frame before the peer is proven; raises AuthError
        for anything but the next step of the handshake."""
        if hdr.opcode == Op.HELLO and payload.startswith(b"AUTH1") and not self.nc:
            self.nc, self.ns = payload[5:], os.urandom(NONCE)
            if len(self.nc) != NONCE:
                raise AuthError("a malformed challenge")
            return self.ns + _mac(self.secret, b"S", self.nc, self.ns)
        if hdr.opcode == Op.HELLO and payload.startswith(b"AUTH2") and self.nc:
            if not hmac.compare_digest(payload[5:], _mac(self.secret, b"C", self.ns, self.nc)):
                raise AuthError("the peer does not know this cluster's secret")
            self.done = True
            return b""
        raise AuthError(f"opcode {hdr.opcode:#x} before authenticating")


def prove(link: Link, secret: bytes, peer: str, timeout: float = 10.0) -> None:
    """The server's side on a channel of its own, before anything else is
    served on it: answers the handshake's frames until the peer is proven;
    AuthError (the link closed) if it fails or sends anything else."""
    challenge = Challenge(secret)
    try:
        while not challenge.done:
            hdr, payload = link.recv(timeout=timeout)
            try:
                answer = challenge.answer(hdr, payload)
            except AuthError as exc:
                link.reply(hdr, str(exc).encode(), error=True)
                raise
            link.reply(hdr, answer)
    except AuthError:
        link.close()
        raise
    except HarnessError as exc:
        link.close()
        raise AuthError(f"{peer} did not complete authentication: {exc}") from exc
