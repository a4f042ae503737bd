"""URL inputs, fetched only from the operator's allow-list of hosts (empty by default: every URL refused).

Each hop of a redirect must be on the list too (at most ``MAX_REDIRECTS``); the body is streamed and cut at
``max_bytes``; each network operation waits at most ``timeout`` seconds and the whole fetch at most twice that.
"""

import time
from urllib.parse import urljoin, urlsplit

import httpx

from latentup.serve.tasks import TaskError

MAX_REDIRECTS = 3


class UrlFetcher:
    """``fetcher(url, parameter) -> bytes`` for hosts named in ``allow_hosts`` (exact, case-insensitive host names);
    a TaskError naming ``parameter`` for anything else."""

    def __init__(self, allow_hosts, max_bytes: int, timeout: float):
        self.allow_hosts = {host.lower() for host in allow_hosts}
        self.max_bytes, self.timeout = max_bytes, timeout

    def _check(self, url: str, parameter: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or (parts.hostname or "").lower() not in self.allow_hosts:
            raise TaskError("invalidParameter", f"{parameter}: {parts.hostname or url} is not an allowed host "
                            "(the operator lists them in fetch_hosts): pass the image as a data URI or base64",
                            parameter)

    def __call__(self, url: str, parameter: str = "inputs.image") -> bytes:
        deadline = time.monotonic() + 2 * self.timeout
        with httpx.Client(follow_redirects=False, timeout=self.timeout, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                self._check(url, parameter)
                try:
                    with client.stream("GET", url) as response:
                        if response.is_redirect:
                            url = urljoin(url, response.headers.get("location", ""))
                            continue
                        if response.status_code != 200:
                            raise TaskError("invalidParameter", f"{parameter}: {url} answered HTTP "
                                            f"{response.status_code}", parameter)
                        return self._read(response, parameter, deadline)
                except httpx.HTTPError as error:
                    raise TaskError("invalidParameter", f"{parameter}: fetching {url} failed "
                                    f"({type(error).__name__})", parameter) from None
        raise TaskError("invalidParameter", f"{parameter}: more than {MAX_REDIRECTS} redirects", parameter)

    def _read(self, response: httpx.Response, parameter: str, deadline: float) -> bytes:
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if time.monotonic() > deadline:
                raise TaskError("invalidParameter", f"{parameter}: {response.url} took over "
                                f"{2 * self.timeout:g} s", parameter)
            if len(body) > self.max_bytes:
                raise TaskError("invalidParameter", f"{parameter}: the image at {response.url} is over "
                                f"{self.max_bytes} bytes", parameter)
        return bytes(body)
