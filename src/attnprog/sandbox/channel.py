"""The result channel: fixed-size frames, read by a parser that trusts nothing.

A program's child writes one frame per call to its worker; the worker relays them to the host, which
reads them again with the same parser. A frame is a header (job id, call index, status code, payload
bytes) and its payload: for "ok" the matrix (the lower triangle when causal, the last row with
`last_row`) as float32, otherwise an error message. Anything else (a frame of another job, out of order,
with an unknown status, a size that is not the expected one, bytes after the end) raises ChannelError,
which makes the job's remaining calls fail; a matrix that is not normalised fails its call. The host
decodes matrices only through `decode_matrix`, never with pickle.
"""
import struct

import numpy as np

from ..contracts import PROGRAM_STATUSES
from ..matrices import is_normalised_packed, triangle_size, unpack
from .policy import MAX_ERROR_BYTES

HEADER = struct.Struct("<iiiq")  # job id, call index (or one of the markers below), status code, payload bytes
SETUP_FAILED = -1   # the module could not be set up: every remaining call fails with this status and message
HEARTBEAT = -2      # the worker is busy preparing (host side only: resets the host's deadline)
END = -3            # the job is over (host side only)


class ChannelError(Exception):
    """A stream that breaks the frame format."""


def encode(job_id: int, index: int, status: str, payload=b"") -> bytes:
    """One frame: a matrix (float32), the raw payload of a frame being relayed, or an error message."""
    if isinstance(payload, np.ndarray):
        data = np.ascontiguousarray(payload, dtype=np.float32).tobytes()
    elif isinstance(payload, (bytes, bytearray)):
        data = bytes(payload) if status == "ok" else bytes(payload)[:MAX_ERROR_BYTES]
    else:
        data = str(payload if payload is not None else "").encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    return HEADER.pack(job_id, index, PROGRAM_STATUSES.index(status), len(data)) + data


def payload_size(n: int, causal: bool, last_row: bool) -> int:
    return 4 * (n if last_row else triangle_size(n) if causal else n * n)


class FrameReader:
    """Parses the frames of one job as bytes arrive. `feed` returns events: ("call", index, status, payload
    bytes) and, from a child, ("setup_failed", status, message); from a worker (`host_side`, which turns a
    child's set-up failure into per-call frames), ("heartbeat",) and ("end",)."""

    def __init__(self, job_id: int, sizes: list[int], causal: bool, last_row: bool, host_side: bool):
        self.job_id, self.sizes, self.causal, self.last_row = job_id, sizes, causal, last_row
        self.host_side = host_side
        self.buffer = bytearray()
        self.next_index = 0
        self.done = False

    def feed(self, data: bytes) -> list:
        if self.done and data:
            raise ChannelError("bytes after the end of the job")
        self.buffer += data
        events = []
        while len(self.buffer) >= HEADER.size and not self.done:
            job_id, index, code, nbytes = HEADER.unpack_from(self.buffer)
            if job_id != self.job_id:
                raise ChannelError(f"a frame of job {job_id} in job {self.job_id}")
            if not 0 <= code < len(PROGRAM_STATUSES):
                raise ChannelError(f"unknown status code {code}")
            status = PROGRAM_STATUSES[code]
            if index == self.next_index and index < len(self.sizes):
                expected = payload_size(self.sizes[index], self.causal, self.last_row) if status == "ok" else None
                if (expected is not None and nbytes != expected) or (expected is None and not 0 <= nbytes <= MAX_ERROR_BYTES):
                    raise ChannelError(f"result for call {index} has the wrong size ({nbytes} bytes)")
            elif not self.host_side and index == SETUP_FAILED and status != "ok":
                if not 0 <= nbytes <= MAX_ERROR_BYTES:
                    raise ChannelError("oversized error message")
            elif self.host_side and index in (HEARTBEAT, END) and nbytes == 0:
                if index == END and self.next_index != len(self.sizes):
                    raise ChannelError(f"the job ended after {self.next_index} of {len(self.sizes)} results")
            else:
                raise ChannelError(f"unexpected frame (call {index}, expected {self.next_index})")
            if len(self.buffer) < HEADER.size + nbytes:
                break
            payload = bytes(self.buffer[HEADER.size:HEADER.size + nbytes])
            del self.buffer[:HEADER.size + nbytes]
            if index == HEARTBEAT:
                events.append(("heartbeat",))
            elif index == END:
                events.append(("end",))
                self.done = True
            elif index == SETUP_FAILED:
                events.append(("setup_failed", status, payload.decode("utf-8", "replace")))
                self.done = True
            else:
                events.append(("call", index, status, payload))
                self.next_index += 1
                self.done = self.done or (not self.host_side and self.next_index == len(self.sizes))
        if self.done and self.buffer:
            raise ChannelError("bytes after the end of the job")
        return events


def decode_matrix(data: bytes, n: int, causal: bool, last_row: bool) -> np.ndarray | None:
    """The matrix (or row) of an "ok" frame, or None unless every row is a distribution (non-negative,
    finite, summing to 1): what `matrices.normalise` makes, so nothing else gets through."""
    values = np.frombuffer(data, dtype=np.float32)
    if len(values) * 4 != payload_size(n, causal, last_row):
        return None
    if causal and not last_row:
        return unpack(values, n) if is_normalised_packed(values, n) else None
    rows = values.reshape(-1, n) if n else values.reshape(0, 0)  # the last row: (1, n); not causal: (n, n)
    if n and not (np.isfinite(values).all() and values.min() >= 0
                  and np.abs(rows.sum(axis=1, dtype=np.float64) - 1).max() <= 1e-3):
        return None
    return values.copy() if last_row else rows.copy()
