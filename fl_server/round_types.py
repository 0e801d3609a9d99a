"""What a round is: the rules it runs by, its book-keeping while open, and its outcome."""
from __future__ import annotations

from dataclasses import dataclass, field

from fl_server.errors import NotSelectedError, UploadInProgressError
from fl_server.membership import RegistryLimits
from fl_server.uploads import UPLOAD_PROGRESS_TIMEOUT, MetricLimits


@dataclass(frozen=True)
class RoundRules:
    clients_per_round: int  # the seed's k
    min_clients: int  # clients there now (Membership.present) needed before a round opens
    min_fit: int  # updates a round needs at its deadline to be aggregated rather than re-run
    round_timeout: float  # seconds
    heartbeat_seconds: float = 2.0  # how often working clients report in


@dataclass(frozen=True)
class ServerLimits:
    """What clients may cost the server (fl-server's settings of the same names; docs/security.md)."""

    max_concurrent_uploads: int = 0  # receive buffers; 0 = as many as fit in uploads.UPLOAD_MEMORY
    upload_progress_timeout: float = UPLOAD_PROGRESS_TIMEOUT  # seconds an admitted upload may send nothing
    metrics: MetricLimits = field(default_factory=MetricLimits)  # what an update's metrics may be
    registry: RegistryLimits = field(default_factory=RegistryLimits)  # clients kept track of, and how long
    secagg_stage_timeout: float = 30.0  # seconds a secure round's stage waits for its clients


@dataclass
class RoundOutcome:
    round: int
    selected: list[str]
    contributors: list[str]
    num_samples: int
    client_metrics: dict[str, dict[str, float]]
    seconds: float
    aggregated: bool
    drop_reasons: dict[str, str]  # selected clients that did not contribute, and why
    opened_at: float  # wall-clock times (time.time()), comparable with other processes' logs
    closed_at: float  # when the new global model was ready to serve
    bytes_in: int  # payload bytes of the counted updates
    aggregate_seconds: float  # applying the aggregate and publishing the new model
    population: int  # clients there now that the round's sample was drawn from

    @property
    def dropped(self) -> list[str]:
        return sorted(self.drop_reasons)


@dataclass
class OpenRound:
    number: int
    selected: list[str]
    deadline: float
    started: float
    opened_at: float
    population: int  # clients there now that the sample was drawn from
    submitted: dict[str, int] = field(default_factory=dict)  # client -> num_samples
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    uploading: set[str] = field(default_factory=set)
    silent: dict[str, str] = field(default_factory=dict)  # client -> why it was given up on
    # Clients whose upload stalled (uploads.UploadStalledError) or who reported that they cannot train the
    # round: given up on for the round, they are neither reinstated by a heartbeat nor offered it again.
    stalled: set[str] = field(default_factory=set)
    bytes_in: int = 0  # payload bytes of the counted updates
    folding: int = 0  # accepted updates not yet folded into the sum
    begun: bool = False  # the aggregator's begin_round has run (under the fold lock)
    next_silence_check: float = -float("inf")  # when the coordinator next looks for silent clients

    def __post_init__(self) -> None:
        self.chosen = frozenset(self.selected)  # `selected` as a set: membership in O(1) with 1,000 a round

    def expects(self, client_id: str) -> bool:
        """Whether this round still waits for work from the client: selected, not in, not given up on for
        a stalled upload."""
        return client_id in self.chosen and client_id not in self.submitted and client_id not in self.stalled

    def check_upload(self, client_id: str) -> None:
        """Refuse an upload from a client this round does not expect one from (now)."""
        if client_id not in self.chosen:
            raise NotSelectedError(f"client {client_id!r} was not selected for round {self.number}")
        if client_id in self.stalled:
            raise NotSelectedError(f"client {client_id!r} was given up on for round {self.number}: "
                                   f"{self.silent.get(client_id, 'its upload stalled')}")
        if client_id in self.uploading:
            raise UploadInProgressError(f"an upload from client {client_id} for round {self.number} "
                                        "is already in progress")

    @property
    def settled(self) -> bool:
        """Every selected client has either submitted or been given up on."""
        return len(self.submitted) + len(self.silent) >= len(self.selected)
