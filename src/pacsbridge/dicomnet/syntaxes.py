"""Transfer syntaxes to propose beside an instance's own, and whether a JPEG codestream fits a default syntax."""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
)

# PS3.5 section 10 and Annex A.4.1: an SCU that proposes a JPEG process other
# than the default one also proposes the default, because every SCP that
# accepts JPEG must accept it: Baseline for 8-bit lossy, SV1 for lossless.
DEFAULT_BESIDE = {
    JPEGExtended12Bit: JPEGBaseline8Bit,
    JPEGLossless: JPEGLosslessSV1,
}


def syntaxes_to_propose(own: UID) -> list[UID]:
    """Return the transfer syntaxes to propose for an instance encoded in `own`, preferred first."""
    proposed = [own]
    if own in DEFAULT_BESIDE:
        proposed.append(DEFAULT_BESIDE[own])
    proposed += [ts for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if ts not in proposed]
    return proposed


def _markers(codestream: bytes) -> list[tuple[int, bytes]]:
    """Return the JPEG markers before the first scan, with their segment bodies."""
    markers = []
    offset = 2  # skip SOI
    while offset + 4 <= len(codestream):
        if codestream[offset] != 0xFF:
            break
        marker = codestream[offset + 1]
        length = int.from_bytes(codestream[offset + 2 : offset + 4], "big")
        body = codestream[offset + 4 : offset + 2 + length]
        markers.append((marker, body))
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            break
        offset += 2 + length
    return markers


def codestream_fits(own: UID, target: UID, frames: Iterable[bytes]) -> bool:
    """Tell whether every frame's JPEG codestream, encoded under `own`, is already valid under `target`.

    A JPEG Extended object whose frames use only the baseline process (SOF0),
    or a Process 14 lossless object with selection value 1, can be sent under
    the default syntax as it is, without decoding. `frames` may be a stream of
    codestreams read from a file one at a time.
    """
    if DEFAULT_BESIDE.get(own) != target:
        return False
    for frame in frames:
        if frame[:2] != b"\xff\xd8":
            return False
        kinds = {marker for marker, _ in _markers(frame)}
        if target == JPEGBaseline8Bit and 0xC0 not in kinds:
            return False
        if target == JPEGLosslessSV1:
            sos = next((body for marker, body in _markers(frame) if marker == 0xDA), b"")
            components = sos[0] if sos else 0
            # Ss (the predictor) follows the component specifications.
            predictor = sos[1 + 2 * components] if len(sos) > 1 + 2 * components else None
            if 0xC3 not in kinds or predictor != 1:
                return False
    return True
