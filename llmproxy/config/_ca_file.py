"""``tls.ca_file``: a PEM file of CA certificates, checked when the config loads.

At run time OpenSSL loads the file into every TLS context; a file it cannot
load fails every https request. So the file is parsed here, each
certificate with OpenSSL's own parser (through pyOpenSSL), and a mistake is
a :class:`~llmproxy.config.ConfigError` naming the file, the certificate and
the problem. Dates are not checked: an expired CA is the TLS handshake's to
refuse, with a 502 saying so.
"""

from __future__ import annotations

import base64
import binascii
import re

from OpenSSL import crypto

from llmproxy.config._model import ConfigError

__all__ = ["check_ca_file"]

#: PEM labels OpenSSL reads as certificates from a CA file.
_CERTIFICATE_LABELS = ("CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE")

#: The largest CA file read (a system bundle of every public CA is ~250 KiB).
MAX_BYTES = 16 * 1024 * 1024

_BEGIN = re.compile(rb"^-----BEGIN ([^\r\n]*?)-----[ \t]*\r?$", re.M)


def check_ca_file(path: str, key: str) -> None:
    """Refuse a CA file that OpenSSL could not load as trusted certificates.

    Args:
        path: The file.
        key: The key path naming it (``tls.ca_file``), for messages.

    Raises:
        ConfigError: For ``key``: the file cannot be read or is larger
            than :data:`MAX_BYTES`, holds no
            certificate, holds a PEM block other than a certificate (a
            private key), or a certificate that is truncated or garbled
            (naming it: ``certificate 2 of 3 (line 21)``).
    """
    try:
        with open(path, "rb") as f:
            pem = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(key, f"cannot read {path!r}: {e.strerror}") from None
    if len(pem) > MAX_BYTES:
        raise ConfigError(key, f"{path!r} is larger than {MAX_BYTES // 2**20} MiB: not a CA file")
    blocks = list(_BEGIN.finditer(pem))
    if not blocks:
        raise ConfigError(key, f"{path!r} holds no PEM certificate")
    for number, begin in enumerate(blocks, start=1):
        label = begin.group(1).decode("ascii", "replace")
        line = pem.count(b"\n", 0, begin.start()) + 1
        what = f"{path!r}: certificate {number} of {len(blocks)} (line {line})"
        if label not in _CERTIFICATE_LABELS:
            raise ConfigError(
                key,
                f"{path!r}: PEM block {number} of {len(blocks)} (line {line}) is "
                f"{label[:40]!r}, not a certificate: a CA file holds CA certificates only",
            )
        following = blocks[number].start() if number < len(blocks) else len(pem)
        end = pem.find(b"-----END " + begin.group(1) + b"-----", begin.end(), following)
        if end < 0:
            raise ConfigError(key, f"{what} is truncated: no '-----END {label}-----' line")
        problem = _certificate_problem(pem[begin.end() : end])
        if problem is not None:
            raise ConfigError(key, f"{what} {problem}")


def _certificate_problem(body: bytes) -> str | None:
    """What is wrong with a certificate's PEM body, or None.

    Args:
        body: The text between the BEGIN and END lines.

    Returns:
        ``is empty``, ``is not valid base64`` or ``is not a valid X.509
        certificate (OpenSSL's reason)``; None for a certificate OpenSSL
        reads.
    """
    text = b"".join(body.split())
    if not text:
        return "is empty"
    try:
        der = base64.b64decode(text, validate=True)
    except binascii.Error:
        return "is not valid base64"
    try:
        # The DER parser OpenSSL uses when it loads the file (a trusted
        # certificate is this, followed by its trust settings).
        crypto.load_certificate(crypto.FILETYPE_ASN1, der)
    except crypto.Error as e:
        reasons = [reason for *_, reason in (e.args[0] if e.args else []) if reason]
        detail = f" ({reasons[0]})" if reasons else ""
        return f"is not a valid X.509 certificate{detail}"
    return None
