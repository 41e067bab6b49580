"""Encrypt private keys at rest with the key in PACSBRIDGE_SECRET_KEY.

The variable contains 32 random bytes in Base64. Each value is encrypted with
AES-256-GCM under a fresh 96-bit nonce and stored as text:

    v1:<key id>:<Base64 of nonce + ciphertext + tag>

The key id is the start of a SHA-256 hash of the key. A value encrypted with
another key is therefore reported as such before decryption is tried, and a
later key rotation can tell old values from new ones. The caller passes
associated data (such as the certificate fingerprint) that is authenticated
with the value, so an encrypted key copied to another row fails to decrypt.

AES-GCM rather than Fernet: Fernet is AES-128-CBC with HMAC-SHA256, has its
own key format, and cannot authenticate associated data. AES-256-GCM takes
the 32-byte key as is and binds each value to its row.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SECRET_KEY_ENV = "PACSBRIDGE_SECRET_KEY"
KEY_BYTES = 32
NONCE_BYTES = 12
FORMAT_VERSION = "v1"
# Eight hex digits tell keys apart, but they do not identify a key uniquely.
KEY_ID_HEX_DIGITS = 8

GENERATE_HINT = (
    f"Generate a key with 'pacsbridge secret-key' (or: python3 -c \"import base64, os; "
    f"print(base64.b64encode(os.urandom(32)).decode())\") and set {SECRET_KEY_ENV} to it. "
    "Keep it outside the database and its backups."
)
# Recovery when the stored private keys cannot be decrypted (see pacsbridge.tls.client_ca.reissue_all).
REISSUE_COMMAND = "pacsbridge connections reissue-client-certs --yes"
_REISSUE_STEPS = (
    f"run '{REISSUE_COMMAND}' to create a new organization CA and new client certificates encrypted with the "
    f"current {SECRET_KEY_ENV}, then give the new CA certificate to each hospital."
)
LOST_KEY_HINT = f"If that key is lost, {_REISSUE_STEPS}"
DAMAGED_KEY_HINT = f"To replace the damaged keys, {_REISSUE_STEPS}"


class SecretKeyError(RuntimeError):
    """Raised when PACSBRIDGE_SECRET_KEY is missing or invalid, or does not decrypt a stored value.

    The message names the variable and the fix, ends with a full stop, and never contains key material.
    """


def generate_secret_key() -> str:
    """Return a new random key in the Base64 form that PACSBRIDGE_SECRET_KEY takes."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def key_id(key: bytes) -> str:
    """Return the id stored with each value that `key` encrypts."""
    return hashlib.sha256(b"pacsbridge secret key id\x00" + key).hexdigest()[:KEY_ID_HEX_DIGITS]


@dataclass(frozen=True)
class SecretKey:
    """The key that encrypts private keys in the database."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise SecretKeyError(
                f"{SECRET_KEY_ENV} must decode to {KEY_BYTES} bytes, not {len(self.key)}. {GENERATE_HINT}"
            )

    @property
    def id(self) -> str:
        return key_id(self.key)

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> str:
        """Encrypt `plaintext` and return the stored text form, bound to `associated_data`."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.key).encrypt(nonce, plaintext, associated_data)
        return f"{FORMAT_VERSION}:{self.id}:{base64.b64encode(nonce + sealed).decode('ascii')}"

    def decrypt(self, token: str, associated_data: bytes) -> bytes:
        """Decrypt a value that `encrypt` returned, or raise SecretKeyError when this key cannot decrypt it."""
        parts = token.split(":")
        if len(parts) != 3 or parts[0] != FORMAT_VERSION:
            raise SecretKeyError(
                f"a stored private key is not in the {FORMAT_VERSION} format that this pacsbridge version reads, "
                f"because it was written by another version or the database was changed by hand. {DAMAGED_KEY_HINT}"
            )
        _, stored_id, payload = parts
        if stored_id != self.id:
            raise SecretKeyError(
                f"a stored private key was encrypted with key id {stored_id}, but {SECRET_KEY_ENV} has key id "
                f"{self.id}, so the variable is set to another key. Set it to the key the private keys were "
                f"encrypted with. {LOST_KEY_HINT}"
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise SecretKeyError(
                f"a stored private key is damaged, because its Base64 text cannot be decoded. {DAMAGED_KEY_HINT}"
            ) from None
        nonce, sealed = data[:NONCE_BYTES], data[NONCE_BYTES:]
        try:
            return AESGCM(self.key).decrypt(nonce, sealed, associated_data)
        except InvalidTag:
            raise SecretKeyError(
                f"a stored private key cannot be decrypted with {SECRET_KEY_ENV} (key id {self.id}). The value "
                f"was damaged or moved to another row, or a different key with the same id is set. {DAMAGED_KEY_HINT}"
            ) from None


def parse_secret_key(text: str) -> SecretKey:
    """Decode a key in standard or URL-safe Base64, or raise SecretKeyError naming the variable."""
    compact = "".join(text.split()).replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(compact, validate=True)
    except binascii.Error:
        raise SecretKeyError(f"{SECRET_KEY_ENV} is not valid Base64. {GENERATE_HINT}") from None
    return SecretKey(key)


def load_secret_key(environ: Mapping[str, str] | None = None) -> SecretKey:
    """Read the key from PACSBRIDGE_SECRET_KEY, or raise SecretKeyError when it is missing or invalid."""
    env = os.environ if environ is None else environ
    text = env.get(SECRET_KEY_ENV, "")
    if not text.strip():
        raise SecretKeyError(
            f"{SECRET_KEY_ENV} is not set, but it is needed to encrypt and decrypt the private keys of "
            f"client certificates. {GENERATE_HINT}"
        )
    return parse_secret_key(text)
