"""Several processes, one job: torchrun's environment, the process group, and generation in
lockstep for a tensor-parallel model.

torchrun (one node or many) starts one process per rank and sets WORLD_SIZE, RANK and
LOCAL_RANK; `Launch.from_env` reads them and `start` joins the process group (gloo on CPU, NCCL
on CUDA, each rank on cuda:LOCAL_RANK) with a timeout, so that a rank that never joins or stops
answering ends the others' waits with a `DistributedError` instead of a hang.

A tensor-parallel model is one model spread over every rank: each forward is a collective, so
every rank must run the same batch at the same time. `Lockstep` does that with rank 0 leading:

    rank 0                                   ranks 1..N-1
    output = lockstep.run(batch)  ------->   lockstep.follow()   (runs each batch it is sent)
    lockstep.heartbeat()  (while idle) --->  (keeps waiting)
    lockstep.close()  -------------------->  follow() returns

A `GenerationBatch` is what one `fms_speech.generation.generate` call needs (prompts, features,
generation settings); rank 0 broadcasts it (a small header, then the feature tensors on the
device), all ranks generate it, and rank 0's `run` returns the `GenerationOutput` (token ids;
decoding them to text stays with the caller). Every collective is on the calling thread: a
caller with several threads (a server) drives one Lockstep from one thread.
"""

import datetime
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fms_speech.generation import GenerationOutput, generate

DEFAULT_TIMEOUT_SECONDS = 600.0
_timeout_seconds: float | None = None  # what `start` was given, for the error messages
# data-parallel ranks finish their shares at different times: the final summary waits this long
SUMMARY_TIMEOUT = datetime.timedelta(hours=24)


