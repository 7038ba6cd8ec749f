"""The outbound hosts a sandboxed worker may reach (``profiles.NAME.allowed_hosts``): the entries,
how a request is matched against them, and which resolved addresses an entry lets through.

An entry is ``host``, ``host:port``, ``*.suffix`` or ``*.suffix:port``; a host is a DNS name, an IPv4
address, or an IPv6 address in brackets (``[::1]:8080``). Without a port an entry allows 80 and 443
only. ``*.example.com`` matches every name under ``example.com`` (``a.example.com``,
``a.b.example.com``), not ``example.com`` itself. Matching is on the name the client asked for
(lower-cased, one trailing dot dropped), never on what it resolves to.

**The address rule.** A name that matched is resolved by the daemon, and every address it resolves
to must be a public one (`ipaddress`'s ``is_global``): a loopback, link-local, private, shared,
reserved or multicast address is refused, so a DNS name (``redis.example.com`` → 127.0.0.1) cannot
point a worker at the daemon's Redis or at the cloud's metadata service. Only an entry that names
the address itself (``127.0.0.1:6379``) or ``localhost`` (loopback addresses only) reaches such an
address: an operator who writes that means it.

>>> allow = AllowList.of(["pypi.org", "*.pythonhosted.org:443", "127.0.0.1:8000"])
>>> [bool(allow.match(h, p)) for h, p in (("PyPI.org.", 443), ("pypi.org", 22), ("files.pythonhosted.org", 443),
...                                        ("pythonhosted.org", 443), ("127.0.0.1", 8000), ("localhost", 8000))]
[True, False, True, False, True, False]
>>> rule = allow.match("pypi.org", 443)
>>> ip = ipaddress.ip_address
>>> address_allowed(rule, ip("151.101.0.223")), address_allowed(rule, ip("10.0.0.5"))
(True, False)
>>> address_allowed(allow.match("127.0.0.1", 8000), ipaddress.ip_address("127.0.0.1"))
True
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The ports an entry without one allows: the web's.
DEFAULT_PORTS = frozenset({80, 443})
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_MAX_NAME_CHARS = 253


@dataclass(frozen=True)
class HostRule:
    """One entry of an allow-list, parsed."""

    host: str  # a name (for a wildcard: the suffix after ``*.``) or an address's text
    port: int | None  # None: `DEFAULT_PORTS`
    wildcard: bool = False
    address: IPAddress | None = None  # set when the entry is an address literal

    def __str__(self) -> str:
        host = f"[{self.host}]" if isinstance(self.address, ipaddress.IPv6Address) else self.host
        host = f"*.{host}" if self.wildcard else host
        return host if self.port is None else f"{host}:{self.port}"

    def matches(self, host: str, port: int) -> bool:
        """``host`` as `normalise_host` gives it."""
        if port not in (DEFAULT_PORTS if self.port is None else {self.port}):
            return False
        return host.endswith("." + self.host) if self.wildcard else host == self.host


def split_host_port(text: str) -> tuple[str, int | None]:
    """``host[:port]`` or ``[v6][:port]`` into its parts; `ValueError` for a malformed port.

    >>> split_host_port("[::1]:80"), split_host_port("example.com"), split_host_port("a:443")
    (('::1', 80), ('example.com', None), ('a', 443))
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: an IPv6 address is written [address] or [address]:port")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_ = text.rpartition(":")
        if not colon:
            return text, None
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, [address]:port")
        port_text = port_text_
    if port_text is None:
        return host, None
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def parse_address(host: str) -> IPAddress | None:
    """``host`` as an address when it is an address literal (strictly: ``127.1`` is not one)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def normalise_host(host: str) -> str:
    """A requested host as entries are matched against it: lower-case, one trailing dot dropped, an
    address in its canonical text; `ValueError` when it is neither a valid name nor an address."""
    address = parse_address(host)
    if address is not None:
        return str(address)
    name = host.lower()
    name = name[:-1] if name.endswith(".") else name
    if not name.isascii() or len(name) > _MAX_NAME_CHARS or not all(_LABEL.match(label) for label in name.split(".")):
        raise ValueError(f"{host[:80]!r} is not a host name (letters, digits and hyphens; IDNs as xn--)")
    return name


def parse_entry(entry: str) -> HostRule:
    """One ``allowed_hosts`` entry; `ValueError` saying what is wrong with it."""
    if not entry or entry != entry.strip() or any(c in entry for c in "/@?#% \t"):
        raise ValueError(f"{entry!r}: an entry is host or host:port (no scheme, path, user or spaces)")
    host, port = split_host_port(entry)
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    elif "*" in host:
        raise ValueError(f"{entry!r}: a wildcard is a leading *. (as in *.example.com)")
    address = parse_address(host)
    if address is not None:
        if wildcard:
            raise ValueError(f"{entry!r}: an address cannot have a wildcard")
        if isinstance(address, ipaddress.IPv6Address) and not entry.startswith("["):
            raise ValueError(f"{entry!r}: write an IPv6 address in brackets, [address] or [address]:port")
        return HostRule(str(address), port, address=address)
    try:
        name = normalise_host(host)
    except ValueError:
        raise ValueError(f"{entry!r}: {host[:80]!r} is not a host name (letters, digits and hyphens; "
                         "IDNs as xn--)") from None
    if name != host.lower() or name.endswith("."):
        raise ValueError(f"{entry!r}: write the name without a trailing dot")
    if wildcard and (name.count(".") < 1 or name.replace(".", "").isdigit()):
        raise ValueError(f"{entry!r}: a wildcard needs a domain of two labels at least (*.example.com)")
    return HostRule(name, port, wildcard=wildcard)


@dataclass(frozen=True)
class AllowList:
    """A profile's parsed ``allowed_hosts``; empty: no egress at all."""

    rules: tuple[HostRule, ...] = ()

    @classmethod
    def of(cls, entries: Iterable[str]) -> AllowList:
        return cls(tuple(parse_entry(entry) for entry in entries))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, host: str, port: int) -> HostRule | None:
        """The first entry that allows ``host:port`` (``host`` as requested), else None."""
        try:
            name = normalise_host(host)
        except ValueError:
            return None
        return next((rule for rule in self.rules if rule.matches(name, port)), None)


def address_allowed(rule: HostRule, address: IPAddress) -> bool:
    """Whether ``rule`` (the entry a request matched) lets a connection go to ``address`` (see the
    module's docstring: public addresses, or the very address or ``localhost`` the entry names)."""
    if rule.address is not None:
        return address == rule.address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if rule.host == "localhost" and not rule.wildcard:
        return address.is_loopback
    return address.is_global and not address.is_multicast
