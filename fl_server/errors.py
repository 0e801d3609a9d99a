"""The errors a client's request can cause; the servicer maps each to one gRPC status code."""
from __future__ import annotations

from common.messages import PROTOCOL_VERSION


class FederationError(Exception):
    """Base of the errors a client's request can cause."""


class ProtocolMismatchError(FederationError):
    pass


class UnknownClientError(FederationError):
    pass


class StaleRoundError(FederationError):
    """The update is for a round that is closed, or was trained from an older model."""


class NotSelectedError(FederationError):
    pass


class UploadInProgressError(FederationError):
    pass


class UploadStalledError(FederationError):
    """An admitted upload sent no data for the progress timeout: its buffer is back in the pool and its
    call has been ended (see uploads.UploadReceiver.receive's `interrupt`)."""


class InvalidUpdateError(FederationError):
    """The update is malformed or does not fit the model; it never touches the aggregate."""


class InvalidJoinError(FederationError):
    """The join names something the server cannot serve (a client without data whose id is no share)."""


class RegistryFullError(FederationError):
    """The server knows as many clients as it may keep (open mode) and none of them can be forgotten."""


def check_protocol(version: int) -> None:
    if version != PROTOCOL_VERSION:
        raise ProtocolMismatchError(f"client speaks protocol version {version}, this server speaks "
                                    f"{PROTOCOL_VERSION}; install matching fl-client and fl-server versions")
