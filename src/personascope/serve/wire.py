"""The wire format of `personascope serve` requests: the error shape, strict JSON bodies, field readers, option
ranges. A body is strict UTF-8 JSON (no byte order mark, no NaN/Infinity, no lone surrogates, nested at most
MAX_JSON_DEPTH deep); integer literals longer than MAX_INT_DIGITS are never converted, so no field meets a
number Python cannot hold, and each field's reader answers 400 naming the field."""

from __future__ import annotations

import codecs
import json
import math
import re

MAX_JSON_DEPTH = 32  # deeper request bodies are refused (400) before anything walks them
MAX_INT_DIGITS = 30  # longer integer literals are never converted (no field takes one): 400 naming the field
_SURROGATE = re.compile("[\ud800-\udfff]")


class ApiError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None, code: str = "invalid_value", status: int = 400) -> ApiError:
    return ApiError(status, message, param, code)


# the server's options (ServeConfig fields): (integer?, lowest, highest); the CLI refuses others at start-up
OPTION_RANGES: dict[str, tuple[bool, float, float]] = {
    "max_batch": (True, 1, 4096), "batch_wait_ms": (False, 0, 60_000), "max_tokens_limit": (True, 1, 10**7),
    "max_body_bytes": (True, 256, 2**31), "max_queue": (True, 1, 10**6), "body_timeout_s": (False, 0.01, 3600),
    "drain_timeout_s": (False, 0, 3600), "port": (True, 1, 65535),
}


def option_problem(name: str, value: object) -> str | None:
    """Why `value` is no good for the server option `name` (a key of OPTION_RANGES), or None."""
    integer, lo, hi = OPTION_RANGES[name]
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, int | float) and math.isfinite(value)
    if isinstance(value, bool) or not ok or not lo <= value <= hi:  # type: ignore[operator]
        span = f"{int(lo)} to {int(hi)}" if integer else f"{lo:g} to {hi:g}"
        return f"must be {kind} from {span}, got {value!r}"
    return None


class Oversized:
    """An integer literal of a request body too long for any field, kept as its length (never converted)."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def _parse_int(text: str) -> int | Oversized:
    return int(text) if len(text) <= MAX_INT_DIGITS else Oversized(len(text.lstrip("-")))


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def json_depth(value: object) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion limit)."""
    depth, level = 0, [value]
    while level:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            break
        depth += 1
        level = [x for c in containers for x in (c.values() if isinstance(c, dict) else c)]
    return depth


def surrogate_at(value: object) -> str | None:
    """Where a parsed JSON value holds a lone surrogate (`"\\ud800"`), which no UTF-8 text carries; None if nowhere."""
    stack: list[tuple[object, str]] = [(value, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                return path or "body"
        elif isinstance(v, dict):
            for k, x in v.items():
                if not k.isascii() and _SURROGATE.search(k):
                    return f"{path} (a key)" if path else "body (a key)"
                stack.append((x, f"{path}.{k}" if path else k))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]") for i, x in enumerate(v))
    return None


def decode_body(raw: bytes, content_type: str = "application/json") -> object:
    """A request body as JSON: strict UTF-8 without a byte order mark, no NaN/Infinity, not nested deeper than
    MAX_JSON_DEPTH, no lone surrogates; integer literals longer than MAX_INT_DIGITS stay `Oversized`."""
    charset = next((p.split("=", 1)[1].strip().strip('"').lower() for p in content_type.split(";")[1:]
                    if p.strip().lower().startswith("charset=")), "utf-8")
    if charset not in ("utf-8", "utf8"):
        raise invalid(f"the request body is declared as charset {charset!r}; send JSON encoded as UTF-8", None,
                      "invalid_json")
    if raw.startswith(codecs.BOM_UTF8):
        raise invalid("the request body starts with a byte order mark; send UTF-8 JSON without one", None,
                      "invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"the request body is not UTF-8 (byte {e.start} is {raw[e.start]:#04x}); send JSON encoded as "
                      "UTF-8", None, "invalid_json") from None
    try:
        body = json.loads(text, parse_int=_parse_int, parse_constant=_no_constant)
    except RecursionError:
        raise invalid(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json") from None
    except ValueError as e:  # JSONDecodeError, NaN / Infinity
        raise invalid(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise invalid(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
    where = surrogate_at(body)
    if where is not None:
        raise invalid(f"{where} holds a lone surrogate escape (such as \\ud800), which is not text", where)
    return body


def number_field(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if not is_number(value):
        raise invalid(f"'{key}' must be a number between {lo} and {hi}, got {value!r}", key)
    if not lo <= value <= hi:  # type: ignore[operator]
        raise invalid(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return float(value)  # type: ignore[arg-type]


def integer_field(body: dict, key: str, default: int, lo: int, hi: int | None) -> int:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, Oversized):
        raise invalid(f"'{key}' must be between {lo} and {hi}, got {value!r}" if hi is not None
                      else f"'{key}' must be at least {lo}, got {value!r}", key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{key}' must be an integer, got {value!r}", key)
    if value < lo or (hi is not None and value > hi):
        raise invalid(f"'{key}' must be between {lo} and {hi}, got {value}" if hi is not None
                   else f"'{key}' must be at least {lo}, got {value}", key)
    return value


def is_number(value: object) -> bool:
    """Whether a JSON value is a real number that fits a float (bool and oversized integers are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) if isinstance(value, float) else abs(value) <= 1e300
