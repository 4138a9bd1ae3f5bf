"""Which webhook URLs the provider may send to: a guard against server-side request forgery.

A user-registered URL makes the server send requests from inside the operator's network. By
default only `https` URLs whose host resolves to public addresses only are accepted; the operator's
`webhooks.allowed_hosts` (host names, addresses or networks) lets URLs reach those hosts too, over
`http` as well. The check runs at create and again at each delivery, on the addresses the name
resolves to then: a name that later resolves to 127.0.0.1 or 169.254.169.254 is refused, and the
delivery connects to the address that was checked, not to a second resolution.

    destination = check_url(url, allowed)          # the form: scheme, host, no credentials
    addresses = await resolve_allowed(destination, allowed, resolve)   # each delivery
"""

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnsafeURL(ValueError):
    """The URL may not be sent to; the message says why, in words a user can act on."""


class Unresolvable(UnsafeURL):
    """The URL's host name does not resolve (now: a name registered before its DNS record is fine)."""


@dataclass(frozen=True)
class AllowedHosts:
    """The operator's exceptions to "public https only": host names, and addresses or networks."""

    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> "AllowedHosts":
        names, networks = set(), []
        for entry in entries:
            entry = entry.strip().lower()
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                names.add(entry.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def allows_name(self, host: str) -> bool:
        return host in self.names

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


@dataclass(frozen=True)
class Destination:
    """A URL that passed the form check: where it points."""

    url: str
    scheme: str
    host: str  # lower case, without brackets
    port: int


def check_url(url: str, allowed: AllowedHosts) -> Destination:
    """The form of a webhook URL: http(s), a host, no user or password; `http` and literal private
    addresses only for allowed hosts. Raises UnsafeURL."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise UnsafeURL(f"The URL must be a string of 1 to {MAX_URL_LENGTH} characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"The URL is not valid: {exc}.") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").rstrip(".")
    if scheme not in ("http", "https") or not host:
        raise UnsafeURL("The URL must be an absolute https URL with a host.")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("The URL must not carry a user name or password.")
    if any(ch in url for ch in "\r\n\t ") or any(ord(ch) < 32 for ch in url):
        raise UnsafeURL("The URL must not contain whitespace or control characters.")
    literal = _address(host)
    listed = allowed.allows_name(host) or (literal is not None and allowed.allows_address(literal))
    if scheme == "http" and not listed:
        raise UnsafeURL("The URL must use https.")
    if literal is not None and not listed and not is_public(literal):
        raise UnsafeURL(f"The URL's host {host} is not a public address.")
    return Destination(url, scheme, host, port or (443 if scheme == "https" else 80))


def is_public(address: IPAddress) -> bool:
    """Whether an address is reachable on the public internet: not loopback, private, link-local
    (cloud metadata at 169.254.169.254), shared, reserved or multicast, nor an IPv6 form of one."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if mapped is not None:
            return is_public(mapped)
    return address.is_global and not address.is_multicast


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses a host name resolves to now (the system's resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def resolve_allowed(
    destination: Destination, allowed: AllowedHosts, resolve: Resolver = resolve_host
) -> list[str]:
    """The addresses to connect to for `destination`, each one allowed; raises Unresolvable if the name
    does not resolve, UnsafeURL if any address it resolves to is not (one bad address refuses the whole name:
    a resolver may hand out any of them)."""
    literal = _address(destination.host)
    if literal is not None:
        return [str(literal)]
    try:
        addresses = await resolve(destination.host, destination.port)
    except OSError as exc:
        raise Unresolvable(f"The URL's host {destination.host} does not resolve: {exc}.") from None
    if not addresses:
        raise Unresolvable(f"The URL's host {destination.host} does not resolve.")
    if allowed.allows_name(destination.host):
        return addresses
    for text in addresses:
        address = _address(text)
        if address is None or not (is_public(address) or allowed.allows_address(address)):
            raise UnsafeURL(f"The URL's host {destination.host} resolves to {text}, which is not a public address.")
    return addresses


def _address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None
