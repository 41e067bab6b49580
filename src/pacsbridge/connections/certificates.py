"""Checks on certificates that admins upload for an SCP."""

from __future__ import annotations

from cryptography import x509

from pacsbridge.connections.problems import Problem

_PRIVATE_KEY_MARKERS = ("PRIVATE KEY-----",)


def check_scp_certificate_pem(pem: str) -> list[Problem]:
    """Check that `pem` contains one or more X.509 certificates and no private key.

    The text is never echoed back: a private key pasted by mistake must not end
    up in logs or error messages.
    """
    if any(marker in pem for marker in _PRIVATE_KEY_MARKERS):
        return [
            Problem.error(
                "scp_certificate",
                "(not shown)",
                "contains a private key, which must stay on the hospital side and was not stored",
                "Upload only the SCP's certificate (the file that starts with 'BEGIN CERTIFICATE').",
            )
        ]
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode("ascii", errors="replace"))
    except ValueError as exc:
        return [
            Problem.error(
                "scp_certificate",
                "(not shown)",
                f"is not a PEM certificate ({exc})",
                "Upload the SCP's certificate in PEM or Base64 .cer form.",
            )
        ]
    if not certificates:
        return [
            Problem.error(
                "scp_certificate",
                "(not shown)",
                "contains no certificate",
                "Upload the SCP's certificate in PEM or Base64 .cer form.",
            )
        ]
    return []
