"""What may be printed or logged: secret-named values masked, URLs without user information or
query values. Light imports: the launcher uses it before anything else is loaded."""

from __future__ import annotations

import re
from typing import Any

# Words (any case style: hf_token, apiKey, X-Amz-Security-Token) that make a key a secret;
# pairs count as one word (api_key, private-key, accessToken). Not ``tokenizer``.
_SECRET_WORDS = {
    "secret", "token", "password", "passwd", "passphrase", "credential", "credentials",
    "authorization", "signature", "apikey", "accesskey", "secretkey", "privatekey",
}  # fmt: skip
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key")}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_URL_USER_INFO = re.compile(r"(?<=://)[^\s]*@")  # up to the last @: a password may hold a /
_URL_QUERY_VALUE = re.compile(r"([?&][^=&#\s]+)=[^&#\s]*")


def is_secret_key(key: str) -> bool:
    """Whether a config or header name names a secret, in any case style."""
    words = re.split(r"[^a-z0-9]+", _CAMEL.sub("_", key).lower())
    pairs = set(zip(words, words[1:], strict=False))
    return bool(_SECRET_WORDS.intersection(words) or _SECRET_PAIRS & pairs)


def redacted(key: str, value: Any) -> str:
    """``value`` as it may be logged: ``***`` for a key that names a secret; in any URL in
    it, the user information (``http://user:pw@host`` -> ``http://***@host``) and every query
    value (``?token=abc`` -> ``?token=***``, signed S3 URLs included)."""
    if is_secret_key(key) and value not in (None, ""):
        return "***"
    text = _URL_USER_INFO.sub("***@", str(value))
    return _URL_QUERY_VALUE.sub(r"\1=***", text) if "://" in text else text
