"""The exception family: every error a user can cause is one of these, with a message that
says what is wrong and what to do."""


class TokenomicsError(Exception):
    """Base of every error tokenomics raises on purpose."""


class UsageError(TokenomicsError):
    """Bad flag, config or policy: the CLI exits 2 with this message."""


class RuntimeFailure(TokenomicsError):
    """Something went wrong at run time: the CLI exits 1 with this message."""


class StreamStopped(TokenomicsError):
    """An upstream body read no further because its reader set a deadline (a stream whose
    client left is taken in only until then): not an error of the upstream's."""


class ProxyError(TokenomicsError):
    """An error answered to a proxy client: HTTP status, stable `code`, and a message that says
    what happened and what to do (never a secret, never the text that matched a rule)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
