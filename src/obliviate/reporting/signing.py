"""Ed25519 signatures on audit records, so a third party can check who certified a deletion.

The record's head hash commits to every entry (``audit.chain``), so signing the head with the record
format signs the whole record: editing an entry and re-chaining changes the head, which the signature
no longer matches. Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), as
``openssl genpkey -algorithm ed25519`` or ``obliviate keygen`` write them; the ``cryptography``
package reads them (no pickling). Unsigned records stay valid records: a signature is optional.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from obliviate.errors import UserError
from obliviate.runs import atomic_write_bytes

ALGORITHM = "ed25519"
_DOMAIN = b"obliviate audit record\n"  # a signature over a record head cannot be replayed for other data


class SigningError(UserError, ValueError):
    """A key file that cannot be used, or a signature block that is not well formed."""


def _message(record: dict[str, Any]) -> bytes:
    return _DOMAIN + f"{record['format']}\n{record['head']}".encode()


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def write_key_pair(directory: str | Path, name: str = "audit") -> tuple[Path, Path]:
    """A new key pair as ``NAME.key`` (private, mode 0600) and ``NAME.pub`` in ``directory``."""
    directory = Path(directory)
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise SigningError(f"{path} exists; refusing to replace a key (choose another --out or --name)")
    key = Ed25519PrivateKey.generate()
    atomic_write_bytes(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    private.chmod(0o600)
    atomic_write_bytes(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def sign(record: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The record with a ``signature`` block over its format and head hash."""
    signature = key.sign(_message(record))
    return {**record, "signature": {"algorithm": ALGORITHM,
                                    "public_key": base64.b64encode(_raw_public(key.public_key())).decode(),
                                    "value": base64.b64encode(signature).decode()}}


def signature_problems(record: dict[str, Any], key: Ed25519PublicKey) -> list[str]:
    """What is wrong with the record's signature for ``key`` (empty: signed by that key, unchanged)."""
    block = record.get("signature")
    if block is None:
        return ["the record is not signed (certify it with --sign-key)"]
    if not isinstance(block, dict) or block.get("algorithm") != ALGORITHM \
            or not all(isinstance(block.get(k), str) for k in ("public_key", "value")):
        return [f"the signature block is malformed (expected algorithm {ALGORITHM}, public_key, value)"]
    problems = []
    if block["public_key"] != base64.b64encode(_raw_public(key)).decode():
        problems.append("the record was signed with another key than the one given")
    try:
        key.verify(base64.b64decode(block["value"], validate=True), _message(record))
    except (InvalidSignature, ValueError):
        problems.append("the signature does not match the record's head hash (forged, or the record was edited)")
    return problems
