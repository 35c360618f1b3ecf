"""Standard Webhooks signatures (symmetric ``v1``), as OpenAI's SDK and the standardwebhooks library verify them.

Pure: the caller passes the message id, the attempt's timestamp and the exact body bytes it sends.
The signed content is ``{msg_id}.{timestamp}.{body}``; the key of a ``whsec_…`` secret is the base64
after the prefix. Several secrets (during a rotation) give several space-separated ``v1,…`` signatures,
and a receiver that knows any one of them accepts the message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from typing import Final

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the prefix of secrets, not a secret
#: The header names of the spec; receivers match them case-insensitively.
ID_HEADER: Final = "webhook-id"
TIMESTAMP_HEADER: Final = "webhook-timestamp"
SIGNATURE_HEADER: Final = "webhook-signature"
#: How far a receiver's clock may differ from the timestamp (OpenAI's SDK and standardwebhooks: 5 minutes).
TOLERANCE_SECONDS: Final = 300


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret; raises ValueError (never showing the secret) if it is malformed.

    Unpadded base64 is accepted, as the standardwebhooks library accepts it.
    """
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret must start with 'whsec_'")
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError("the part after 'whsec_' is not base64") from None
    if not key:
        raise ValueError("the webhook secret is empty after 'whsec_'")
    return key


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64 HMAC-SHA256>`` signature of ``msg_id.timestamp.body``."""
    if "." in msg_id:
        # The spec forbids it: a dot would let an id and a timestamp be shifted into each other.
        raise ValueError("a webhook message id must not contain '.'")
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: one signature per secret, in order, space-separated."""
    return " ".join(signature(secret_key(s), msg_id, timestamp, body) for s in secrets)
