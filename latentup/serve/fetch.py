"""URL inputs, fetched only from the operator's allow-list (empty by default: every URL refused), with async I/O on
the event loop (at most ``MAX_FETCHES`` at once), so slow servers never hold the threads that decode and encode.

An entry of ``fetch_hosts`` is ``host`` (the scheme's default port only), ``host:PORT`` or ``host:*`` (any port).
A host name must resolve to public addresses only (not loopback, private, link-local, reserved...) and the fetch
connects to the address that was checked; an IP literal on the list is allowed as listed (the operator named it).
Each hop of a redirect is checked again (at most ``MAX_REDIRECTS``); the body is streamed and cut at ``max_bytes``;
each network operation waits at most ``timeout`` seconds and the whole fetch at most twice that.
"""

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from latentup.serve.tasks import TaskError

MAX_REDIRECTS = 3
MAX_FETCHES = 16
DEFAULT_PORTS = {"http": 80, "https": 443}


def _ip(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class UrlFetcher:
    """``await fetcher(url, parameter) -> bytes`` for allowed hosts; a TaskError naming ``parameter`` otherwise."""

    def __init__(self, allow_hosts, max_bytes: int, timeout: float):
        self.allow: dict[str, set] = {}  # host -> allowed ports ("*" = any)
        for entry in allow_hosts:
            host, port = entry.lower(), None
            if entry.count(":") == 1 or entry.startswith("["):  # host:port or [v6]:port
                host, _, port = host.rpartition(":")
            self.allow.setdefault(host.strip("[]"), set()).add(port)
        self.max_bytes, self.timeout = max_bytes, timeout
        self._slots = asyncio.Semaphore(MAX_FETCHES)

    def _refuse(self, parameter: str, reason: str):
        return TaskError("invalidParameter", f"{parameter}: {reason} (the operator lists allowed hosts in "
                         "fetch_hosts): pass the image as a data URI or base64", parameter)

    async def _address(self, url: str, parameter: str) -> tuple[str, str]:
        """(the URL to connect to, with the checked IP address in place of the name; the Host header)."""
        try:
            parts = urlsplit(url)
            host, port = (parts.hostname or "").lower(), parts.port
        except ValueError:
            raise TaskError("invalidParameter", f"{parameter} is not a valid URL", parameter) from None
        if parts.scheme not in DEFAULT_PORTS or not host:
            raise TaskError("invalidParameter", f"{parameter} is not an http(s) URL with a host", parameter)
        ports = self.allow.get(host)
        port = port or DEFAULT_PORTS[parts.scheme]
        if ports is None:
            raise self._refuse(parameter, f"{host} is not an allowed host")
        if "*" not in ports and str(port) not in ports and not (None in ports and port == DEFAULT_PORTS[parts.scheme]):
            raise self._refuse(parameter, f"port {port} of {host} is not allowed")
        address = _ip(host)
        if address is None:
            try:
                found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                raise TaskError("invalidParameter", f"{parameter}: {host} does not resolve", parameter) from None
            addresses = [_ip(info[4][0].split("%")[0]) for info in found]
            if not addresses or not all(a is not None and a.is_global for a in addresses):
                raise self._refuse(parameter, f"{host} resolves to a non-public address")
            address = addresses[0]
        netloc = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), parts.netloc.rpartition("@")[2]

    async def __call__(self, url: str, parameter: str = "inputs.image") -> bytes:
        async with self._slots:
            try:
                return await asyncio.wait_for(self._fetch(url, parameter), 2 * self.timeout)
            except asyncio.TimeoutError:
                raise TaskError("invalidParameter", f"{parameter}: {url} took over {2 * self.timeout:g} s",
                                parameter) from None

    async def _fetch(self, url: str, parameter: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.timeout, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                target, host = await self._address(url, parameter)
                name = urlsplit(url).hostname
                sni = {"sni_hostname": name} if url.startswith("https:") and _ip(name) is None else {}
                request = client.build_request("GET", target, headers={"Host": host}, extensions=sni)
                try:
                    response = await client.send(request, stream=True)
                    try:
                        if response.is_redirect:
                            url = urljoin(url, response.headers.get("location", ""))
                            continue
                        if response.status_code != 200:
                            raise TaskError("invalidParameter", f"{parameter}: {url} answered HTTP "
                                            f"{response.status_code}", parameter)
                        return await self._read(response, url, parameter)
                    finally:
                        await response.aclose()
                except httpx.HTTPError as error:
                    raise TaskError("invalidParameter", f"{parameter}: fetching {url} failed "
                                    f"({type(error).__name__})", parameter) from None
        raise TaskError("invalidParameter", f"{parameter}: more than {MAX_REDIRECTS} redirects", parameter)

    async def _read(self, response: httpx.Response, url: str, parameter: str) -> bytes:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self.max_bytes:
                raise TaskError("invalidParameter", f"{parameter}: the image at {url} is over {self.max_bytes} "
                                "bytes", parameter)
        return bytes(body)
