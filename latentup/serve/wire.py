"""Every message goes out as ASCII JSON text, so it can always be sent: a lone surrogate echoed from a request
(``"taskType": "\\ud800"``, a settings key) travels as its ``\\ud800`` escape instead of failing to encode as UTF-8."""

import json

from starlette.responses import Response


def dumps(message) -> str:
    return json.dumps(message, separators=(",", ":"))


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return dumps(content).encode("ascii")