class DistributedError(RuntimeError):
    """The ranks cannot go on together (one failed, left, or did not answer in time)."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_env(cls) -> "Launch | None":
        """The launch torchrun describes in the environment; None when not under torchrun."""
        if "WORLD_SIZE" not in os.environ:
            return None
        try:
            launch = cls(
                rank=int(os.environ["RANK"]),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                world_size=int(os.environ["WORLD_SIZE"]),
            )
        except (KeyError, ValueError):
            raise ValueError(
                "WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not numbers: launch "
                "with torchrun"
            ) from None
        if not 0 <= launch.rank < launch.world_size:
            raise ValueError(f"RANK {launch.rank} is outside WORLD_SIZE {launch.world_size}")
        return launch


def rank_device(launch: Launch, device: str) -> torch.device:
    """The device this rank runs on: the CPU, or cuda:LOCAL_RANK for `device` "cuda"."""
    requested = torch.device(device)
    if requested.type == "cpu":
        return requested
    if requested.type != "cuda":
        raise ValueError(f"device {device!r} cannot run under torchrun: use cpu or cuda")
    if requested.index is not None:
        raise ValueError(
            f"under torchrun each rank runs on cuda:LOCAL_RANK: pass --device cuda, not {device}"
        )
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if launch.local_rank >= available:
        raise ValueError(
            f"rank {launch.rank} needs cuda:{launch.local_rank} but this machine has "
            f"{available} usable GPUs: start at most {available} processes per node"
        )
    return torch.device("cuda", launch.local_rank)


def start(launch: Launch, device: torch.device, timeout_seconds: float, backend: str | None = None):
    """Join the process group of `launch`: gloo for CPU devices, NCCL for CUDA (unless
    `backend` says otherwise). DistributedError if the other ranks do not all join within
    `timeout_seconds`, which also bounds every later wait of a collective."""
    if timeout_seconds <= 0:
        raise ValueError(f"the timeout must be more than 0 s, not {timeout_seconds:g}")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"{' and '.join(missing)} not set: launch with torchrun")
    global _timeout_seconds
    _timeout_seconds = timeout_seconds
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    with collective(launch.rank, "joining the process group", timeout_seconds):
        dist.init_process_group(
            backend,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(seconds=timeout_seconds),
        )


def stop() -> None:
    """Leave the process group (if this process is in one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def single_rank_group():
    """A process group of this rank alone, for a model that must not be split over the world
    (FMS's get_model picks tensor parallelism whenever its group has more than one rank).
    Collective: every rank calls it."""
    group, _ = dist.new_subgroups(group_size=1)
    return group


@contextmanager
def collective(rank: int, what: str, timeout: float | None = None) -> Iterator[None]:
    """Turn torch's errors of the collectives within into a DistributedError (one sentence)."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, ValueError) as error:  # torch's DistError and gloo's errors
        timeout = timeout if timeout is not None else _timeout_seconds
        limit = f" within {timeout:g} s" if timeout else ""
        raise DistributedError(
            f"rank {rank}: lost contact with the other ranks while {what} (a rank failed, "
            f"exited or did not answer{limit}): {type(error).__name__}: {_first_line(error)}"
        ) from None


def agreed_problem(problem: str | None, launch: Launch) -> str | None:
    """Every rank's problem, gathered on all ranks: None if none has one, else one sentence."""
    problems = [None] * launch.world_size
    with collective(launch.rank, "checking that every rank is ready"):
        dist.all_gather_object(problems, problem)
    distinct = {p for p in problems if p is not None}
    if not distinct:
        return None
    if len(distinct) == 1 and None not in problems:
        return distinct.pop()
    return "; ".join(f"rank {rank}: {p}" for rank, p in enumerate(problems) if p is not None)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    # gloo starts its messages with its source location: [/path/to/pair.cc:553]
    return re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ", "", lines[0]) if lines else ""


# ---- generation in lockstep (tensor parallelism)


@dataclass
class GenerationBatch:
    """The arguments of one `generate` call, as rank 0 sends them to the other ranks."""

    prompts: list[list[int]]
    features: torch.Tensor | None  # (B, frames, feature_dim) on the model's device and dtype
    feature_lengths: torch.Tensor | None  # (B,) valid frames per row
    settings: dict = field(default_factory=dict)  # generate's keyword arguments

    def generate(self, model, on_tokens=None) -> GenerationOutput:
        """on_tokens: rank-local (never sent), see `generate`."""
        return generate(
            model,
            self.prompts,
            self.features,
            self.feature_lengths,
            on_tokens=on_tokens,
            **self.settings,
        )

    def _header(self) -> dict:
        tensors = {}
        if self.features is not None:
            tensors = {
                "features": (tuple(self.features.shape), self.features.dtype),
                "feature_lengths": (tuple(self.feature_lengths.shape), torch.long),
            }
        return {"prompts": self.prompts, "settings": self.settings, "tensors": tensors}


_STOP, _HEARTBEAT, _BATCH = "stop", "heartbeat", "batch"


class Lockstep:
    """Rank 0 leads, every other rank of `group` follows: each batch rank 0 runs, all run.

    `model` is each rank's part of the tensor-parallel model (or its compiled form); `device`
    the rank's device. See the module docstring for the protocol.
    """

    def __init__(self, model, device: torch.device, group=None):
        self.model = model
        self.device = device
        self.group = group
        self.rank = dist.get_rank(group)
        self.timeout = _timeout_seconds
        self.batches = 0  # batches this rank generated

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def run(self, batch: GenerationBatch, on_tokens=None) -> GenerationOutput:
        """Rank 0: generate `batch` on every rank; its output (the same on every rank).
        on_tokens runs on rank 0 only."""
        self._require_leader("run")
        self._send([_BATCH, batch._header()])
        for tensor in (batch.features, batch.feature_lengths):
            if tensor is not None:
                self._broadcast(tensor.contiguous(), "sending a batch")
        return self._generate(batch, on_tokens)

    def heartbeat(self) -> None:
        """Rank 0, while it has nothing to run: tell the followers it is alive, so that their
        wait for the next batch does not time out (call more often than the timeout)."""
        self._require_leader("heartbeat")
        self._send([_HEARTBEAT])

    def close(self) -> None:
        """Rank 0: the followers' `follow` returns."""
        self._require_leader("close")
        self._send([_STOP])

    def follow(self) -> int:
        """Ranks other than 0: run every batch rank 0 sends until it closes; the number run."""
        if self.leads:
            raise RuntimeError("rank 0 leads: it calls run(), heartbeat() and close()")
        while True:
            message = [None]
            with collective(self.rank, "waiting for the next batch from rank 0", self.timeout):
                dist.broadcast_object_list(message, group=self.group, group_src=0)
            kind, *rest = message[0]
            if kind == _STOP:
                return self.batches
            if kind == _BATCH:
                self._generate(self._receive_batch(rest[0]))

    def _receive_batch(self, header: dict) -> GenerationBatch:
        tensors = {}
        for name, (shape, dtype) in header["tensors"].items():
            tensors[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self._broadcast(tensors[name], "receiving a batch")
        return GenerationBatch(
            header["prompts"],
            tensors.get("features"),
            tensors.get("feature_lengths"),
            header["settings"],
        )

    def _generate(self, batch: GenerationBatch, on_tokens=None) -> GenerationOutput:
        try:
            output = batch.generate(self.model, on_tokens)
        except Exception as error:
            # a rank that stops mid-generation leaves the others inside a collective: the
            # tensor-parallel ranks cannot be brought back in step, so the run ends
            raise DistributedError(
                f"rank {self.rank}: tensor-parallel generation failed, so the ranks cannot go "
                f"on in step: {type(error).__name__}: {_first_line(error)}"
            ) from error
        self.batches += 1
        return output

    def _send(self, message: list) -> None:
        with collective(self.rank, f"sending {message[0]!r} to the other ranks", self.timeout):
            dist.broadcast_object_list([message], group=self.group, group_src=0)

    def _broadcast(self, tensor: torch.Tensor, what: str) -> None:
        with collective(self.rank, what, self.timeout):
            dist.broadcast(tensor, group=self.group, group_src=0)

    def _require_leader(self, method: str) -> None:
        if not self.leads:
            raise RuntimeError(f"only rank 0 calls {method}(); rank {self.rank} calls follow()")
