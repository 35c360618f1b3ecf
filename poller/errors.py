"""The package's exceptions. They carry fields so that no caller parses a message."""

from __future__ import annotations


class PollerError(Exception):
    """Base of every error batch-poller raises on purpose."""


class ConfigError(PollerError):
    """A configuration value is missing or wrong; `key` names it and `fix` says what would be accepted."""

    def __init__(self, key: str, problem: str, fix: str, value: object = None) -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        self.value = value
        super().__init__(f"{key}: {problem}")

    def render(self) -> str:
        shown = "" if self.value is None else f" (got {self.value!r})"
        return f"config error: {self.key}: {self.problem}{shown}\n  fix: {self.fix}"


class ApiError(PollerError):
    """The Batch API answered with an error or not at all.

    `status` is the HTTP status (None for transport errors and timeouts), `retry_after` the delay the
    server asked for in seconds, `request_id` the server's request id for support tickets. `from_api`
    says the error body was the API's own JSON; an HTML or empty error page comes from something in
    front of it (a proxy, a wrong `base_url`), and a 404 then says nothing about the batch.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
        code: str | None = None,
        from_api: bool = False,
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        self.request_id = request_id
        self.code = code
        self.from_api = from_api
        super().__init__(message)

    @property
    def kind(self) -> str:
        """A short label for metrics and logs: auth, not_found, rate_limited, server, client, transport."""
        match self.status:
            case None:
                return "transport"
            case 401 | 403:
                return "auth"
            case 404:
                return "not_found"
            case 429:
                return "rate_limited"
            case s if s >= 500:
                return "server"
            case _:
                return "client"


class BadResponseError(ApiError):
    """The API answered 2xx with a body that is not a batch (or a page of them) we can trust.

    `reason` labels the `bad_responses` metric: not_json, batch_shape, list_shape, invalid_value, wrong_id.
    """

    def __init__(self, message: str, *, reason: str, status: int | None = None, request_id: str | None = None) -> None:
        self.reason = reason
        super().__init__(message, status=status, request_id=request_id)

    @property
    def kind(self) -> str:
        return "bad_response"


class DeliveryError(PollerError):
    """A sink could not deliver an event.

    `retryable` says whether the same event may succeed later; `status` is the protocol status when there
    is one (HTTP status, MQTT reason code); `retry_after` is a delay the receiver asked for, in seconds.
    `disable` asks the delivery stage to stop using this sink altogether (HTTP 410 Gone).
    """

    def __init__(
        self,
        sink: str,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        disable: bool = False,
    ) -> None:
        self.sink = sink
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after
        self.disable = disable
        super().__init__(f"{sink}: {message}")
